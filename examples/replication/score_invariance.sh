#!/usr/bin/env bash
# Issue 31's findings (a) and (b) under each routing score, on the fact dev half (SmolLM2-135M, seed 100, 24 steps):
# (a) MoLF with the LoRA lr equal to the full lr, then 4x it; (b) MoLF-E with one alpha for r=32 and r=128
# (scalings 5.66 and 2.83), then with equal scalings. EPD carries each expert's lr and a LoRA expert's scaling,
# LDW neither (PFN, the authors' lr-free score, is scale-free per element too).
#   ./examples/replication/score_invariance.sh [SCORE ...]      (epd pfn ldw by default; `compare --reuse` resumes)
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/replication/common.sh
OUT=${OUT:-examples/replication/runs/fact/scores}
DATA=examples/replication/data/facts_smollm2_dev.json
LR=2e-4 LR_E=1e-4                     # the dev choices of molf and molf-e on the first fact data (RESULTS.md)
scores=("$@")
[ ${#scores[@]} -gt 0 ] || scores=(epd pfn ldw)
options=(--seeds 1 --first-seed 100 --reuse --methods molf,molf-e --set "molf:train.lr=$LR" --set "molf-e:train.lr=$LR_E"
         --set "molf-e:train.lora_lr=$LR_E" --set 'molf-e:molf.lora_ranks=[32,128]')
for score in "${scores[@]}"; do
  run=(examples/replication/fact_smollm2.yaml data.train=$DATA eval.data=$DATA molf.score="$score" "${options[@]}")
  molf-ds compare "${run[@]}" --set "molf:train.lora_lr=$LR" \
    --set 'molf-e:molf.lora_alphas=[32,32]' --output-dir "$OUT/$score-as-set"
  molf-ds compare "${run[@]}" --set "molf:train.lora_lr=$(python -c "print(4 * $LR)")" \
    --set 'molf-e:molf.lora_alphas=[32,64]' --output-dir "$OUT/$score-changed"
  prune "$OUT"
done
dirs=()
for score in "${scores[@]}"; do dirs+=("$OUT/$score-as-set" "$OUT/$score-changed"); done
python examples/replication/report.py routing "${dirs[@]}" --output "$OUT/routing.md"
echo "score_invariance.sh: routing shares in $OUT/routing.md"
