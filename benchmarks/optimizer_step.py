"""Optimizer step of MoLF against DeepSpeed's own AdamW on the same model and ZeRO stage, in one run.

For ZeRO-2 and ZeRO-2 + CPU optimizer offload, 2 ranks (gloo, one thread each), the MoLF-wrapped model
(MoLF r scaled as in `molf-ds bench`) trains a few steps with
- `molf`: MoLFAdamW (molf_ds.initialize), with routing forced honestly through the config: EPD scores scale with
  each expert's lr, so `lora_lr = lr / 1000` makes `full` win every module and `lora_lr = lr * 1000` makes
  LoRA win every module (the measured routing shares are printed and checked);
- `ds-adamw`: the same wrapped model, the same param groups, with DeepSpeed's own AdamW from an `optimizer`
  block: FusedAdam (its CPU build runs DeepSpeed's cpu_adam code), DeepSpeedCPUAdam under offload;
each twice: MoLF's two-pass step (default) and `speculative_update: true` (one pass while routing keeps its
winners, +4 bytes per MoLF element), each run with its own DeepSpeed baseline.
Reported, per stage and routing: median engine.step() time (what a training step pays for the optimizer step,
DeepSpeed's gathers and norms included) and the basic optimizer's own step on the same flat tensors (isolated:
interleaved with DeepSpeedCPUAdam and torch fused AdamW on tensors of the same sizes, caches flushed), and
their ratios. Targets: <= 1.3x the fastest plain AdamW when `full` wins everywhere, faster than it (< 1x) when
LoRA wins everywhere.

    python benchmarks/optimizer_step.py --out bench_results/optimizer_step.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout root: benchmarks.lab, molf_ds

from benchmarks.lab import cells_for, run_bench  # noqa: E402
from benchmarks.lab.methods import Settings, default_ranks  # noqa: E402
from benchmarks.lab.models import hidden_size  # noqa: E402

TARGETS = {"full": "<= 1.3", "lora": "< 1.0"}
ROUTINGS = {"full": 1e-3, "lora": 1e3}  # lora_lr / lr
STEPS = {"two-pass": False, "speculative": True}  # MoLFConfig.speculative_update


def measure(args: argparse.Namespace) -> dict:
    molf, molf_e = default_ranks(hidden_size(args.model))
    base = Settings(model=args.model, seq=args.seq, micro_batch=1, warmup=args.warmup, steps=args.steps,
                    molf_ranks=molf, molf_e_ranks=molf_e, reference_repeats=args.repeats, lora_dropout=0.0)
    cells = cells_for([2], ["none", "cpu"], ["molf", "ds-adamw"])
    runs = {}
    for routing, factor in ROUTINGS.items():
        for step, speculative in STEPS.items():
            settings = replace(base, lr=args.lr, lora_lr=args.lr * factor, speculative_update=speculative)
            runs[f"{routing}/{step}"] = run_bench(settings, cells, world=2, shared_process=True,
                                                  progress=not args.no_progress, huge_pages=args.huge_pages,
                                                  interleave=False)
    rows = []
    for name, report in runs.items():
        routing, step = name.split("/")
        by = {(r["stage"], r["offload"], r["method"]): r for r in report["rows"]}
        for stage, offload in ((2, False), (2, True)):
            molf, ds = by[(stage, offload, "molf")], by[(stage, offload, "ds-adamw")]
            for r in (molf, ds):
                if "error" in r:
                    raise SystemExit(f"{r['cell']} failed: {r['error']}")
            shares = molf["routing_shares"]
            expert = "full" if routing == "full" else "lora0"
            rows.append({
                "stage": stage, "offload": offload, "routing": routing, "step": step,
                "lora_lr_over_lr": ROUTINGS[routing],
                "routing_shares": shares, "isolated_routing_shares": molf.get("isolated_routing_shares"),
                "forced": shares[expert] == 1.0 and molf.get("isolated_routing_shares", shares)[expert] == 1.0,
                "deepspeed_optimizer": ds["optimizer"],
                "engine_step_ms": {"molf": molf["engine_step_ms"], "deepspeed": ds["engine_step_ms"]},
                "engine_step_ratio": molf["engine_step_ms"] / ds["engine_step_ms"],
                "engine_step_ratio_min": molf["engine_step_ms_min"] / ds["engine_step_ms_min"],
                "engine_step_ratio_cpu": molf["engine_step_cpu_ms"] / ds["engine_step_cpu_ms"],
                "isolated_ms": {"molf": molf["isolated_ms"]["own"], "deepspeed": ds["isolated_ms"]["own"],
                                **{k: v for k, v in molf["isolated_ms"].items() if k != "own"}},
                "isolated_ratio": molf["isolated_ms"]["own"] / ds["isolated_ms"]["own"],
                "isolated_ratio_min": molf["isolated_ms_min"]["own"] / ds["isolated_ms_min"]["own"],
                "isolated_ratio_cpu": molf["isolated_cpu_ms"]["own"] / ds["isolated_cpu_ms"]["own"],
                "isolated_vs_best_adamw": molf["optimizer_vs_best_adamw"],
                "isolated_vs_best_adamw_min": molf["optimizer_vs_best_adamw_min"],
                "isolated_vs_best_adamw_cpu": molf["optimizer_vs_best_adamw_cpu"],
                "isolated_gb_per_s": {"molf": molf["isolated_gb_per_s"]["own"],
                                      "deepspeed": ds["isolated_gb_per_s"]["own"]},
                "target": TARGETS[routing],
            })
    return {"settings": base.to_dict(), "rows": rows, "runs": runs}


def table(rows: list[dict]) -> str:
    """A markdown table: ratios of wall-time medians, then (in parentheses) of the fastest steps and of the
    median CPU time (blind to other processes on the cores)."""
    head = ["mode", "routing (shares)", "MoLF step", "DeepSpeed optimizer", "engine.step ms MoLF / DS",
            "ratio (min, CPU)", "optimizer step ms MoLF / DS", "ratio (min, CPU)", "x best AdamW (min, CPU)", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mode = "ZeRO-2 + offload" if r["offload"] else "ZeRO-2"
        shares = ", ".join(f"{e} {v:.2f}" for e, v in r["routing_shares"].items())
        e, i = r["engine_step_ms"], r["isolated_ms"]
        lines.append("| " + " | ".join([
            mode, f"{r['routing']} ({shares})", r["step"], r["deepspeed_optimizer"],
            f"{e['molf']:.1f} / {e['deepspeed']:.1f}",
            f"{r['engine_step_ratio']:.2f} ({r['engine_step_ratio_min']:.2f}, {r['engine_step_ratio_cpu']:.2f})",
            f"{i['molf']:.2f} / {i['deepspeed']:.2f}",
            f"{r['isolated_ratio']:.2f} ({r['isolated_ratio_min']:.2f}, {r['isolated_ratio_cpu']:.2f})",
            f"{r['isolated_vs_best_adamw']:.2f} ({r['isolated_vs_best_adamw_min']:.2f}, "
            f"{r['isolated_vs_best_adamw_cpu']:.2f})", r["target"],
        ]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-h512")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20, help="isolated optimizer steps per method")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, default=Path("bench_results/optimizer_step.json"))
    parser.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                        help="4 KiB pages for torch's CPU tensors (default: huge pages, for every optimizer alike)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    result = measure(args)
    print(table(result["rows"]))
    unforced = [r for r in result["rows"] if not r["forced"]]
    for r in unforced:
        print(f"routing was not forced for {r['routing']} (shares {r['routing_shares']}): the ratio is not the "
              "one asked for", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "command": " ".join(["python"] + sys.argv)}, indent=2))
    print(f"wrote {args.out}")
    return 1 if unforced else 0


if __name__ == "__main__":
    sys.exit(main())
