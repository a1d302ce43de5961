"""Peak host memory of FFT and MoLF under ZeRO-3 with optimizer and parameter offload, beside `molf-ds
estimate-memory`, on CPU ranks (fp32, the model built partitioned under deepspeed.zero.Init).

Each method trains warm-up + measured steps alone in fresh ranks (the bench's cells, no timing pairs). On CPU
the "GPU" share of the estimate lives in host RAM too, so the model-states estimate per rank is its GPU bytes plus
its share of the CPU bytes; the breakdown (`estimate-memory --breakdown --cpu-ranks`, the same --zero values) adds
DeepSpeed's buffers, the activations and the process. Measured: each rank's peak RSS, and the peak less its RSS
before the model was built (the Python, torch and DeepSpeed libraries).

    nice python benchmarks/host_memory.py --model qwen2.5-0.5b --seq 64 --steps 2 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout root: benchmarks.lab, molf_ds

from benchmarks.lab import run_bench  # noqa: E402
from benchmarks.lab.methods import Settings, default_ranks  # noqa: E402
from benchmarks.lab.models import load_config  # noqa: E402
from molf_ds.commands.memory import count, estimate, rank_breakdown  # noqa: E402
from molf_ds.commands.zero3_memory import layout, zero_settings  # noqa: E402

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--methods", default="fft,molf")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_results/host_memory.json"))
    parser.add_argument("--zero", action="append", default=[], metavar="KEY=VALUE",
                        help="a zero_optimization setting, e.g. reduce_bucket_size=5e7 (repeatable)")
    args = parser.parse_args()
    molf_ranks, _ = default_ranks(int(load_config(args.model).hidden_size))
    s = Settings(model=args.model, seq=args.seq, warmup=args.warmup, steps=args.steps, molf_ranks=molf_ranks,
                 molf_e_ranks=(1, 1), reference_repeats=0, offload_param=True,
                 extra_ds={key: int(float(value)) for key, value in (item.split("=", 1) for item in args.zero)})
    cells = [(3, True, m) for m in args.methods.split(",")]
    result = run_bench(s, cells, args.world, interleave=False)
    config = load_config(args.model)
    counts, lay, zero = count(config), layout(config), zero_settings(args.zero)
    print(f"{args.model}: ZeRO-3, optimizer and parameters offloaded, {args.world} CPU ranks, fp32, "
          f"{args.warmup + args.steps} steps of 1 x {args.seq} tokens; load {os.getloadavg()}")
    print(f"{'method':8}{'steps':>6}{'peak/rank GiB':>15}{'- libs':>8}{'total GiB':>11}{'states/rank':>13}"
          f"{'- libs / states':>17}{'breakdown/rank':>16}{'peak / breakdown':>18}")
    for row in result["rows"]:
        if "error" in row:
            print(f"{row['method']}: {row['error']}")
            continue
        e = estimate(counts, row["method"], molf_ranks, 3, True, True, args.world, 1, weight_bytes=4)
        est = e.gpu_bytes + e.cpu_bytes_per_node / args.world
        ranks = molf_ranks if row["method"] == "molf" else s.molf_e_ranks
        full = rank_breakdown(config, counts, lay, row["method"], ranks, zero, args.world, True, True, 4, args.seq,
                              1, s.lora_dropout, cpu_ranks=True)["host_bytes"]
        above, peak = row["peak_rss_above_start_mib"] * 2**20, row["peak_rss_mib"] * 2**20
        row["estimate_per_rank_bytes"], row["breakdown_per_rank_bytes"] = est, full
        print(f"{row['method']:8}{row['measured_steps'] + args.warmup:>6}{peak / GIB:>15.2f}"
              f"{above / GIB:>8.2f}{row['peak_rss_total_mib'] / 1024:>11.2f}{est / GIB:>13.2f}"
              f"{above / est:>17.2f}{full / GIB:>16.2f}{peak / full:>18.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
