"""CPU optimizer-step benchmark: MoLF kernels against DeepSpeedCPUAdam and torch AdamW.

One flat fp32 parameter of --numel elements, one thread and all threads, median (and
min) wall time of a step over --repeats; methods alternate within each repeat, so a
change of load on the machine hits all of them alike. GB/s counts the bytes each method
must move: grad read, m and v read+write, param read+write where written; the MoLF
winner update reads m and v a second time, the speculative one-pass step writes a backup
of the weights instead.

    python benchmarks/cpu_kernel.py --numel 20000000 --out bench_results/cpu_kernel.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch

from molf_ds.optim import kernels
from molf_ds.optim.kernels import cpp_impl

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
SEGMENT = 1 << 20
BYTES_FULL = 4 + 8 + 8 + 8  # grad r, m rw, v rw, param rw
BYTES_SCORE = 4 + 8 + 8  # moments + scores: grad r, m rw, v rw
BYTES_UPDATE = 4 + 4 + 8  # winner update: m r, v r, param rw
BYTES_SPECULATIVE = BYTES_SCORE + 8 + 4  # one pass: + param rw, backup w (streamed, no read for ownership)

Step = Callable[[], None]


def _param(numel: int) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel, generator=gen))
    p.grad = torch.randn(numel, generator=gen) * 1e-2
    return p


def _deepspeed(numel: int) -> Step:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    opt = DeepSpeedCPUAdam([_param(numel)], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True)
    return opt.step


def _torch_adamw(numel: int, **flags: bool) -> Step:
    return torch.optim.AdamW([_param(numel)], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **flags).step


def _manual(numel: int, update: Callable[..., None]) -> Step:
    """A step calling update(p, m, v, bias_correction1, bias_correction2) on fresh state."""
    p = _param(numel)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    counter = itertools.count(1)

    def step() -> None:
        t = next(counter)
        with torch.no_grad():
            update(p, m, v, 1 - BETAS[0] ** t, 1 - BETAS[1] ** t)

    return step


def _table(numel: int) -> kernels.SegmentTable:
    """One cell per ~1M-element segment of the parameter."""
    offsets = range(0, numel, SEGMENT)
    return kernels.SegmentTable([(0, o, min(SEGMENT, numel - o), cell, 0) for cell, o in enumerate(offsets)], [numel])


LRS, WDS, SCALE = (torch.tensor([x], dtype=torch.float64) for x in (LR, WD, 1.0))


def _on(backend: str) -> None:
    os.environ[kernels.ENV_VAR] = backend  # read by every kernel call: "auto" (C++ here) or "torch"


def _molf(backend: str, numel: int, winners: bool) -> Step:
    """The two-pass step: moments and scores, then the update of all (or no) segments."""
    table = _table(numel)
    cells = len(table.rows)
    won = torch.full((cells,), winners)

    def update(p, m, v, bc1: float, bc2: float) -> None:
        _on(backend)
        kernels.moments_and_scores_multi([p], [p.grad], [m], [v], table, SCALE, kernels.ScoreSums(cells), *BETAS,
                                         "epd")
        kernels.update_winners_multi([p], [m], [v], table, won, LRS, WDS, bc1, bc2, EPS)

    return _manual(numel, update)


def _molf_speculative(numel: int) -> Step:
    """The one-pass step with every guess right: moments, scores and the update of every segment, old weights into
    a backup (`speculative_update`); settle_multi then has nothing to do."""
    table = _table(numel)
    cells = len(table.rows)
    everywhere = torch.ones(cells, dtype=torch.bool)
    backup = torch.empty(numel)

    def update(p, m, v, bc1: float, bc2: float) -> None:
        _on("auto")
        sums = kernels.ScoreSums(cells)
        kernels.moments_scores_speculate_multi([p], [p.grad], [m], [v], [backup], table, SCALE, sums, everywhere, LRS,
                                               WDS, *BETAS, bc1, bc2, EPS, "epd")
        kernels.settle_multi([p], [m], [v], [backup], table, everywhere, everywhere, LRS, WDS, bc1, bc2, EPS)

    return _manual(numel, update)


def _cpp_adamw_step(numel: int) -> Step:
    def update(p, m, v, bc1: float, bc2: float) -> None:
        _on("auto")
        kernels.adamw_step_multi([p], [p.grad], [m], [v], LR, *BETAS, EPS, WD, bc1, bc2)

    return _manual(numel, update)


def _methods(numel: int) -> dict[str, tuple[Callable[[], Step], int]]:
    """name -> (factory, bytes moved per element)."""
    return {
        "deepspeed_cpu_adam": (lambda: _deepspeed(numel), BYTES_FULL),
        "torch_adamw_fused": (lambda: _torch_adamw(numel, fused=True), BYTES_FULL),
        "torch_adamw_foreach": (lambda: _torch_adamw(numel, foreach=True), BYTES_FULL),
        "molf_cpp_all_winners": (lambda: _molf("auto", numel, True), BYTES_SCORE + BYTES_UPDATE),
        "molf_cpp_no_winner": (lambda: _molf("auto", numel, False), BYTES_SCORE),
        "molf_cpp_speculative": (lambda: _molf_speculative(numel), BYTES_SPECULATIVE),
        "molf_torch_all_winners": (lambda: _molf("torch", numel, True), BYTES_SCORE + BYTES_UPDATE),
        "molf_cpp_adamw_step": (lambda: _cpp_adamw_step(numel), BYTES_FULL),
    }


def _seconds(step: Step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run(numel: int, repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    methods = _methods(numel)
    steps = {name: factory() for name, (factory, _) in methods.items()}
    for step in steps.values():  # warm-up: first touch, lazy optimizer state
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_seconds(step))
    base = statistics.median(times["deepspeed_cpu_adam"])
    rows = []
    for name, (_, bytes_per_elem) in methods.items():
        seconds = statistics.median(times[name])
        rows.append(
            {
                "method": name,
                "threads": threads,
                "median_ms": seconds * 1e3,
                "min_ms": min(times[name]) * 1e3,
                "gb_per_s": bytes_per_elem * numel / seconds / 1e9,
                "ratio_vs_deepspeed": seconds / base,
            }
        )
    return rows


def _print(rows: list[dict]) -> None:
    print(f"{'method':<24} {'threads':>7} {'median ms':>10} {'min ms':>8} {'GB/s':>7} {'x DS':>6}")
    for r in rows:
        print(
            f"{r['method']:<24} {r['threads']:>7} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} "
            f"{r['gb_per_s']:>7.2f} {r['ratio_vs_deepspeed']:>6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=20_000_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench_results/cpu_kernel.json"))
    args = parser.parse_args()

    if not cpp_impl.load():
        raise SystemExit("the C++ kernel failed to build: nothing to compare")
    thread_counts = sorted({1, os.cpu_count() or 1})
    rows = [row for threads in thread_counts for row in run(args.numel, args.repeats, threads)]
    _print(rows)
    meta = {
        "numel": args.numel,
        "repeats": args.repeats,
        "segment": SEGMENT,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
