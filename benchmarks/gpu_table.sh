#!/usr/bin/env bash
# The `molf-ds bench` table (README "## Performance") on a GPU machine: one rank per GPU (NCCL), bf16,
# a paper architecture built from its config with random weights (no download), every ZeRO stage with and
# without CPU optimizer offload, fft / lora / molf / molf-e, peak memory from the CUDA allocator, the
# optimizer step beside DeepSpeed's FusedAdam and torch's fused AdamW on the same flat tensors.
#
#   benchmarks/gpu_table.sh                      # qwen2.5-1.5b, every GPU, writes bench_results/gpu/
#   MODEL=qwen2.5-3b SEQ=2048 benchmarks/gpu_table.sh --stages 2,3
#   benchmarks/gpu_table.sh --dry-run            # the same command line on CPU with the tiny config
#
# Extra arguments go to `python -m benchmarks.lab` (see --help). A cell DeepSpeed or molf_ds does not support
# (e.g. ZeRO-0 with bf16 for MoLF) is reported as an error row and the others still run. Step times come from
# runs that hold a method and its baseline at once (FFT and MoLF: two full fine-tunes' weights, gradients and
# Adam states, about 50 GB per GPU for qwen2.5-1.5b at ZeRO-0 on one GPU); on smaller GPUs add --no-interleave
# (each cell timed in its own run).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-qwen2.5-1.5b}
SEQ=${SEQ:-1024}
MICRO_BATCH=${MICRO_BATCH:-4}
STEPS=${STEPS:-10}
OUT=${OUT:-bench_results/gpu}

if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    # CPU, 2 gloo ranks, the tiny bundled config, one measured step: checks the script and the bench end to end.
    exec python -m benchmarks.lab --device cpu --world 2 --model qwen2-h256 --dtype fp32 --seq 32 --micro-batch 1 \
        --warmup 1 --steps 1 --stages 2 --offload none,cpu --methods fft,lora,molf,molf-e --reference-repeats 1 \
        --shared-process --out "${OUT}-dry-run" --plot "$@"
fi

GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [[ "$GPUS" -lt 1 ]]; then
    echo "gpu_table.sh: no CUDA device here; run with --dry-run for the CPU path" >&2
    exit 2
fi
exec python -m benchmarks.lab --device cuda --world "$GPUS" --model "$MODEL" --dtype bf16 --seq "$SEQ" \
    --micro-batch "$MICRO_BATCH" --warmup 3 --steps "$STEPS" --stages 0,1,2,3 --offload none,cpu \
    --methods fft,lora,molf,molf-e --activation-checkpointing --out "$OUT" --plot "$@"
