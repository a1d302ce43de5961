"""`train.report_to` and `train.logging_steps`: the keys' checks, a backend named but not installed (one line naming
pip, before any process group), metrics.csv rows and resume, and one 2-rank run on the demo task reporting to
TensorBoard (read back with its reader), wandb (offline), MLflow (local file store, when installed) and CSV."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from helpers.demo_runs import ZERO2, write_demo_run
from molf_ds.commands import cli
from molf_ds.commands.train import ConfigError
from molf_ds.commands.train.config import from_dict
from molf_ds.commands.train.tracking import Trackers, scalars

STEPS, LOGGING_STEPS = 4, 2
RECORD = {"step": 2, "epoch": 0.5, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 100.0,
          "routing": {"full": 0.25, "lora0": 0.75},
          "routing_by_type": {"q_proj": {"full": 0.5, "lora0": 0.5}, "up_proj": {"full": 0.0, "lora0": 1.0}}}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _raw(tmp_path: Path, **train) -> dict:
    return {"model": {"name_or_path": "m"}, "data": {"task": "fact", "train": "d"}, "deepspeed": {},
            "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, **train}}


@pytest.mark.parametrize("train, key", [({"report_to": ["tensorbord"]}, "train.report_to[0]"),
                                        ({"report_to": ["csv", "csv"]}, "train.report_to[1]"),
                                        ({"report_to": "csv"}, "train.report_to"),
                                        ({"logging_steps": 0}, "train.logging_steps")])
def test_bad_tracking_keys_name_the_key(tmp_path, train, key):
    with pytest.raises(ConfigError, match=f"^config key '{re.escape(key)}'"):
        from_dict(_raw(tmp_path, **train))


def test_missing_backend_is_one_line_naming_pip_before_any_group(tmp_path, monkeypatch, capsys):
    write_demo_run(tmp_path, deepspeed=ZERO2,
                   train={"output_dir": str(tmp_path / "out"), "max_steps": 2, "report_to": ["csv", "wandb"]})
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec finds nothing
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("molf-ds train: config key 'train.report_to': wandb is not installed: pip install wandb "
                   '(or "molf-ds[wandb]")')
    assert not dist.is_initialized() and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"pip install wandb"):  # run() called without the CLI's checks
        Trackers(["wandb"], 1, tmp_path / "out", {})


def test_scalars_every_logging_steps_and_csv_rows(tmp_path):
    assert scalars(RECORD, 0.5) == {
        "train/loss": 1.5, "train/lr": 1e-3, "train/tokens_per_s": 100.0, "train/epoch": 0.5, "train/grad_norm": 0.5,
        "routing/full": 0.25, "routing/lora0": 0.75,
        "routing_by_type/q_proj/full": 0.5, "routing_by_type/up_proj/full": 0.0}
    trackers = Trackers(["csv"], 2, tmp_path, {})
    trackers.eval(0, {"efficacy": 0.1})
    trackers.step(1, {"step": 1, "loss": 3.0, "skipped": True})
    trackers.step(2, {"step": 2, "loss": 2.0, "skipped": True})  # overflow: no routing yet
    trackers.step(3, RECORD)
    trackers.step(4, RECORD, 0.5)  # routing and the grad norm appear: the header grows
    trackers.close()
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["2", "4"]
    assert rows[0]["train/skipped"] == "1.0" and rows[0]["routing/full"] == ""
    assert rows[1]["routing/full"] == "0.25" and rows[1]["train/grad_norm"] == "0.5"
    assert _rows(tmp_path / "eval.csv") == [{"step": "0", "eval/efficacy": "0.1"}]
    resumed = Trackers(["csv"], 2, tmp_path, {}, start=2)  # the rows after the checkpoint go
    resumed.step(4, RECORD)
    resumed.close()
    assert [r["step"] for r in _rows(tmp_path / "metrics.csv")] == ["2", "4"]


@pytest.mark.slow  # torchrun, 2 ranks
def test_two_rank_run_reports_to_every_backend(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    backends = ["tensorboard", "wandb", "csv", "mlflow"]  # launch/install.sh installs every tracker (molf-ds[tracking])
    out = tmp_path / "out"
    write_demo_run(tmp_path, n_cases=16, eval_samples=4, deepspeed=ZERO2,
                   train={"output_dir": str(out), "max_steps": STEPS, "micro_batch_size": 4, "lr": 2e-3,
                          "lora_lr": 2e-3, "report_to": backends, "logging_steps": LOGGING_STEPS})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "molf_ds.commands.train", str(tmp_path / "run.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "online",
           "WANDB_API_KEY": "", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    logged = list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS))

    (events,) = (out / "tensorboard").glob("events.out.tfevents.*")  # rank 0 only
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "routing/full", "routing/lora0",
            "routing_by_type/q_proj/full", "eval/efficacy"} <= tags
    assert [e.step for e in accumulator.Scalars("train/loss")] == logged
    assert [e.step for e in accumulator.Scalars("eval/efficacy")] == [0, STEPS]
    full = accumulator.Scalars("routing/full")[-1].value
    assert full + accumulator.Scalars("routing/lora0")[-1].value == pytest.approx(1.0)

    (run_dir,) = (out / "wandb").glob("offline-run-*")  # offline although WANDB_MODE said online
    assert list(run_dir.glob("run-*.wandb"))

    rows = _rows(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == logged
    assert float(rows[-1]["routing/full"]) == pytest.approx(full)
    assert [r["step"] for r in _rows(out / "eval.csv")] == ["0", str(STEPS)]

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("molf-ds").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == logged
    assert run.data.params["train.logging_steps"] == str(LOGGING_STEPS) and run.info.status == "FINISHED"
