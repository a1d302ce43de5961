#!/usr/bin/env bash
# The GPU optimizer measurement (issue 29), in two parts, JSON out:
# 1. benchmarks/gpu_optimizer.py: the optimizer step alone on one GPU on a Qwen2.5-3B-sized set of flat fp32 tensors,
#    MoLFAdamW (the Triton kernels) against DeepSpeed's FusedAdam and torch's fused AdamW, paired, CUDA events, with
#    `full` and LoRA forced to win every module -> $OUT/optimizer.json;
# 2. the training-step table of `python -m benchmarks.lab` for the Qwen2.5-1.5B architecture (random init, bf16) at
#    ZeRO-2 and ZeRO-3, MoLF against FFT in the same ranks (paired) -> $OUT/steps/bench.json.
#
#   benchmarks/gpu_optimizer.sh                  # every GPU, writes bench_results/gpu-optimizer/
#   benchmarks/gpu_optimizer.sh --dry-run        # both parts on CPU with a tiny config, the Triton kernels interpreted
#
# The optimizer part needs about 56 GB of GPU memory for Qwen2.5-3B (weights, gradients and moments in fp32, shared
# by the three optimizers); OPT_MODEL=qwen2.5-1.5b halves it.
set -euo pipefail
cd "$(dirname "$0")/.."

OPT_MODEL=${OPT_MODEL:-qwen2.5-3b}
MODEL=${MODEL:-qwen2.5-1.5b}
SEQ=${SEQ:-1024}
MICRO_BATCH=${MICRO_BATCH:-4}
STEPS=${STEPS:-10}
OUT=${OUT:-bench_results/gpu-optimizer}

if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    OUT="${OUT}-dry-run"
    mkdir -p "$OUT"
    python benchmarks/gpu_optimizer.py --dry-run --out "$OUT/optimizer.json"
    # 2 gloo ranks, one measured step; MoLF on the Triton kernels under Triton's interpreter
    MOLF_DS_KERNEL=triton TRITON_INTERPRET=1 python -m benchmarks.lab --device cpu --world 2 --model qwen2-h64 \
        --dtype fp32 --seq 16 --micro-batch 1 --warmup 1 --steps 1 --stages 2,3 --offload none --methods fft,molf \
        --lora-dropout 0 --reference-repeats 1 --shared-process --no-progress --out "$OUT/steps" "$@"
    exit 0
fi

GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [[ "$GPUS" -lt 1 ]]; then
    echo "gpu_optimizer.sh: no CUDA device here; run with --dry-run for the CPU path" >&2
    exit 2
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.csv" || true  # the card's name
python benchmarks/gpu_optimizer.py --model "$OPT_MODEL" --out "$OUT/optimizer.json"
exec python -m benchmarks.lab --device cuda --world "$GPUS" --model "$MODEL" --dtype bf16 --seq "$SEQ" \
    --micro-batch "$MICRO_BATCH" --warmup 3 --steps "$STEPS" --stages 2,3 --offload none --methods fft,molf \
    --lora-dropout 0 --activation-checkpointing --out "$OUT/steps" "$@"
