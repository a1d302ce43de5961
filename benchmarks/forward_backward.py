"""Where MoLF's forward+backward cost goes, against FFT, in one process.

The bench's model (random init) and batch, one thread, no DeepSpeed: a plain model (FFT's forward+backward)
and MoLF-wrapped copies of it that differ in one setting each:
- `molf`: the bench's MoLF (`--rank`, default the paper's r=128 scaled by hidden size; LoRA dropout 0.1);
- `molf-no-dropout`: the same without LoRA dropout (what the dropout of the experts' input costs);
- `molf-rank-1`: rank 1 (what every wrapped module costs whatever its rank: one more autograd branch, passes
  over the input and output, dropout);
- `molf-rank-1-no-dropout`.
Each round runs every model once, in an order that rotates, so that a change of the machine's speed hits all
of them alike; reported: median time and the median over rounds of time / FFT's time in the same round.

The compute floor of `molf` (its FLOPs over FFT's, benchmarks.lab.report.floors) is printed beside it.

    python benchmarks/forward_backward.py --model qwen2-h256 --out bench_results/forward_backward.json
    python benchmarks/forward_backward.py --model smollm2-135m --rank 128 --seq 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout root: benchmarks.lab, molf_ds

from benchmarks.lab import models  # noqa: E402
from benchmarks.lab.methods import Settings, default_ranks, molf_config  # noqa: E402
from benchmarks.lab.report import floors, paired_ratio  # noqa: E402
from molf_ds.commands.memory import count  # noqa: E402
from molf_ds.wrapping import wrap_model  # noqa: E402


def variants(model: str, dropout: float, rank: tuple[int, ...] = ()) -> dict[str, Settings | None]:
    scaled, molf_e = default_ranks(models.hidden_size(model))
    rank = rank or scaled
    settings = lambda ranks, p: Settings(model=model, molf_ranks=ranks, molf_e_ranks=molf_e, lora_dropout=p)  # noqa: E731
    return {"fft": None, "molf": settings(rank, dropout), "molf-no-dropout": settings(rank, 0.0),
            "molf-rank-1": settings((1,), dropout), "molf-rank-1-no-dropout": settings((1,), 0.0)}


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    built = {}
    settings = variants(args.model, args.lora_dropout, args.rank)
    for name, s in settings.items():
        model = models.build(args.model, seed=0)
        built[name] = (model if s is None else wrap_model(model, molf_config(s, "molf"))).train()
    ids = models.token_batch(0, 0, 1, args.seq, built["fft"].config.vocab_size)

    def step(model: torch.nn.Module) -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        elapsed = time.perf_counter() - start
        for p in model.parameters():
            p.grad = None
        return elapsed

    for model in built.values():  # warm-up
        step(model)
        step(model)
    names = list(built)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(step(built[name]))
    rows = []
    for name in names:
        x_fft, quartiles = paired_ratio(times[name], times["fft"])
        rows.append({"variant": name, "median_ms": 1e3 * statistics.median(times[name]), "x_fft": x_fft,
                     "x_fft_quartiles": quartiles})
    counts = count(built["fft"].config)
    floor = floors(counts.params, counts.lora_per_rank, settings["molf"].molf_ranks, (), 0)["molf"]
    return {"model": args.model, "rank": settings["molf"].molf_ranks, "floor": floor, "seq": args.seq,
            "threads": args.threads, "rounds": args.rounds, "lora_dropout": args.lora_dropout, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-h256", help=f"one of {models.bundled()} or an architecture")
    parser.add_argument("--rank", type=lambda t: tuple(int(x) for x in t.split(",")), default=(),
                        help="MoLF's LoRA rank(s), comma-separated (default: r=128 scaled by hidden/2048)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("bench_results/forward_backward.json"))
    args = parser.parse_args()
    result = measure(args)
    print(f"{args.model}, MoLF r={result['rank']}, {args.seq} tokens, {args.threads} thread(s), {args.rounds} rounds: "
          f"forward+backward; compute floor of molf: {result['floor']:.3f} x FFT")
    print(f"{'variant':24s} {'median ms':>10s} {'x FFT':>7s}  (quartiles)")
    for row in result["rows"]:
        low, high = row["x_fft_quartiles"]
        print(f"{row['variant']:24s} {row['median_ms']:10.1f} {row['x_fft']:7.3f}  ({low:.3f}-{high:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
