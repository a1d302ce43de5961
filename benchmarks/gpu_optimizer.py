"""The optimizer step alone on one GPU: MoLFAdamW (the Triton kernels) against DeepSpeed's FusedAdam and torch's fused
AdamW, on the flat fp32 tensors ZeRO-2 would hand them on one rank for a model (default: the Qwen2.5-3B architecture).

The MoLF-wrapped model is built on the meta device (no weights); its param groups become one flat fp32 tensor each
(the MoLF group: every base weight and bias first, then every LoRA expert), with gradients, and MoLFAdamW steps them
through a ZeRO-like router, the real optimizer step (scores, routing on the device, the winners' update, plain
AdamW). The baselines step FFT's parameters: the base weights (a view of the MoLF tensor's first part) and the plain
groups, on the same moments (no extra memory). Routing is forced as in benchmarks/optimizer_step.py: EPD scores
carry each expert's lr, so `lora_lr = lr / 1000` makes `full` win every module and `lr * 1000` LoRA (the shares are
reported). The methods run in turn every iteration, the order rotating, each timed with CUDA events; the ratios are
medians of per-iteration ratios (paired).

    python benchmarks/gpu_optimizer.py --out bench_results/gpu_optimizer.json
    python benchmarks/gpu_optimizer.py --dry-run    # CPU, a tiny config, the Triton kernels interpreted
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout root: benchmarks.lab, molf_ds

ROUTINGS = {"full": 1e-3, "lora": 1e3}  # lora_lr / lr
BYTES = {"moments": 20, "update": 16, "adamw": 28}  # per element of each pass (docs/performance.md)


def flat_problem(model_name: str, ranks: tuple[int, ...], lr: float, lora_lr: float, device):
    """(MoLFAdamW over flat tensors with gradients, FFT's params [(param, grad, exp_avg, exp_avg_sq)], sizes)."""
    import torch
    from transformers import AutoModelForCausalLM

    import molf_ds
    from benchmarks.lab.models import load_config
    from molf_ds.optim import MoLFAdamW, Router, param_groups
    from molf_ds.optim.layout import ExpertIndex, Layout
    from molf_ds.optim.routing import FULL, FULL_BIAS
    from molf_ds.zero.adapters.base import TensorLayouts

    cfg = molf_ds.MoLFConfig(lora_ranks=ranks, lora_alphas=tuple(2.0 * r for r in ranks), lora_dropout=0.0, lr=lr,
                             lora_lr=lora_lr)
    with torch.device("meta"):
        model = molf_ds.wrap_model(AutoModelForCausalLM.from_config(load_config(model_name)), cfg)
    index = ExpertIndex(model)
    groups, layouts, base = [], {}, []
    for group in param_groups(model, index, cfg):
        params = group["params"]
        if group["kind"] == "molf":  # base weights and biases first: FFT's part is one contiguous view
            params = sorted(params, key=lambda p: index.kind_of[id(p)] not in (FULL, FULL_BIAS))
        flat = torch.nn.Parameter(torch.empty(sum(p.numel() for p in params), device=device).normal_(0, 0.02))
        flat.grad = torch.empty_like(flat).normal_(0, 1e-3)
        segments, offset = [], 0
        for p in params:
            if id(p) in index.cell_of:
                segments.append((offset, p.numel(), index.cell_of[id(p)], index.kind_of[id(p)]))
            offset += p.numel()
        layouts[id(flat)] = Layout(segments)
        base.append((flat, sum(s[1] for s in segments if s[3] in (FULL, FULL_BIAS)) if segments else flat.numel()))
        groups.append({**group, "params": [flat]})
    optimizer = MoLFAdamW(groups, index, cfg, router=Router(TensorLayouts(layouts)))
    optimizer.step()  # states allocated, work tables built
    fft = []
    for flat, n in base:
        state = optimizer.state[flat]
        fft.append((flat.data[:n], flat.grad[:n], state["exp_avg"][:n], state["exp_avg_sq"][:n]))
    return optimizer, fft


def baselines(fft: list, lr: float, device) -> dict[str, Callable[[], None]]:
    """The FFT optimizers on the same tensors: torch's fused AdamW, and DeepSpeed's FusedAdam (CUDA only)."""
    import torch

    params = [torch.nn.Parameter(p) for p, _, _, _ in fft]
    for param, (_, g, _, _) in zip(params, fft):
        param.grad = g
    steps = {}
    torch_adamw = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    for param, (_, _, m, v) in zip(params, fft):  # the MoLF run's moments: no second copy
        torch_adamw.state[param] = {"step": torch.zeros((), device=device), "exp_avg": m, "exp_avg_sq": v}
    steps["torch-fused-adamw"] = torch_adamw.step
    if device.type == "cuda":
        from deepspeed.ops.adam import FusedAdam

        try:
            fused = FusedAdam(params, lr=lr, weight_decay=0.0)  # builds DeepSpeed's CUDA op on first use
        except Exception as error:  # no toolchain for the op: the other baseline still runs
            print(f"DeepSpeed's FusedAdam is not available here ({error}); measuring without it", file=sys.stderr)
            return steps
        for param, (_, _, m, v) in zip(params, fft):
            fused.state[param] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}
        steps["deepspeed-fused-adam"] = fused.step
    return steps


def timer(device) -> Callable[[Callable[[], None]], Callable[[], float]]:
    """time(fn) starts fn and returns a function giving its ms once the iteration is done (CUDA events)."""
    import torch

    if device.type == "cuda":
        def start(fn):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            return lambda: begin.elapsed_time(end)
        return start

    def start_cpu(fn):
        began = time.perf_counter()
        fn()
        took = (time.perf_counter() - began) * 1e3
        return lambda: took
    return start_cpu


def measure(args: argparse.Namespace) -> list[dict]:
    import torch

    from benchmarks.lab.methods import default_ranks
    from benchmarks.lab.models import hidden_size

    device = torch.device(args.device)
    ranks = default_ranks(hidden_size(args.model))[0]
    rows = []
    for routing, factor in ROUTINGS.items():
        optimizer, fft = flat_problem(args.model, ranks, args.lr, args.lr * factor, device)
        methods = {"molf": optimizer.step, **baselines(fft, args.lr, device)}
        names = list(methods)
        times: dict[str, list[float]] = {name: [] for name in names}
        start = timer(device)
        for i in range(args.warmup + args.steps):
            order = names[i % len(names):] + names[:i % len(names)]
            pending = {name: start(methods[name]) for name in order}
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                for name, took in pending.items():
                    times[name].append(took())
        counts = {k: int(v) for k, v in optimizer.last_step_elements.items()}
        moved = sum(counts[k] * BYTES.get(k, 0) for k in counts)
        row = {"routing": routing, "lora_lr_over_lr": factor, "routing_shares": optimizer.routing_shares(),
               "backend": optimizer.kernel_backend, "step_elements": counts, "molf_bytes_moved": moved,
               "ms": {name: statistics.median(t) for name, t in times.items()},
               "ms_min": {name: min(t) for name, t in times.items()}}
        row["paired_ratio"] = {name: statistics.median(a / b for a, b in zip(times["molf"], times[name]))
                               for name in names if name != "molf"}
        row["molf_gb_per_s"] = moved / row["ms"]["molf"] / 1e6
        rows.append(row)
        del optimizer, fft, methods
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    head = ["routing (shares)", "backend", "MoLF ms", "baselines ms", "MoLF / baseline (paired)", "MoLF GB/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        shares = ", ".join(f"{e} {v:.2f}" for e, v in r["routing_shares"].items())
        others = [n for n in r["ms"] if n != "molf"]
        lines.append("| " + " | ".join([
            f"{r['routing']} ({shares})", str(r["backend"]), f"{r['ms']['molf']:.2f}",
            ", ".join(f"{n} {r['ms'][n]:.2f}" for n in others),
            ", ".join(f"{n} {r['paired_ratio'][n]:.2f}" for n in others), f"{r['molf_gb_per_s']:.0f}",
        ]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-3b", help="a bench config or `molf-ds models` name")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, default=Path("bench_results/gpu_optimizer.json"))
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, the tiny qwen2-h64 config, the Triton kernels under Triton's interpreter")
    args = parser.parse_args()
    if args.dry_run:  # before molf_ds imports triton: the interpreter is chosen when the kernels are defined
        os.environ.update(MOLF_DS_KERNEL="triton", TRITON_INTERPRET="1")
        args.model, args.device, args.warmup, args.steps = "qwen2-h64", "cpu", 1, 2
    rows = measure(args)
    print(table(rows))
    unforced = [r for r in rows if r["routing_shares"]["full" if r["routing"] == "full" else "lora0"] != 1.0]
    for r in unforced:
        print(f"routing was not forced for {r['routing']} (shares {r['routing_shares']})", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    args.out.write_text(json.dumps({"rows": rows, "model": args.model, "device": args.device, "card": card,
                                    "command": " ".join(["python"] + sys.argv)}, indent=2))
    print(f"wrote {args.out}")
    return 1 if unforced else 0


if __name__ == "__main__":
    sys.exit(main())
