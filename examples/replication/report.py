"""Issue 19's replication helpers (run.sh, fact_rerun.sh, lowrank.sh and lora_regimes.sh call them).

    python examples/replication/report.py select DIR... --variants fft,lora --table T.md --sets T.txt  # lrs
    python examples/replication/report.py routing DIR... --output routing.md   # shares per projection type
    python examples/replication/report.py summary DIR... --base base.json --output summary.md  # the results table
    python examples/replication/report.py pilots ROOT --output summary.md  # lora_regimes.sh's candidates

DIR is a `molf-ds compare` output directory. `select` reads every run under DIR/runs/ (its config.yaml and its final
evaluation), writes the table of every setting tried and its score, and writes `--set=METHOD:train.lr=...` and
`--set=METHOD:train.lora_lr=...` for each variant's best setting, one a line, for `molf-ds compare` (a file, not
stdout: importing molf_ds prints DeepSpeed's accelerator notice there); `routing` writes its table likewise;
`summary` writes each variant's mean ± std over seeds of every metric and of the score, its lrs and wall time, the
MoLF variants' gaps to the better of FFT and LoRA (per metric and score), MoLF-E minus AdaLoRA, and every MoLF
variant's paired per-seed differences against FFT, LoRA and AdaLoRA with 95% intervals and the verdict they give;
`pilots` writes one row per run of lora_regimes.sh's candidates (dev score, LoRA minus FFT, forgetting). A
variant is the method, or `molf-e-eq` for MoLF-E whose experts share one scaling. The score is the harmonic mean of
the task's metrics (for `fact`, CounterFact's Score over efficacy, paraphrase and neighborhood; for `sql`, exact
match); ties go to the lower final training loss.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from molf_ds.commands.compare import WITHIN_PERCENT, RunResult, collect, gap_percent
from molf_ds.commands.run_dir import CONFIG, METRICS
from molf_ds.commands.train.data import TASKS


ORDER = ["fft", "lora", "lora-rest", "adalora", "molf", "molf-e", "molf-e-eq"]  # every variant, in report order


def variant(config: dict[str, Any]) -> str:
    """The method, or `molf-e-eq` where every MoLF-E expert has the same rsLoRA scaling alpha / sqrt(r)."""
    method = config["method"]
    if method != "molf-e":
        return method
    molf = config["molf"]
    scalings = {round(a / math.sqrt(r), 6) for a, r in zip(molf["lora_alphas"], molf["lora_ranks"])}
    return "molf-e-eq" if len(scalings) == 1 else method


def runs(directories: list[Path]) -> list[tuple[dict[str, Any], RunResult]]:
    """(config, result) of every run under each directory's runs/, in a stable order."""
    found = []
    for run_dir in sorted(d for directory in directories for d in directory.glob("runs/*")):
        if (run_dir / CONFIG).is_file():
            config = yaml.safe_load((run_dir / CONFIG).read_text())
            found.append((config, collect(config["method"], config["train"]["seed"], run_dir)))
    return found


def labelled(directories: list[Path]) -> list[tuple[str, dict[str, Any], RunResult]]:
    """(label, config, result) of every finished run, in ORDER and then the directories' order. The label is the
    variant, with the directory's name added where an earlier directory has that variant already (a supplementary
    comparison, e.g. MoLF at other lrs)."""
    found, first = [], {}
    for i, directory in enumerate(directories):
        for config, result in runs([directory]):
            name = variant(config)
            first.setdefault(name, directory)
            label = name if first[name] == directory else f"{name} ({directory.name})"
            if result.status == "ok":
                found.append(((ORDER.index(name), i), label, config, result))
    return [(label, config, result) for _, label, config, result in sorted(found, key=lambda item: item[0])]


def score(result: RunResult, metrics: tuple[str, ...]) -> float:
    values = [result.scores.get(m, math.nan) for m in metrics]
    if any(math.isnan(v) for v in values):
        return math.nan
    return 0.0 if min(values) == 0 else len(values) / sum(1 / v for v in values)


def _rank(row: tuple) -> tuple[float, float]:
    """Higher is better: the score, then the lower final loss; NaN last."""
    value, loss = row[3], row[4].final_loss
    return (-math.inf if math.isnan(value) else value, -math.inf if math.isnan(loss) else -loss)


def select(directories: list[Path], wanted: list[str], table: Path, sets_file: Path) -> int:
    found = [(c, r) for c, r in runs(directories) if r.status == "ok"]
    if not found:
        print("report.py select: no finished runs", file=sys.stderr)
        return 1
    tasks = {c["data"]["task"] for c, _ in found}
    if len(tasks) > 1:
        print(f"report.py select: runs of several tasks: {sorted(tasks)}", file=sys.stderr)
        return 1
    metrics = TASKS[tasks.pop()].metrics
    rows = sorted(((variant(c), c["train"]["lr"], c["train"]["lora_lr"], score(r, metrics), r) for c, r in found),
                  key=lambda row: (row[0], row[1], row[2]))
    best: dict[str, tuple] = {}
    for row in rows:
        if row[0] not in best or _rank(row) > _rank(best[row[0]]):
            best[row[0]] = row
    lines = ["# lr selection on the dev split", "", f"Score: harmonic mean of {', '.join(metrics)}; one seed per "
             "setting; chosen: the highest score (ties: the lower final loss).", "",
             f"| variant | lr | lora_lr | {' | '.join(metrics)} | score | final loss | chosen |",
             "| --- | --- | --- |" + " --- |" * len(metrics) + " --- | --- | --- |"]
    for row in rows:
        name, lr, lora_lr, value, result = row
        lines.append(f"| {name} | {lr:g} | {lora_lr:g} | " + " | ".join(f"{result.scores[m]:.4f}" for m in metrics)
                     + f" | {value:.4f} | {result.final_loss:.4f} | {'**yes**' if best[name] is row else ''} |")
    table.write_text("\n".join(lines) + "\n")
    missing = [w for w in wanted if w not in best]
    if missing:
        print(f"report.py select: no finished run of {', '.join(missing)}", file=sys.stderr)
        return 1
    sets = []
    for name in wanted:
        method = "molf-e" if name == "molf-e-eq" else name
        sets += [f"--set={method}:train.lr={best[name][1]!r}", f"--set={method}:train.lora_lr={best[name][2]!r}"]
    sets_file.write_text("\n".join(sets) + "\n")
    return 0


def routing(directories: list[Path], output: Path) -> int:
    """Writes a markdown table: per MoLF variant, each expert's share of all decisions and the first expert's share per
    projection type, mean ± std over seeds (each seed's share is its mean over steps)."""
    per_variant: dict[str, list[dict[str, dict[str, float]]]] = {}
    for label, _, result in labelled(directories):
        if not result.routing:
            continue
        records = [json.loads(line) for line in (result.out / METRICS).read_text().splitlines()]
        by_type = [r["routing_by_type"] for r in records if "routing_by_type" in r]
        shares = {"all": result.routing}
        shares.update({kind: {e: statistics.fmean(step[kind][e] for step in by_type) for e in by_type[0][kind]}
                       for kind in by_type[0]})
        per_variant.setdefault(label, []).append(shares)
    if not per_variant:
        print("report.py routing: no finished MoLF / MoLF-E runs", file=sys.stderr)
        return 1
    kinds = [k for k in next(iter(per_variant.values()))[0] if k != "all"]
    lines = [f"| variant | seeds | share of decisions | {' | '.join(kinds)} |",
             "| --- | --- | --- |" + " --- |" * len(kinds)]
    for name, seeds in per_variant.items():
        experts = list(seeds[0]["all"])
        overall = ", ".join(f"{e} {_pm([s['all'][e] for s in seeds])}" for e in experts)
        lines.append(f"| {name} | {len(seeds)} | {overall} | " + " | ".join(_pm([s[k][experts[0]] for s in seeds])
                                                                           for k in kinds) + " |")
    lines += ["", "Per projection type: the share of the first expert (`full`; MoLF-E: `lora0`, r=32)."]
    output.write_text("\n".join(lines) + "\n")
    return 0


def summary(directories: list[Path], base: Path | None, output: Path) -> int:
    found = labelled(directories)
    if not found:
        print("report.py summary: no finished runs", file=sys.stderr)
        return 1
    metrics = TASKS[found[0][1]["data"]["task"]].metrics
    columns = [*metrics, "score"]
    per_variant: dict[str, list[tuple[dict[str, Any], RunResult]]] = {}
    for label, config, result in found:
        per_variant.setdefault(label, []).append((config, result))
    values = {name: {c: [score(r, metrics) if c == "score" else r.scores[c] for _, r in rows] for c in columns}
              for name, rows in per_variant.items()}
    mean = {name: {c: statistics.fmean(v) for c, v in cols.items()} for name, cols in values.items()}
    table = {name: {c: (m, 0.0, len(values[name][c])) for c, m in cols.items()} for name, cols in mean.items()}
    lines = [f"| variant | seeds | {' | '.join(columns)} | lr / LoRA lr | minutes a run |",
             "| --- | --- |" + " --- |" * len(columns) + " --- | --- |"]
    if base is not None:
        scores = json.loads(base.read_text())
        scores["score"] = score(RunResult("base", 0, base, scores=scores), metrics)
        lines.append("| base model | - | " + " | ".join(f"{scores[c]:.3f}" for c in columns) + " | - | - |")
    for name, rows in per_variant.items():
        train = rows[0][0]["train"]
        minutes = statistics.fmean(r.wall_s for _, r in rows) / 60
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(_pm(values[name][c], ".3f") for c in columns)
                     + f" | {train['lr']:g} / {train['lora_lr']:g} | {minutes:.1f} |")
    if "fft" in mean and "lora" in mean:
        lines += ["", "Gap to the better of FFT and LoRA, in percent of it (mean over seeds; within "
                  f"{WITHIN_PERCENT:g}% or better marked **yes**):", "", f"| variant | {' | '.join(columns)} |", "| --- |" + " --- |" * len(columns)]
        for name in (n for n in per_variant if n.startswith("molf")):
            cells = []
            for c in columns:
                gap = gap_percent(table, name, c)
                cells.append(f"{gap:+.1f}%{' **yes**' if gap >= -WITHIN_PERCENT else ''}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "adalora" in mean:
        lines += ["", "MoLF-E minus AdaLoRA (difference of the means):", ""]
        lines += [f"- {name}: " + ", ".join(f"{c} {mean[name][c] - mean['adalora'][c]:+.3f}" for c in columns)
                  for name in ("molf-e", "molf-e-eq") if name in mean]
    lines += paired_tables(per_variant, metrics, columns)
    output.write_text("\n".join(lines) + "\n")
    return 0


FORGETTING = "forgetting.json"  # a run's fact neighbourhood scores (lora_regimes.sh), beside its config.yaml


def pilots(root: Path, output: Path) -> int:
    """One row per run of each compare directory under `root` (lora_regimes.sh's candidates): its setting, its score
    on the dev split and LoRA's lead over FFT there; the fact neighbourhood it kept, where measured."""
    base = root / "base.json"
    kept = json.loads(base.read_text())["neighborhood"] if base.is_file() else math.nan
    lines = ["| candidate | method | steps | LoRA rank | lr | dev score | LoRA minus FFT | final loss "
             f"| neighbourhood kept (base {kept:.3f}) |", "| --- |" + " --- |" * 8]
    directories = sorted(d for d in root.iterdir() if (d / "runs").is_dir())
    if not directories:
        print(f"report.py pilots: no compare directories under {root}", file=sys.stderr)
        return 1
    for directory in directories:
        found = {c["method"]: (c, r) for c, r in runs([directory]) if r.status == "ok"}
        values = {m: score(r, TASKS[c["data"]["task"]].metrics) for m, (c, r) in found.items()}
        lead = f"{values['lora'] - values['fft']:+.3f}" if {"fft", "lora"} <= values.keys() else ""
        for method, (config, result) in found.items():
            rank = config["lora"]["r"] if method == "lora" else ""
            forgetting = result.out / FORGETTING
            neighbourhood = json.loads(forgetting.read_text())["neighborhood"] if forgetting.is_file() else None
            lines.append(f"| {directory.name} | {method} | {config['train']['max_steps']} | {rank} | "
                         f"{config['train']['lr']:g} | {values[method]:.3f} | {lead if method == 'lora' else ''} | "
                         f"{result.final_loss:.4f} | {'' if neighbourhood is None else f'{neighbourhood:.3f}'} |")
    output.write_text("\n".join(lines) + "\n")
    return 0


# t quantile 0.975 by degrees of freedom (a 95% two-sided interval); 1.96 past the table
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-seed differences with its 95% t interval (degenerate with one seed)."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, math.nan, math.nan
    half = T975.get(len(differences) - 1, 1.96) * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    """The paper's tolerance read from a paired interval in percent of the reference."""
    if math.isnan(low):
        return "one seed"
    if low >= -WITHIN_PERCENT:
        return "**within**"
    return "below" if high < -WITHIN_PERCENT else "undecided"


def paired_tables(per_variant: dict[str, list[tuple[dict[str, Any], RunResult]]], metrics: tuple[str, ...],
                  columns: list[str]) -> list[str]:
    """Per-seed differences (every method sees the same data order per seed) of each MoLF variant against FFT,
    LoRA and AdaLoRA, in percent of the reference's mean over the paired seeds, with 95% intervals; the verdict
    against the tolerance reads the interval (within: its low end at or above -1.5%; below: its high end under)."""
    def by_seed(name: str) -> dict[int, dict[str, float]]:
        return {r.seed: {c: score(r, metrics) if c == "score" else r.scores[c] for c in columns}
                for _, r in per_variant[name]}

    references = [name for name in ("fft", "lora", "adalora") if name in per_variant]
    if not references:
        return []
    lines = ["", "Paired per-seed differences, in percent of the reference (mean [95% interval]; verdict against "
             f"-{WITHIN_PERCENT:g}% from the interval: **within**, below or undecided):", "",
             f"| variant | against | seeds | {' | '.join(columns)} |", "| --- | --- | --- |" + " --- |" * len(columns)]
    for name in (n for n in per_variant if n.startswith("molf")):
        ours = by_seed(name)
        for reference in references:
            theirs = by_seed(reference)
            seeds = sorted(set(ours) & set(theirs))
            if not seeds:
                continue
            cells = []
            for c in columns:
                base = statistics.fmean(theirs[s][c] for s in seeds)
                if base == 0:
                    cells.append("-")
                    continue
                mean, low, high = paired_interval([100.0 * (ours[s][c] - theirs[s][c]) / abs(base) for s in seeds])
                cells.append(f"{mean:+.1f}% [{low:+.1f}, {high:+.1f}] {verdict(low, high)}")
            lines.append(f"| {name} | {reference} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def _pm(values: list[float], spec: str = ".0%") -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{spec}} ± {std:{spec}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chooser = commands.add_parser("select", help="lrs per variant from the dev runs")
    chooser.add_argument("dirs", type=Path, nargs="+")
    chooser.add_argument("--variants", required=True, help="comma-separated, e.g. fft,lora,molf-e-eq")
    chooser.add_argument("--table", type=Path, required=True, help="the markdown table of every setting tried")
    chooser.add_argument("--sets", type=Path, required=True, help="where the chosen --set arguments go")
    shares = commands.add_parser("routing", help="routing shares per projection type")
    shares.add_argument("dirs", type=Path, nargs="+")
    shares.add_argument("--output", type=Path, required=True, help="the markdown table")
    results = commands.add_parser("summary", help="mean ± std per variant, gaps, MoLF-E minus AdaLoRA")
    results.add_argument("dirs", type=Path, nargs="+")
    results.add_argument("--base", type=Path, help="the base model's scores (molf-ds eval --output)")
    results.add_argument("--output", type=Path, required=True, help="the markdown tables")
    candidates = commands.add_parser("pilots", help="lora_regimes.sh's candidates: dev scores and forgetting")
    candidates.add_argument("root", type=Path, help="the directory of the candidates' compare directories")
    candidates.add_argument("--output", type=Path, required=True, help="the markdown table")
    args = parser.parse_args(argv)
    if args.command == "select":
        return select(args.dirs, args.variants.split(","), args.table, args.sets)
    if args.command == "summary":
        return summary(args.dirs, args.base, args.output)
    if args.command == "pilots":
        return pilots(args.root, args.output)
    return routing(args.dirs, args.output)


if __name__ == "__main__":
    sys.exit(main())
