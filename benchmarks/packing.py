"""data.packing against padded batches: training tokens per second and padding fraction, on the sql task with
SmolLM2-135M-Instruct (MoLF, one process, no DeepSpeed: the model's forward+backward+MoLF step, which is what
packing changes).

The rows (examples/replication/data/sql_train.jsonl, the sql task's prompt template, cut to --max-length) are
shuffled once; unpacked micro-batches take --rows rows each, packed ones --packs packs of at most --max-length
tokens. Steps alternate (unpacked, packed) so that a change of the machine's speed hits both alike. Reported:
median real (non-padding) tokens per second, the padding fraction of the batch tensors, and their ratio.

    python benchmarks/packing.py --out bench_results/packing.json [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout root: molf_ds

import molf_ds  # noqa: E402
from molf_ds.commands.models import prepare  # noqa: E402
from molf_ds.commands.train.data import Collator, pack, pad_id, sql, tokenize  # noqa: E402
from molf_ds.commands.train.data.base import open_table, rows  # noqa: E402

DATA = ROOT / "examples" / "replication" / "data" / "sql_train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rows", type=int, default=4, help="rows per unpacked micro-batch [4]")
    parser.add_argument("--packs", type=int, default=2, help="packs per packed micro-batch [2]")
    parser.add_argument("--steps", type=int, default=4, help="measured steps of each, after one warm-up [4]")
    parser.add_argument("--attn", default="sdpa")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = prepare("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    where, table = open_table(str(DATA), "train")
    features, _ = tokenize([sql.example(r) for r in rows(where, table, range(len(table)))], tokenizer,
                           args.max_length)
    random.Random(0).shuffle(features)
    packs = pack(features, args.max_length)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=args.attn)
    cfg = molf_ds.MoLFConfig(variant="molf", lora_ranks=[16], lora_alphas=[32], lora_dropout=0.0, lr=1e-5,
                             lora_lr=1e-5)
    model = molf_ds.wrap_model(model, cfg).to(args.device).train()
    optimizer = molf_ds.build_optimizer(model, cfg)
    collate = Collator(pad_id(tokenizer))
    batches = {"unpacked": [features[i:i + args.rows] for i in range(0, len(features), args.rows)],
               "packed": [packs[i:i + args.packs] for i in range(0, len(packs), args.packs)]}
    results: dict[str, dict[str, list[float]]] = {k: {"tokens_per_s": [], "padding": []} for k in batches}
    for step in range(args.steps + 1):
        for kind, micro in batches.items():
            chosen = micro[step % len(micro)]
            batch = {k: v.to(args.device) for k, v in collate(chosen).items()}
            real = sum(len(f["input_ids"]) for f in chosen)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            model(**batch, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - began
            if step:  # the first step of each warms up
                results[kind]["tokens_per_s"].append(real / seconds)
                results[kind]["padding"].append(1 - real / batch["input_ids"].numel())
            print(f"step {step} {kind}: {real} tokens in {batch['input_ids'].shape} {seconds:.2f}s", file=sys.stderr)
    report = {
        "model": "smollm2-135m", "task": "sql", "device": args.device, "attn_implementation": args.attn,
        "max_length": args.max_length, "rows_per_micro_batch": args.rows, "packs_per_micro_batch": args.packs,
        "rows": len(features), "packs": len(packs), "mean_row_tokens": sum(len(f["input_ids"]) for f in features)
        / len(features),
        **{kind: {"median_tokens_per_s": statistics.median(r["tokens_per_s"]),
                  "mean_padding_fraction": statistics.mean(r["padding"]), **r} for kind, r in results.items()},
    }
    report["speedup"] = report["packed"]["median_tokens_per_s"] / report["unpacked"]["median_tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in batches} | {
        k: {"tokens_per_s": round(report[k]["median_tokens_per_s"], 1),
            "padding": round(report[k]["mean_padding_fraction"], 3)} for k in batches}))


if __name__ == "__main__":
    main()
