"""Experiment trackers for `molf-ds train` (`train.report_to`): TensorBoard, Weights & Biases, MLflow, CSV.

Every logged optimizer step (every `train.logging_steps`) sends the step's metrics.jsonl record flattened to
scalars: `train/loss`, `train/lr`, `train/tokens_per_s`, `train/epoch`, `train/grad_norm` (where DeepSpeed has
one), for molf / molf-e `routing/<expert>` (share of the modules each expert won) and `routing_by_type/<type>/<first
expert>` (the share of `full`, or `lora0` for molf-e, per projection type); every evaluation sends `eval/<metric>`.
Everything stays in the output directory and nothing goes over the network: TensorBoard event files in
`tensorboard/`, a wandb offline run in `wandb/` (upload later with `wandb sync`), an MLflow file store in `mlruns/`,
`metrics.csv` (and `eval.csv`). Only rank 0 writes, decided when it writes (`is_rank_zero`); the backends are
opened at the first write.
"""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

from molf_ds.optim.routing_log import is_rank_zero
from ..sources import missing_trackers
from .config import key_error

PROJECT = "molf-ds"  # the wandb project and MLflow experiment
TENSORBOARD, WANDB, MLRUNS, CSV, EVAL_CSV = "tensorboard", "wandb", "mlruns", "metrics.csv", "eval.csv"


def scalars(record: dict[str, Any], grad_norm: Any = None) -> dict[str, float]:
    """A metrics.jsonl record (and the step's grad norm) as flat scalar names; routing as computed for the record."""
    out = {f"train/{key}": float(record[key]) for key in ("loss", "lr", "tokens_per_s", "epoch") if key in record}
    if record.get("skipped"):
        out["train/skipped"] = 1.0
    if grad_norm is not None:
        out["train/grad_norm"] = float(grad_norm)
    shares = record.get("routing") or {}
    out.update({f"routing/{expert}": float(share) for expert, share in shares.items()})
    if shares:
        first = next(iter(shares))
        for kind, by_expert in (record.get("routing_by_type") or {}).items():
            out[f"routing_by_type/{kind}/{first}"] = float(by_expert[first])
    return out


class Tracker:
    """One backend: `log(step, scalars)`, `close()`."""

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    def __init__(self, out: Path, config: dict[str, Any], start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # deferred: optional dependency

        # a resumed run hides what the interrupted one logged after its checkpoint
        self.writer = SummaryWriter(str(out / TENSORBOARD), purge_step=start + 1 if start else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    def __init__(self, out: Path, config: dict[str, Any], start: int) -> None:
        os.environ["WANDB_MODE"] = "offline"  # never the network; `wandb sync` uploads the run afterwards
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # deferred: optional dependency

        (out / WANDB).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=PROJECT, name=out.name, dir=str(out), mode="offline", config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow(Tracker):
    def __init__(self, out: Path, config: dict[str, Any], start: int) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # mlflow 3 keeps the file store behind this switch
        from mlflow.entities import Param  # deferred: optional dependency
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=(out.resolve() / MLRUNS).as_uri())
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric  # deferred: optional dependency

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Csv(Tracker):
    """One row per logged step; a column that appears later (e.g. routing after a skipped first step) rewrites
    the header. A resumed run keeps the rows up to its checkpoint."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.columns: list[str] = ["step"]
        rows: list[dict[str, str]] = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as file:
                reader = csv.DictReader(file)
                self.columns = list(reader.fieldnames or self.columns)
                rows = [row for row in reader if int(row["step"]) <= start]
        self._write(rows)

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        if any(name not in self.columns for name in row):
            with open(self.path, newline="", encoding="utf-8") as file:
                rows = list(csv.DictReader(file))
            self.columns += [name for name in row if name not in self.columns]
            self._write(rows)
        with open(self.path, "a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, self.columns).writerow(row)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with open(self.path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, self.columns)
            writer.writeheader()
            writer.writerows(rows)


class Trackers:
    """The backends of `report_to`, opened by rank 0 at its first write; a no-op everywhere else."""

    def __init__(self, report_to: list[str], logging_steps: int, out: Path, config: dict[str, Any],
                 start: int = 0) -> None:
        if problem := missing_trackers(report_to):  # molf-ds train said so before the process group; run() says it here
            raise key_error("train.report_to", problem)
        self.report_to, self.logging_steps, self.out, self.config, self.start = (
            report_to, logging_steps, out, config, start)
        self.backends: list[Tracker] | None = None  # None: not opened yet
        self.eval_csv: Csv | None = None

    def step(self, step: int, record: dict[str, Any], grad_norm: Any = None) -> None:
        """An optimizer step's metrics.jsonl record; sent every `logging_steps` steps."""
        if self.report_to and step % self.logging_steps == 0:
            self._send("train", step, scalars(record, grad_norm))

    def eval(self, step: int, scores: dict[str, float]) -> None:
        if self.report_to:
            self._send("eval", step, {f"eval/{k}": float(v) for k, v in scores.items()})

    def close(self) -> None:
        for backend in self.backends or []:
            backend.close()
        self.backends = []

    def _send(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not is_rank_zero():
            return
        if self.backends is None:
            self.backends = [self._open(name) for name in self.report_to]
        for name, backend in zip(self.report_to, self.backends):
            if name == "csv" and kind == "eval":  # metrics.csv: one row per logged step; evaluations apart
                self.eval_csv = self.eval_csv or Csv(self.out / EVAL_CSV, self.start)
                backend = self.eval_csv
            backend.log(step, values)

    def _open(self, name: str) -> Tracker:
        self.out.mkdir(parents=True, exist_ok=True)
        if name == "csv":
            return Csv(self.out / CSV, self.start)
        return {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}[name](self.out, self.config, self.start)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: {"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
