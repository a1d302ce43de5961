"""Merge the ranks' measurements into one row per cell, compute the ratios, and render text, markdown and plots."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

MIB = 2**20


def _median_of_max(per_rank: list[list[dict]], key: str, stat=statistics.median) -> float:
    """Per step the slowest rank (a step ends when every rank is done), then the median (or `stat`) over steps."""
    steps = zip(*(r for r in per_rank))
    return stat(max(s[key] for s in step) for step in steps)


def merge(ranks: list[dict[str, Any]], timed: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One row from the per-rank results of one cell: memory and isolated optimizer steps from its own run
    (`ranks`), step times and collectives from `timed` (its steps in the run beside its baseline) when given,
    from its own run otherwise."""
    first = ranks[0]
    row: dict[str, Any] = {k: first[k] for k in ("cell", "stage", "offload", "method")}
    errors = [r["error"] for r in ranks + (timed or []) if "error" in r]
    if errors:
        row["error"] = errors[0]
        return row
    row["interleaved"] = timed is not None
    if timed is not None:
        row["alone_step_ms"] = 1e3 * _median_of_max([r["steps"] for r in ranks], "step_s")
        first = {**first, **timed[0]}
    per_rank = [r["steps"] for r in (timed or ranks)]
    by_step = [1e3 * max(s["step_s"] for s in step) for step in zip(*per_rank)]  # the slowest rank, ms
    step_ms = statistics.median(by_step)
    row.update(
        optimizer=first["optimizer"], trainable_params=first["trainable_params"], world=first["world"],
        measured_steps=len(first["steps"]),
        step_ms=step_ms, tokens_per_s=1e3 * first["tokens_per_step"] / step_ms, step_ms_min=min(by_step),
        step_ms_by_step=by_step,
        step_cpu_ms=1e3 * _median_of_max(per_rank, "step_cpu_s"),
        engine_step_cpu_ms=1e3 * _median_of_max(per_rank, "engine_step_cpu_s"),
        optimizer_cpu_ms=1e3 * _median_of_max(per_rank, "optimizer_cpu_s"),
        engine_step_ms_min=1e3 * _median_of_max(per_rank, "engine_step_s", min),
        forward_backward_ms=1e3 * _median_of_max(per_rank, "forward_backward_s"),
        engine_step_ms=1e3 * _median_of_max(per_rank, "engine_step_s"),
        optimizer_ms=1e3 * _median_of_max(per_rank, "optimizer_s"),
        peak_rss_mib=max(r["peak_rss_bytes"] for r in ranks) / MIB,
        peak_rss_total_mib=sum(r["peak_rss_bytes"] for r in ranks) / MIB,
        peak_rss_above_start_mib=max(r["peak_rss_bytes"] - r.get("rss_start_bytes", 0) for r in ranks) / MIB,
        rss_start_mib=max(r.get("rss_start_bytes", 0) for r in ranks) / MIB,
        peak_rss_built_mib=max(r.get("peak_rss_built_bytes", 0) for r in ranks) / MIB,
        rss_built_mib=max(r.get("rss_built_bytes", 0) for r in ranks) / MIB,
        huge_page_mib=min(r["huge_page_bytes"] for r in ranks) / MIB,
        loss=statistics.fmean(s["loss"] for s in first["steps"]),
    )
    if "peak_gpu_bytes" in first:
        row["peak_gpu_mib"] = max(r["peak_gpu_bytes"] for r in ranks) / MIB
    steps0 = first["steps"]
    row["collectives_per_step"] = statistics.median(s["collectives"] for s in steps0)
    row["collective_mib_per_step"] = statistics.median(s["collective_bytes"] for s in steps0) / MIB
    row["engine_step_collectives"] = steps0[-1]["step_collectives"]  # [name, bytes] of rank 0's last step
    # Optimizer traffic in training, rank 0 (each rank steps its own partition on its own core).
    opt_s = statistics.median(s["optimizer_s"] for s in steps0)
    opt_bytes = statistics.median(s["optimizer_bytes"] for s in steps0)
    row["optimizer_rank0_ms"] = 1e3 * opt_s
    row["optimizer_mb_per_step"] = opt_bytes / 1e6
    row["optimizer_gb_per_s"] = opt_bytes / opt_s / 1e9 if opt_s > 0 else math.nan
    if all("isolated" in r for r in ranks):  # the same flat tensors, interleaved with the AdamW references
        iso = ranks[0]["isolated"]
        row["isolated_ms"] = {name: 1e3 * sec for name, sec in iso["seconds"].items()}
        row["isolated_ms_min"] = {name: 1e3 * sec for name, sec in iso["min_seconds"].items()}
        row["isolated_cpu_ms"] = {name: 1e3 * sec for name, sec in iso["cpu_seconds"].items()}
        row["isolated_gb_per_s"] = {name: iso["bytes"][name] / sec / 1e9 for name, sec in iso["seconds"].items()}
        row["isolated_mb_per_step"] = iso["bytes"]["own"] / 1e6
        ratios, ratios_min, ratios_cpu = [], [], []
        for r in ranks:
            for key, out in (("seconds", ratios), ("min_seconds", ratios_min), ("cpu_seconds", ratios_cpu)):
                refs = {n: sec for n, sec in r["isolated"][key].items() if n != "own"}
                if refs:
                    out.append(r["isolated"][key]["own"] / min(refs.values()))
        if ratios:
            row["optimizer_vs_best_adamw_min"] = max(ratios_min)  # the same on each method's fastest step
            row["optimizer_vs_best_adamw_cpu"] = max(ratios_cpu)  # and on CPU time
            refs0 = {n: sec for n, sec in iso["seconds"].items() if n != "own"}
            row["best_adamw"] = min(refs0, key=refs0.get)
            row["optimizer_vs_best_adamw"] = max(ratios)  # the slowest rank against its own best reference
            row["optimizer_vs_best_adamw_per_rank"] = ratios
        if "routing_shares" in iso:
            row["isolated_routing_shares"] = iso["routing_shares"]
    if "routing_shares" in first:
        row["routing_shares"] = first["routing_shares"]
    return row


def floors(params: int, lora_per_rank: int, molf_ranks: tuple[int, ...], molf_e_ranks: tuple[int, ...],
           lora_rank: int) -> dict[str, float]:
    """The compute floor of each method against its baseline: the ratio of their training-step FLOPs per token.
    A weight of N elements that trains costs 6N (forward 2N, input gradient 2N, weight gradient 2N), a frozen one
    4N (no weight gradient); attention's sequence-squared terms, norms, the loss and the optimizer are left out.
    P = the model's parameters (tied weights once), L(r) = lora_per_rank x r (A and B of every target linear):
    MoLF / FFT = 6(P + L(molf ranks)) / 6P; MoLF-E / LoRA = (4P + 6L(molf-e ranks)) / (4P + 6L(lora rank)),
    1 where LoRA's rank is their sum (the bench's LoRA)."""
    frozen_base = lambda rank: 4 * params + 6 * lora_per_rank * rank  # noqa: E731
    return {"molf": 1 + lora_per_rank * sum(molf_ranks) / params,
            "molf-e": frozen_base(sum(molf_e_ranks)) / frozen_base(lora_rank)}


def mode_name(stage: int, offload: bool) -> str:
    return f"ZeRO-{stage}{' + offload' if offload else ''}"


def add_ratios(rows: list[dict[str, Any]], method_floors: dict[str, float] | None = None) -> None:
    """Step time, optimizer time and peak memory of every row against FFT and LoRA of the same mode; with
    `method_floors` (see `floors`), each MoLF row's floor against its baseline and its step ratio over it."""
    by_mode: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_mode.setdefault((row["stage"], row["offload"]), {})[row["method"]] = row
    for methods in by_mode.values():
        for row in methods.values():
            if "error" in row:
                continue
            ratios = {}
            for base in ("fft", "lora"):
                ref = methods.get(base)
                if ref is None or "error" in ref:
                    continue
                ratios[f"step_vs_{base}"] = row["step_ms"] / ref["step_ms"]
                ratios[f"step_min_vs_{base}"] = row["step_ms_min"] / ref["step_ms_min"]
                ratios[f"step_cpu_vs_{base}"] = row["step_cpu_ms"] / ref["step_cpu_ms"]
                ratios[f"engine_step_cpu_vs_{base}"] = row["engine_step_cpu_ms"] / ref["engine_step_cpu_ms"]
                ratios[f"engine_step_vs_{base}"] = row["engine_step_ms"] / ref["engine_step_ms"]
                ratios[f"optimizer_vs_{base}"] = row["optimizer_ms"] / ref["optimizer_ms"]
                ratios[f"peak_rss_vs_{base}"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
                ratios[f"collectives_minus_{base}"] = row["collectives_per_step"] - ref["collectives_per_step"]
                if ref is not row and ref["cell"] in row.get("interleaved_with", ()):
                    ratios.update(_paired(row, ref, base))
            floor = (method_floors or {}).get(row["method"])
            base = "fft" if row["method"] == "molf" else "lora"
            step = ratios.get(f"step_paired_vs_{base}", ratios.get(f"step_vs_{base}"))
            if floor is not None and step is not None:
                ratios["floor"], ratios["step_over_floor"] = floor, step / floor
            row["ratios"] = ratios


def _paired(row: dict[str, Any], ref: dict[str, Any], base: str) -> dict[str, Any]:
    """Step time against a baseline trained in turn with it: the ratio of each step to the baseline's step next
    to it, median and quartiles. A drift of the machine's speed over the run cancels out of each ratio, which
    the ratio of the two medians does not ensure."""
    if len(row["step_ms_by_step"]) < 2:
        return {}
    median, quartiles = paired_ratio(row["step_ms_by_step"], ref["step_ms_by_step"])
    return {f"step_paired_vs_{base}": median, f"step_paired_quartiles_vs_{base}": quartiles}


def paired_ratio(times: list[float], base_times: list[float]) -> tuple[float, list[float]]:
    """Median and [first, third] quartiles of times[i] / base_times[i] (quartiles interpolated; one pair: its
    ratio for all three)."""
    ratios = [t / b for t, b in zip(times, base_times)]
    if len(ratios) == 1:
        return ratios[0], ratios * 2
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, [q1, q3]


def _fmt_paired(ratios: dict[str, Any]) -> str:
    for base in ("fft", "lora"):
        if f"step_paired_vs_{base}" in ratios:
            q1, q3 = ratios[f"step_paired_quartiles_vs_{base}"]
            return f"{ratios[f'step_paired_vs_{base}']:.2f} ({q1:.2f}-{q3:.2f})"
    return "-"


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _shares(row: dict) -> str:
    shares = row.get("routing_shares")
    return " ".join(f"{e} {v:.2f}" for e, v in shares.items()) if shares else "-"


def step_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["mode", "method", "step ms", "tokens/s", "x FFT", "x LoRA", "paired x baseline (quartiles)", "floor",
            "/ floor", "CPU x FFT",
            "CPU x LoRA", "fwd+bwd ms", "engine.step ms", "peak MiB", "x FFT mem", "collectives/step", "MiB/step"]
    body = []
    for r in rows:
        mode = mode_name(r["stage"], r["offload"])
        if "error" in r:
            body.append([mode, r["method"], "error: " + r["error"][:60]] + [""] * (len(head) - 3))
            continue
        q = r.get("ratios", {})
        body.append([
            mode, r["method"], _fmt(r["step_ms"], ".1f"), _fmt(r["tokens_per_s"], ".0f"),
            _fmt(q.get("step_vs_fft")), _fmt(q.get("step_vs_lora")), _fmt_paired(q), _fmt(q.get("floor")),
            _fmt(q.get("step_over_floor")),
            _fmt(q.get("step_cpu_vs_fft")), _fmt(q.get("step_cpu_vs_lora")), _fmt(r["forward_backward_ms"], ".1f"),
            _fmt(r["engine_step_ms"], ".1f"),
            _fmt(r.get("peak_gpu_mib", r["peak_rss_mib"]), ".0f"), _fmt(q.get("peak_rss_vs_fft")),
            _fmt(r["collectives_per_step"], ".0f"), _fmt(r["collective_mib_per_step"], ".2f"),
        ])
    return head, body


def optimizer_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["mode", "method", "optimizer", "train opt ms", "isolated ms", "MB/step", "GB/s", "DeepSpeedCPUAdam GB/s",
            "torch fused GB/s", "x best AdamW", "(min)", "(CPU)", "routing shares"]
    body = []
    for r in rows:
        if "error" in r:
            continue
        gbps, ms = r.get("isolated_gb_per_s", {}), r.get("isolated_ms", {})
        ds = gbps.get("deepspeed_cpu_adam", gbps.get("deepspeed_fused_adam"))
        body.append([
            mode_name(r["stage"], r["offload"]), r["method"], r["optimizer"], _fmt(r["optimizer_ms"]),
            _fmt(ms.get("own")), _fmt(r.get("isolated_mb_per_step"), ".1f"), _fmt(gbps.get("own"), ".1f"),
            _fmt(ds, ".1f"), _fmt(gbps.get("torch_adamw_fused"), ".1f"), _fmt(r.get("optimizer_vs_best_adamw")),
            _fmt(r.get("optimizer_vs_best_adamw_min")), _fmt(r.get("optimizer_vs_best_adamw_cpu")), _shares(r),
        ])
    return head, body


def text_table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    for b in body:
        lines.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths))))
    return "\n".join(lines)


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(lines)


def markdown(report: dict[str, Any], command: str | None = None) -> str:
    s = report["settings"]
    parts = []
    if command:
        parts.append(f"`{command}`\n")
    parts.append(
        f"Model {s['model']} ({report['rows'][0].get('trainable_params', '?')} trainable params for the first row), "
        f"{report['world']} ranks on {s['device']}, {s['dtype']}, micro-batch {s['micro_batch']} x {s['seq']} tokens "
        f"per rank, median of {s['steps']} steps after {s['warmup']} warm-up; MoLF ranks {s['molf_ranks']}, "
        f"MoLF-E ranks {s['molf_e_ranks']}, LoRA rank {sum(s['molf_e_ranks'])}; CPU tensors on "
        f"{'huge' if report.get('huge_pages') else '4 KiB'} pages. Load average before / after: "
        f"{_load(report, 'before')} / {_load(report, 'after')}."
        + (" Step times: each method trained in turn with its baseline in the same ranks (FFT with MoLF, LoRA with "
           "MoLF-E); `x LoRA` of FFT and MoLF, `x FFT` of LoRA and MoLF-E compare separate runs. `paired x baseline`: "
           "the median of each step's ratio to the baseline's step beside it, quartiles in parentheses." if
           report.get("interleaved") else "")
        + " `floor`: the method's training-step FLOPs over its baseline's (6 per trained and 4 per frozen parameter "
          "and token; docs/performance.md); `/ floor`: the paired ratio (else the ratio of medians) over it.\n"
    )
    parts.append("Training step\n\n" + markdown_table(*step_table(report["rows"])) + "\n")
    parts.append("Optimizer step: `train opt ms` is the basic optimizer's time inside engine.step() (slowest rank); "
                 "`isolated` steps the same flat tensors again, interleaved with DeepSpeedCPUAdam and torch's fused "
                 "AdamW on tensors of the same sizes, caches flushed before each step (rank 0's numbers; "
                 "`x best AdamW` is the slowest rank's ratio to its fastest reference)\n\n"
                 + markdown_table(*optimizer_table(report["rows"])) + "\n")
    return "\n".join(parts)


def _load(report: dict[str, Any], when: str) -> str:
    values = report.get("machine", {}).get(f"load_average_{when}")
    return " ".join(f"{v:.1f}" for v in values) if values else "?"


def text(report: dict[str, Any]) -> str:
    return "\n\n".join([text_table(*step_table(report["rows"])), text_table(*optimizer_table(report["rows"]))])


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """Bar charts: step time x FFT, optimizer GB/s beside the AdamW references, peak memory. Returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r]
    modes = sorted({(r["stage"], r["offload"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    get = {(r["stage"], r["offload"], r["method"]): r for r in rows}
    width = 0.8 / max(1, len(methods))
    paths = []

    def bars(title: str, ylabel: str, value, name: str, refs: dict[str, Any] | None = None) -> None:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(modes)), 4))
        for j, method in enumerate(methods):
            ys = [value(get[(*m, method)]) if (*m, method) in get else math.nan for m in modes]
            ax.bar([i + j * width for i in range(len(modes))], ys, width, label=method)
        for label, fn in (refs or {}).items():
            ys = [fn([get[(*m, me)] for me in methods if (*m, me) in get]) for m in modes]
            ax.scatter([i + 0.4 - width / 2 for i in range(len(modes))], ys, marker="_", s=600, label=label,
                       zorder=3)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(modes))], [mode_name(*m) for m in modes], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    bars("Training step time against FFT", "x FFT", lambda r: r.get("ratios", {}).get("step_vs_fft", math.nan),
         "step_vs_fft.png")
    def best_reference(rs: list[dict]) -> float:
        values = [v for r in rs for n, v in r.get("isolated_gb_per_s", {}).items() if n != "own"]
        return max(values, default=math.nan)

    bars("Optimizer step memory traffic (rank 0, isolated)", "GB/s",
         lambda r: r.get("isolated_gb_per_s", {}).get("own", math.nan), "optimizer_gbps.png",
         refs={"best plain AdamW": best_reference})
    bars("Peak memory per rank", "MiB", lambda r: r.get("peak_gpu_mib", r["peak_rss_mib"]), "peak_memory.png")
    return paths
