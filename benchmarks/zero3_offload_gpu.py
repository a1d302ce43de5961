"""GPU check (issue: ZeRO-3 with parameter and optimizer offload): Qwen2.5-3B architecture (random init,
no download), ZeRO-3 with optimizer and parameter offload to CPU, one GPU, sequence 1024, micro-batch 1,
activation checkpointing, bf16, 5 steps; MoLF (full + LoRA r=128) against FFT (DeepSpeedCPUAdam) under the
same settings in the same run. Reports peak GPU memory and median step time, writes JSON.

    python benchmarks/zero3_offload_gpu.py --cap-gib 12          # on a GPU machine
    python benchmarks/zero3_offload_gpu.py --dry-run             # the same code on CPU with a tiny model

`--cap-gib` emulates a small card with torch.cuda.set_per_process_memory_fraction.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30


def ds_config(method: str) -> dict:
    zero = {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
            "sub_group_size": 100_000_000, "stage3_param_persistence_threshold": 10_000}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "bf16": {"enabled": True}, "zero_optimization": zero}
    if method == "fft":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 5e-5, "weight_decay": 0.1}}
    return config


def measure(method: str, dry_run: bool, cap_gib: float | None, steps: int, seq: int) -> dict:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import molf_ds
    from molf_ds.commands.memory import load_config

    cuda = torch.cuda.is_available() and not dry_run
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if cuda and cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
    config = load_config("qwen2.5-3b")
    if dry_run:
        config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512))
    ds = ds_config(method)
    if not cuda:
        ds["zero_optimization"]["offload_optimizer"]["pin_memory"] = False
        ds["zero_optimization"]["offload_param"]["pin_memory"] = False
    zero3_construction = HfDeepSpeedConfig(ds)  # noqa: F841  (alive while the model is built partitioned)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    if method == "molf":
        cfg = molf_ds.MoLFConfig(lora_ranks=(128,), lora_dropout=0.0)
        engine, *_ = molf_ds.initialize(model, cfg, ds)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    device = engine.device
    ids = torch.randint(0, config.vocab_size, (1, seq), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"method": method, "peak_gpu_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
            "median_step_s": statistics.median(times[1:]), "loss": loss.item(), "steps": steps, "seq": seq,
            "cap_gib": cap_gib, "dry_run": dry_run}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    parser.add_argument("--cap-gib", type=float, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--out", default="bench_results/zero3_offload_gpu.json")
    parser.add_argument("--worker", choices=("molf", "fft"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one method per process, so each peak is its own
        print(json.dumps(measure(args.worker, args.dry_run, args.cap_gib, args.steps, args.seq)))
        return 0
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": os.environ.get("MASTER_PORT", "29511")}
    results = []
    for method in ("fft", "molf"):
        cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--seq", str(args.seq)]
        cmd += ["--dry-run"] * args.dry_run + (["--cap-gib", str(args.cap_gib)] if args.cap_gib else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"method": method, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    fft, molf = results
    if "error" not in fft and "error" not in molf:
        print(f"MoLF / FFT step time: {molf['median_step_s'] / fft['median_step_s']:.2f}x")
        if molf["peak_gpu_gib"] is not None:
            print(f"peak GPU: MoLF {molf['peak_gpu_gib']:.2f} GiB, FFT {fft['peak_gpu_gib']:.2f} GiB "
                  f"(goal < 12 GiB, stretch < 8 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
