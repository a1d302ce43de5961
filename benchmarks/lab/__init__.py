"""The benchmarking lab behind `molf-ds bench`, run from a git checkout (it is not part of the installed package).

`molf-ds bench`: MoLF's cost against FFT and LoRA under every ZeRO stage, measured side by side in one run.

For one model config, every (ZeRO stage, optimizer offload) mode and every method (fft, lora, molf, molf-e),
`world` ranks are spawned (torch.multiprocessing; gloo and one thread per rank on CPU, NCCL on GPUs); each trains
for warm-up + measured steps on random tokens and reports median training-step time, tokens/s,
engine.step() time, the basic optimizer's own time and memory traffic (beside DeepSpeedCPUAdam and torch's
fused AdamW on tensors of the same sizes, in the same run), peak memory (RSS on CPU, the allocator's peak on
GPU) and the collectives per step with their bytes. The step times come from runs in which each method trains
in the same ranks as its baseline, in turn, step by step: FFT with MoLF, LoRA with MoLF-E (`--no-interleave`:
from each cell's own run). Ratios against FFT and LoRA of the same mode, a text table, JSON and markdown
(`--out`), PNG charts (`--plot`).

    python -m benchmarks.lab --model qwen2-h256 --out bench_results/bench
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from molf_ds.commands.methods import BENCH_EXTRA_METHODS, BENCH_METHODS, baseline_of

from .methods import BASELINE_OPTIMIZERS, Settings, default_ranks

__all__ = ["Settings", "add_arguments", "cells_for", "run", "run_bench"]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import bundled

    parser.add_argument("--model", default="qwen2-h256",
                        help=f"a bench config {bundled()}, an estimate-memory architecture (random init), a "
                             "`molf-ds models` name or a model folder (its weights) (default qwen2-h256)")
    parser.add_argument("--gguf-file", help="a GGUF checkpoint inside the --model folder")
    parser.add_argument("--stages", type=_ints, default=(0, 1, 2, 3), help="ZeRO stages, e.g. 0,1,2,3")
    parser.add_argument("--offload", type=_names, default=("none", "cpu"),
                        help="optimizer offload modes: none,cpu (cpu is skipped for stage 0)")
    parser.add_argument("--methods", type=_names, default=BENCH_METHODS, help=f"of {BENCH_METHODS + BENCH_EXTRA_METHODS}")
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2; on GPUs: one per GPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default fp32 on CPU, bf16 on GPU")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="measured steps (after warm-up)")
    parser.add_argument("--molf-ranks", type=_ints, default=(), help="default: the paper's r=128, scaled to hidden")
    parser.add_argument("--molf-e-ranks", type=_ints, default=(), help="default: the paper's 32,128, scaled; LoRA "
                                                                       "gets their sum")
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--lora-lr", type=float, default=5e-5)
    parser.add_argument("--baseline-optimizer", choices=BASELINE_OPTIMIZERS, default="torch-fused",
                        help="fft/lora optimizer without offload (with offload: DeepSpeedCPUAdam)")
    parser.add_argument("--reference-repeats", type=int, default=10)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--speculative-update", action="store_true",
                        help="MoLF's one-pass optimizer step (CPU kernel; +4 bytes per MoLF parameter element)")
    parser.add_argument("--offload-param", action="store_true",
                        help="ZeRO-3 cells with offload also offload the parameters to the CPU (offload_param)")
    parser.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                        help="leave torch's CPU tensors on 4 KiB pages (default: THP_MEM_ALLOC_ENABLE=1 in every rank, "
                             "for every method alike)")
    parser.add_argument("--no-interleave", dest="interleave", action="store_false",
                        help="time each cell in its own run (default: each method trains in turn with its "
                             "baseline, FFT with MoLF and LoRA with MoLF-E, in the same ranks, step by step)")
    parser.add_argument("--shared-process", action="store_true",
                        help="run every cell in the same ranks (faster start; peak memory then is not per cell)")
    parser.add_argument("--out", type=Path, default=None, help="directory for bench.json and bench.md")
    parser.add_argument("--plot", action="store_true", help="also draw PNG charts into --out")
    parser.add_argument("--no-progress", action="store_true")


def settings_from(args: argparse.Namespace) -> Settings:
    import torch

    from .models import hidden_size

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    molf, molf_e = default_ranks(hidden_size(args.model, args.gguf_file))
    return Settings(
        model=args.model, gguf_file=args.gguf_file, seq=args.seq, micro_batch=args.micro_batch, warmup=args.warmup,
        steps=args.steps,
        dtype=args.dtype or ("bf16" if device == "cuda" else "fp32"), device=device,
        molf_ranks=args.molf_ranks or molf, molf_e_ranks=args.molf_e_ranks or molf_e,
        lora_dropout=args.lora_dropout, lr=args.lr, lora_lr=args.lora_lr, baseline_optimizer=args.baseline_optimizer,
        reference_repeats=args.reference_repeats, activation_checkpointing=args.activation_checkpointing,
        speculative_update=args.speculative_update, offload_param=args.offload_param,
    )


def cells_for(stages: Sequence[int], offloads: Sequence[str], methods: Sequence[str]) -> list[tuple[int, bool, str]]:
    """Every valid (stage, offload, method), grouped by mode so that a mode's methods run back to back."""
    for m in methods:
        if m not in BENCH_METHODS + BENCH_EXTRA_METHODS:
            raise ValueError(f"bench: unknown method {m!r}: use {BENCH_METHODS + BENCH_EXTRA_METHODS}")
    for o in offloads:
        if o not in ("none", "cpu"):
            raise ValueError(f"bench: offload {o!r}: use none or cpu")
    return [(stage, o == "cpu", m) for stage in stages for o in offloads if not (stage == 0 and o == "cpu")
            for m in methods]


def run_bench(settings: Settings, cells: list[tuple[int, bool, str]], world: int = 2, threads: int = 1,
              shared_process: bool = False, progress: bool = True, huge_pages: bool = True,
              interleave: bool = True) -> dict[str, Any]:
    """Measure every cell with `world` spawned ranks; returns the report (settings, machine, rows).

    Each cell first runs alone in its ranks (fresh ones, unless `shared_process`): peak memory and the isolated
    optimizer steps. With `interleave`, the step times then come from one run per mode and baseline in which a
    baseline's cells (FFT and MoLF; LoRA and MoLF-E) train in the same ranks in turn, step by step: on a shared
    machine whose speed drifts by tens of percent over minutes, only that compares methods under the same
    conditions (the cell-alone runs then train min(steps, 2) steps). Two engines per run, not all four: with
    four in the ranks, their memory slowed some backward passes by up to half. Without it, the cell-alone runs
    time the steps.

    `huge_pages`: torch allocates CPU tensors of 2 MiB and more on transparent huge pages in every rank. The
    optimizer steps stream hundreds of MB; on 4 KiB pages their speed here swung 0.7-8 GB/s with the host's load
    (page walks), on huge pages it held at 8 GB/s."""
    from . import report
    from .procs import spawn
    from .worker import cell_name, run_cells, run_interleaved

    env = {"THP_MEM_ALLOC_ENABLE": "1" if huge_pages else "0"}
    settings_dict = settings.to_dict()
    alone_settings = {**settings_dict, "steps": min(settings.steps, 2)} if interleave else settings_dict
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="molf-bench-") as tmp:
        def collect(directory: Path, n: int) -> list[list[dict[str, Any]]]:
            return [[json.loads(Path(directory, f"cell-{k}.rank-{r}.json").read_text()) for r in range(world)]
                    for k in range(n)]

        alone: list[list[dict[str, Any]]] = []
        if shared_process:
            spawn(run_cells, world, cells, alone_settings, tmp, progress, threads=threads, env=env)
            alone = collect(Path(tmp), len(cells))
        else:
            for k, cell in _progress(cells, progress, "bench", cell_name):
                sub = Path(tmp, f"c{k}")
                sub.mkdir()
                spawn(run_cells, world, [cell], alone_settings, str(sub), False, threads=threads, env=env)
                alone += collect(sub, 1)
        timing: list[list[dict[str, Any]] | None] = [None] * len(cells)
        partners: list[list[str]] = [[] for _ in cells]
        if interleave:
            runs: dict[tuple[int, bool, str], list[int]] = {}
            for k, (stage, offload, method) in enumerate(cells):
                runs.setdefault((stage, offload, baseline_of(method)), []).append(k)
            for i, (_, ks) in _progress(list(runs.items()), progress, "interleaved",
                                           lambda run: " + ".join(cell_name(cells[k]) for k in run[1])):
                sub = Path(tmp, f"m{i}")
                sub.mkdir()
                spawn(run_interleaved, world, [cells[k] for k in ks], settings_dict, str(sub), threads=threads, env=env)
                names = [cell_name(cells[k]) for k in ks]
                for k, ranks in zip(ks, collect(sub, len(ks))):
                    timing[k], partners[k] = ranks, names
        rows = [report.merge(ranks, timed) for ranks, timed in zip(alone, timing)]
        for row, names in zip(rows, partners):
            row["interleaved_with"] = names
    report.add_ratios(rows, method_floors(settings))
    machine = {**_machine(settings.device), "load_average_before": load_before, "load_average_after": os.getloadavg()}
    return {"settings": settings_dict, "world": world, "threads_per_rank": threads, "floors": method_floors(settings),
            "memory_per_cell": not shared_process, "interleaved": interleave, "huge_pages": huge_pages,
            "machine": machine, "rows": rows}


def method_floors(settings: Settings) -> dict[str, float]:
    """MoLF's and MoLF-E's compute floors against FFT and LoRA for the bench's model and ranks (`report.floors`)."""
    from molf_ds.commands.memory import count

    from . import report
    from .models import load_config

    counts = count(load_config(settings.model, settings.gguf_file))
    return report.floors(counts.params, counts.lora_per_rank, settings.molf_ranks, settings.molf_e_ranks,
                         settings.lora_rank)


def _progress(items: list, show: bool, desc: str, label: Callable[[Any], str]) -> Iterator[tuple[int, Any]]:
    """enumerate(items), with a tqdm bar on stderr naming the item at work when `show`."""
    if not show:
        yield from enumerate(items)
        return
    from tqdm import tqdm

    with tqdm(total=len(items), desc=desc, unit="run", file=sys.stderr) as bar:
        for k, item in enumerate(items):
            bar.set_postfix_str(label(item))
            yield k, item
            bar.update()


def _machine(device: str) -> dict[str, Any]:
    import deepspeed
    import torch

    info = {"platform": platform.platform(), "cpu": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def write(report_dict: dict[str, Any], out: Path, command: str | None, plot: bool) -> list[Path]:
    from . import report

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json", out / "bench.md"]
    report_dict = {**report_dict, "command": command}
    written[0].write_text(json.dumps(report_dict, indent=2))
    written[1].write_text(report.markdown(report_dict, command))
    if plot:
        written += report.plot(report_dict, out)
    return written


def run(args: argparse.Namespace) -> int:
    """`molf-ds bench` / `python -m benchmarks.lab`: measure, print the tables, write --out; 1 if a cell failed."""
    from . import report

    if args.plot and args.out is None:
        print("molf-ds bench: --plot needs --out DIR", file=sys.stderr)
        return 2
    try:
        settings = settings_from(args)
        cells = cells_for(args.stages, args.offload, args.methods)
    except ValueError as error:
        print(f"molf-ds bench: {error}", file=sys.stderr)
        return 2
    if settings.device == "cuda":
        import torch

        args.world = min(args.world, torch.cuda.device_count())
    result = run_bench(settings, cells, args.world, args.threads, args.shared_process, not args.no_progress,
                       args.huge_pages, args.interleave)
    print(report.text(result))
    if args.out is not None:
        argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
        command = "molf-ds bench " + " ".join(shlex.quote(a) for a in argv)
        for path in write(result, args.out, command, args.plot):
            print(f"wrote {path}")
    errors = [r for r in result["rows"] if "error" in r]
    for r in errors:
        print(f"molf-ds bench: {r['cell']} failed: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))

