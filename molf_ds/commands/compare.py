"""`molf-ds compare`: train and evaluate several methods and seeds under the same budget; writes comparison.md,
comparison.csv and plots.

Every (method, seed) is one `molf-ds train` run of the same YAML and overrides (same steps, batch, data and
evaluation set), launched as a subprocess (default: torchrun with 2 ranks; `--launcher` gives another), with
`method=M train.seed=S train.output_dir=OUT/runs/M-seedS` (baselines also `molf=null`; lora and lora-rest also
MoLF's LoRA expert settings for the lora.* keys left unset, compare_settings.py). The scores are the runs' own
evaluations at the end of training (`eval.jsonl`); the loss curves and the routing shares come from their
`metrics.jsonl`; the adapter settings, trainable parameters and lrs from their `config.yaml`. A run that fails is
reported and the others go on (exit code 1). Each run directory keeps the command compare launched, its wall time
and the SHA-256 of its local data files (`compare_run.json`): `--reuse` keeps a finished run only where its
config.yaml matches the resolved config and its data the files' content now, and reports its wall time.
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .compare_settings import (SETTINGS, baseline_overrides, baselines_line, describe, expert_settings, expert_source,
                               trainable_parameters)
from .methods import COMPARE_METHODS, DEGENERATE, EXPERT_BASELINES, MOLF_METHODS, lone_expert
from .run_dir import CONFIG, EVAL, METRICS
from .sources import SourceError, check_config, is_local
from .train.config import ConfigError, load_config, raw_config, saved_config
from .train.data import TASKS, direction
from .train.tracking import flatten

if TYPE_CHECKING:
    from .train.config import TrainConfig

CSV_NAME, MD_NAME = "comparison.csv", "comparison.md"
WITHIN_PERCENT = 1.5  # the paper's claim: MoLF within 1.5% of the better of FFT and LoRA
RUN_RECORD = "compare_run.json"  # in each run directory: the command compare launched and its wall time
# keys of a run's config that --reuse does not compare: where it writes and what it logs, not what it trains
REUSE_IGNORES = ("train.output_dir", "train.resume", "train.save_steps", "train.save_total_limit",
                 "train.report_to", "train.logging_steps", "train.collective_timeout")
PLOTS = {"metric": "metric_per_method.png", "loss": "loss_curves.png", "routing": "routing_full_share.png"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the training YAML shared by every run (it must configure eval.*)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides for every run")
    parser.add_argument("--methods", default=",".join(COMPARE_METHODS),
                        help=f"comma-separated methods [{','.join(COMPARE_METHODS)}]")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method: 0..N-1 (+ --first-seed) [3]")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/compare", help="runs/, logs/, table and plots [runs/compare]")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:key=value",
                        help="an override for one method only, e.g. molf-e:molf.lora_ranks=[4,8] (repeatable)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run for the default torchrun launcher [2]")
    parser.add_argument("--launcher", help="command prefix that runs the training module, e.g. "
                        "'deepspeed --num_gpus 8 --module molf_ds.commands.train' "
                        "[python -m torch.distributed.run --standalone --nproc_per_node NPROC -m molf_ds.commands.train]")
    parser.add_argument("--metric", help="the metric the gap and the bar plot use [the task's first]")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs that finished with the same resolved config and data content; rerun the "
                        "others (saying why)")


@dataclass
class RunResult:
    method: str
    seed: int
    out: Path
    status: str = "ok"
    scores: dict[str, float] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)
    routing: dict[str, float] = field(default_factory=dict)  # mean share of routing decisions per expert
    routing_curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    wall_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)  # the run's config.yaml

    @property
    def degenerate(self) -> bool:
        return lone_expert(self.routing) is not None

    @property
    def final_loss(self) -> float:
        tail = [loss for _, loss in self.losses[-10:]]
        return sum(tail) / len(tail) if tail else math.nan


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    per_method: dict[str, list[str]] = {m: [] for m in methods}
    for item in args.set:
        method, sep, override = item.partition(":")
        if not sep or method not in per_method:
            print(f"molf-ds compare: --set {item!r}: expected METHOD:key=value with METHOD in {methods}",
                  file=sys.stderr)
            return 2
        per_method[method].append(override)
    if args.seeds < 1 or not methods:
        print("molf-ds compare: need at least one method and --seeds >= 1", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    plans = []
    try:  # every run's config, model and data are checked before the first one starts
        own, line = method_overrides(args.config, args.overrides, per_method, out)
        for method in methods:
            overrides = run_overrides(args.overrides, method, own[method], 0, out / "runs" / "x")
            cfg = load_config(args.config, overrides)
            if not cfg.eval.enabled:
                raise ConfigError("config key 'eval': compare needs an evaluation set (eval.data or eval.holdout)")
            check_config(cfg)
            hashes = data_sha256(cfg)
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                name = f"{method}-seed{seed}"
                plans.append((method, seed, out / "runs" / name, hashes,
                              run_overrides(args.overrides, method, own[method], seed, out / "runs" / name)))
    except (ConfigError, SourceError) as error:
        print(f"molf-ds compare: {error}", file=sys.stderr)
        return 2
    if line:
        print(line, file=sys.stderr, flush=True)
    metrics = list(TASKS[cfg.data.task].metrics)
    metric = args.metric or metrics[0]
    launcher = shlex.split(args.launcher) if args.launcher else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
        "-m", "molf_ds.commands.train"]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    for i, (method, seed, run_dir, hashes, overrides) in enumerate(plans, start=1):
        head = f"[{i}/{len(plans)}] {method} seed {seed}"
        if args.reuse and run_dir.is_dir():
            why = stale_reason(run_dir, load_config(args.config, overrides).to_dict(), hashes)
            if why is None:
                print(f"{head}: reusing {run_dir}", file=sys.stderr, flush=True)
                results.append(collect(method, seed, run_dir))
                continue
            moved = set_aside(run_dir, out) if _final_eval(run_dir) is not None else None
            print(f"{head}: not reusing {run_dir}: {why}" + (f" (moved to {moved})" if moved else ""),
                  file=sys.stderr, flush=True)
        command = [*launcher, str(args.config), *overrides]
        print(f"{head}: {shlex.join(command)}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        status = launch(command, out / "logs" / f"{method}-seed{seed}.log")
        result = collect(method, seed, run_dir, status)
        result.wall_s = time.perf_counter() - began
        if run_dir.is_dir():  # so that --reuse reports it, and checks it, in a later session
            (run_dir / RUN_RECORD).write_text(json.dumps({"command": command, "wall_s": round(result.wall_s, 1),
                                                          "data_sha256": hashes}))
        print(f"    {result.status}, {time.perf_counter() - began:.0f}s: "
              + ", ".join(f"{k} {v:.4f}" for k, v in result.scores.items()), file=sys.stderr, flush=True)
        results.append(result)
    command_line = shlex.join(["molf-ds", "compare", str(args.config), *args.overrides, "--methods",
                               ",".join(methods), "--seeds", str(args.seeds)]
                              + [f"--set={s}" for s in args.set])
    written = write_report(results, out, metrics, metric, command_line)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0 if all(r.status == "ok" for r in results) else 1


def run_overrides(common: list[str], method: str, own: list[str], seed: int, out: Path) -> list[str]:
    extra = [] if method in MOLF_METHODS else ["molf=null"]
    return [*common, f"method={method}", *extra, *own, f"train.seed={seed}", f"train.output_dir={out}"]


def method_overrides(config: str, common: list[str], per_method: dict[str, list[str]],
                     out: Path) -> tuple[dict[str, list[str]], str]:
    """Each method's own overrides: its --set ones, after (for lora and lora-rest) the lora.* settings of MoLF's
    LoRA expert for every key the user left unset; and the line saying which settings each baseline took."""
    def resolved(method: str) -> TrainConfig:
        return load_config(config, run_overrides(common, method, per_method.get(method, []), 0, out / "runs" / "x"))

    own = dict(per_method)
    baselines = [m for m in EXPERT_BASELINES if m in per_method]
    adalora = resolved("adalora") if "adalora" in per_method else None
    if not baselines:
        return own, baselines_line(None, {}, adalora)
    source = resolved(expert_source(list(per_method), raw_config(config, common).get("method", "molf")))
    expert, said = expert_settings(source), {}
    for method in baselines:
        given = raw_config(config, [*common, *per_method[method]]).get("lora")
        defaults, said[method] = baseline_overrides(expert, given if isinstance(given, dict) else {})
        own[method] = [*defaults, *per_method[method]]
    return own, baselines_line(source, said, adalora)


def data_sha256(cfg: TrainConfig) -> dict[str, str]:
    """SHA-256 of each local data file the run reads (data.train, eval.data), by key; hub datasets have none."""
    digests = {}
    for key, source in (("data.train", cfg.data.train), ("eval.data", cfg.eval.data)):
        if source is not None and is_local(source):
            stat = os.stat(source)
            digests[key] = _sha256(os.path.realpath(source), stat.st_size, stat.st_mtime_ns)
    return digests


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Once per file version (size and mtime in the key): every method reads the same files."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def stale_reason(run_dir: Path, expected: dict[str, Any], hashes: dict[str, str]) -> str | None:
    """Why the run in `run_dir` is not the one compare would start now, or None where it is: it has no final
    evaluation, a setting of its config.yaml differs from the resolved config `expected` (REUSE_IGNORES aside), or
    a local data file's content differs from the one it trained on (`hashes` now, its compare_run.json then)."""
    if _final_eval(run_dir) is None:
        return "it has no final evaluation"
    if not (run_dir / CONFIG).is_file():
        return f"it has no {CONFIG}"
    saved = yaml.safe_load((run_dir / CONFIG).read_text())
    try:  # keys added to the schema since the run was trained count at their defaults
        saved = saved_config(saved).to_dict()
    except (ConfigError, TypeError):
        pass
    before, now = flatten(saved), flatten(expected)
    changed = [k for k in dict.fromkeys([*now, *before]) if k not in REUSE_IGNORES
               and before.get(k, _MISSING) != now.get(k, _MISSING)]
    why = [f"{k} {_brief(before.get(k, _MISSING))} -> {_brief(now.get(k, _MISSING))}" for k in changed]
    record = json.loads((run_dir / RUN_RECORD).read_text()) if (run_dir / RUN_RECORD).is_file() else {}
    if "data_sha256" not in record:
        why.append("no hash of the data it trained on is recorded")
    else:
        why += [f"{key} content changed" for key, digest in hashes.items()
                if key not in changed and record["data_sha256"].get(key) != digest]
    if not why:
        return None
    return ", ".join(why[:3]) + (f" (and {len(why) - 3} more)" if len(why) > 3 else "")


_MISSING = object()


def _brief(value: Any) -> str:
    text = "(unset)" if value is _MISSING else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def set_aside(run_dir: Path, out: Path) -> Path:
    """Moves a stale run out of runs/ (nothing is deleted) to stale/NAME-TIME, so that its rerun starts clean."""
    target = out / "stale" / f"{run_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(target))
    return target


def launch(command: list[str], log: Path) -> str:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "w", encoding="utf-8") as file:
        code = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, env=env).returncode
    return "ok" if code == 0 else f"failed (exit {code}, see {log})"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final_eval(run_dir: Path) -> dict[str, Any] | None:
    records = _jsonl(run_dir / EVAL)
    metrics = _jsonl(run_dir / METRICS)
    if not records or not metrics or records[-1]["step"] != metrics[-1]["step"] or records[-1]["step"] == 0:
        return None
    return records[-1]


def collect(method: str, seed: int, run_dir: Path, status: str = "ok") -> RunResult:
    """What one run left: final and initial scores, the loss curve, the routing shares."""
    result = RunResult(method, seed, run_dir, status)
    final = _final_eval(run_dir)
    if final is None and status == "ok":
        result.status = f"no final evaluation in {run_dir / EVAL}"
    if final is not None:
        result.scores = {k: v for k, v in final.items() if k != "step"}
    first = _jsonl(run_dir / EVAL)
    if first and first[0]["step"] == 0:
        result.before = {k: v for k, v in first[0].items() if k != "step"}
    if (run_dir / RUN_RECORD).exists():
        result.wall_s = json.loads((run_dir / RUN_RECORD).read_text())["wall_s"]
    if (run_dir / CONFIG).is_file():
        result.config = yaml.safe_load((run_dir / CONFIG).read_text())
    for record in _jsonl(run_dir / METRICS):
        result.losses.append((record["step"], record["loss"]))
        if "routing" in record:
            result.routing_curve.append((record["step"], record["routing"]))
    if result.routing_curve:
        experts = list(result.routing_curve[0][1])
        totals = {e: sum(shares.get(e, 0.0) for _, shares in result.routing_curve) for e in experts}
        norm = sum(totals.values()) or 1.0  # top_k > 1: shares sum to k per step
        result.routing = {e: totals[e] / norm for e in experts}
    return result


# ---- the report ------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[RunResult], metrics: list[str]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{method: {metric or 'final_loss': (mean, std, n)}} over the successful runs, methods in run order."""
    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    for method in dict.fromkeys(r.method for r in results):
        ok = [r for r in results if r.method == method and r.status == "ok"]
        row = {}
        for m in [*metrics, "final_loss"]:
            values = [r.final_loss if m == "final_loss" else r.scores[m] for r in ok
                      if m == "final_loss" or m in r.scores]
            row[m] = (*_mean_std(values), len(values))
        table[method] = row
    return table


def gap_percent(table: dict[str, dict[str, tuple[float, float, int]]], method: str, metric: str) -> float | None:
    """How much better (+) or worse (-) `method` is than the better of fft and lora, in percent of it (for loss,
    lower is better); None without a reference."""
    refs = [table[m][metric][0] for m in ("fft", "lora") if m in table and table[m][metric][2] > 0]
    if method not in table or not refs or table[method][metric][2] == 0:
        return None
    sign = direction(metric)
    best = max(refs, key=lambda value: sign * value)
    return math.nan if best == 0 else 100.0 * sign * (table[method][metric][0] - best) / abs(best)


def write_report(results: list[RunResult], out: Path, metrics: list[str], metric: str, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    experts = list(dict.fromkeys(e for r in results for e in r.routing))
    settings = run_settings(results)
    csv_path = out / CSV_NAME
    with open(csv_path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "seed", "status", *metrics, *(f"{m}_before" for m in metrics), "final_loss",
                         "steps", "wall_s", *(f"share_{e}" for e in experts), "degenerate_routing", *SETTINGS,
                         "output_dir"])
        for r, described in zip(results, settings):
            writer.writerow([r.method, r.seed, r.status, *(_fmt_csv(r.scores.get(m)) for m in metrics),
                             *(_fmt_csv(r.before.get(m)) for m in metrics), _fmt_csv(r.final_loss),
                             r.losses[-1][0] if r.losses else "", f"{r.wall_s:.1f}",
                             *(_fmt_csv(r.routing.get(e)) if r.routing else "" for e in experts),
                             (str(r.degenerate).lower() if r.routing else ""),
                             *(described.get(k, "") for k in SETTINGS), str(r.out)])
    table = summarise(results, metrics)
    plots = write_plots(results, table, out, metric)
    lines = ["# Method comparison", "", f"Command: `{command}`", "",
             f"Every run trains the same config for the same steps and batch; scores are the runs' evaluations after "
             f"training (mean ± sample std over seeds; n = successful runs). Primary metric: `{metric}`.", "",
             "| method | n | " + " | ".join(metrics) + " | final loss | routing shares (mean over runs) |",
             "| --- | --- | " + " | ".join("---" for _ in metrics) + " | --- | --- |"]
    for method, row in table.items():
        shares = _mean_routing([r for r in results if r.method == method and r.status == "ok"])
        lines.append(f"| {method} | {row[metric][2]} | "
                     + " | ".join(_pm(*row[m][:2]) for m in metrics)
                     + f" | {_pm(*row['final_loss'][:2])} | {shares} |")
    per_method: dict[str, dict[str, str]] = {}
    for r, described in zip(results, settings):
        if described:
            per_method.setdefault(r.method, described)
    if per_method:
        lines += ["", "What each method trained (its runs' config.yaml): adapter rank(s) (AdaLoRA: initial->target), "
                  "alpha(s), effective scaling (alpha/sqrt(r) with rsLoRA, else alpha/r; AdaLoRA alpha/initial r), "
                  "one value per LoRA expert; empty lr or lora_lr: the method does not use it.", "",
                  "| method | ranks | alphas | rsLoRA | scaling | dropout | trainable parameters | lr | lora_lr |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for method, d in per_method.items():
            trainable = f"{int(d['trainable_params']):,}" if d["trainable_params"] else ""
            lines.append(f"| {method} | {d['ranks']} | {d['alphas']} | {d['rslora']} | {d['scaling']} | "
                         f"{d['dropout']} | {trainable} | {d['lr']} | {d['lora_lr']} |")
    lines += ["", f"## Gap to the better of FFT and LoRA (`{metric}`; + is better)", ""]
    for method in MOLF_METHODS:
        if method in table:
            gap = gap_percent(table, method, metric)
            if gap is None:
                lines.append(f"- {method}: n/a (needs fft and/or lora in --methods)")
            else:
                within = f"within {WITHIN_PERCENT:g}% or better" if gap >= -WITHIN_PERCENT else \
                    f"more than {WITHIN_PERCENT:g}% worse"
                lines.append(f"- {method}: {gap:+.2f}% ({within})")
    if "molf-e" in table and "adalora" in table and table["adalora"][metric][2] and table["molf-e"][metric][2]:
        diff = table["molf-e"][metric][0] - table["adalora"][metric][0]
        verdict = "better than" if direction(metric) * diff > 0 else "not better than"
        lines.append(f"- molf-e - adalora: {diff:+.4f} ({verdict} AdaLoRA)")
    molf_runs = [r for r in results if r.method in MOLF_METHODS]
    if molf_runs:
        lines += ["", "## Routing per MoLF / MoLF-E run", "",
                  "Share of routing decisions (modules x steps) each expert won; \"degenerate routing\": one expert "
                  f"took more than {DEGENERATE:.0%}, so the run was effectively that expert alone.", "",
                  f"| run | {metric} | shares | |", "| --- | --- | --- | --- |"]
        for r in molf_runs:
            share = ", ".join(f"{e} {v:.1%}" for e, v in r.routing.items()) or "(no routing recorded)"
            lines.append(f"| {r.method} seed {r.seed} | {_fmt(r.scores.get(metric))} | {share} | "
                         f"{'**degenerate routing**' if r.degenerate else ''} |")
    failed = [r for r in results if r.status != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {r.method} seed {r.seed}: {r.status}" for r in failed]
    lines += ["", "## Plots", ""] + [f"- ![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Per-run numbers: `comparison.csv`; run directories: `runs/`; logs: `logs/`.", ""]
    md_path = out / MD_NAME
    md_path.write_text("\n".join(lines))
    return [md_path, csv_path, *plots]


def run_settings(results: list[RunResult]) -> list[dict[str, str]]:
    """compare_settings.describe of each run's config.yaml ({} without one, or one this version cannot read);
    the trainable parameters counted once per distinct model and method setup."""
    counted: dict[str, int | None] = {}
    described = []
    for r in results:
        try:
            config = saved_config(r.config) if r.config else None
        except (ConfigError, KeyError, TypeError):
            config = None
        if config is None:
            described.append({})
            continue
        key = json.dumps([r.config.get(k) for k in ("model", "method", "molf", "lora")], sort_keys=True, default=str)
        if key not in counted:
            counted[key] = trainable_parameters(config)
        described.append(describe(config, counted[key]))
    return described


def _mean_routing(runs: list[RunResult]) -> str:
    with_routing = [r for r in runs if r.routing]
    if not with_routing:
        return ""
    experts = list(dict.fromkeys(e for r in with_routing for e in r.routing))
    return ", ".join(f"{e} {statistics.fmean(r.routing.get(e, 0.0) for r in with_routing):.1%}" for e in experts)


def _fmt(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _fmt_csv(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def _pm(mean: float, std: float) -> str:
    return "" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def write_plots(results: list[RunResult], table: dict, out: Path, metric: str) -> list[Path]:
    import matplotlib  # deferred: slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    written = []

    figure, axes = plt.subplots(figsize=(max(5, 1.2 * len(methods) + 2), 4))
    means = [table[m][metric][0] for m in methods]
    stds = [table[m][metric][1] for m in methods]
    axes.bar(range(len(methods)), [0 if math.isnan(v) else v for v in means], yerr=stds, capsize=4,
             color=[colours[m] for m in methods], alpha=0.7)
    for i, m in enumerate(methods):
        values = [r.scores[metric] for r in results if r.method == m and metric in r.scores]
        axes.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    axes.set_xticks(range(len(methods)), methods)
    axes.set(ylabel=metric, title=f"{metric} after training (mean ± std over seeds; dots: runs)")
    axes.grid(axis="y", alpha=0.3)
    written.append(_save(figure, out / PLOTS["metric"], plt))

    figure, axes = plt.subplots(figsize=(8, 4.5))
    seen = set()
    for r in results:
        if r.losses:
            steps, losses = zip(*r.losses)
            axes.plot(steps, _smooth(list(losses)), color=colours[r.method], linewidth=1.1, alpha=0.85,
                      label=None if r.method in seen else r.method)
            seen.add(r.method)
    axes.set(xlabel="optimizer step", ylabel="training loss (smoothed)", title="Training loss")
    axes.grid(alpha=0.3)
    if seen:
        axes.legend()
    written.append(_save(figure, out / PLOTS["loss"], plt))

    figure, axes = plt.subplots(figsize=(8, 4.5))
    any_line = False
    for r in results:
        if not r.routing_curve:
            continue
        expert = "full" if "full" in r.routing_curve[0][1] else list(r.routing_curve[0][1])[0]
        steps = [s for s, _ in r.routing_curve]
        shares = [shares.get(expert, 0.0) for _, shares in r.routing_curve]
        axes.plot(steps, _smooth(shares), color=colours[r.method], linestyle="-" if expert == "full" else "--",
                  linewidth=1.1, label=f"{r.method} seed {r.seed}: {expert}")
        any_line = True
    axes.set(xlabel="optimizer step", ylabel="share of modules routed", ylim=(-0.02, 1.02),
             title="Routing share of `full` over training (MoLF-E: its first LoRA expert, dashed)")
    axes.grid(alpha=0.3)
    if any_line:
        axes.legend(fontsize=7)
    written.append(_save(figure, out / PLOTS["routing"], plt))
    return written


def _smooth(values: list[float]) -> list[float]:
    window = max(1, len(values) // 40)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _save(figure: Any, path: Path, plt: Any) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
