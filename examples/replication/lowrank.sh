#!/usr/bin/env bash
# Issue 31's LoRA-favoured regime: a task low-rank by construction (city_codes_smollm2.yaml: one code word per
# country, learnt from 4 cities each, tested on cities never trained). Does MoLF follow LoRA where LoRA wins?
#   ./examples/replication/lowrank.sh      (SEEDS=5; `compare --reuse` resumes an interrupted run)
# (0) the base model on the test cities; (1) lrs on the dev cities for fft, lora and molf (EPD, LoRA lr = lr), seed
# 100, over the grid and the extensions below; (2) the test comparison at the chosen lrs: fft, lora, molf under EPD
# (test/), LDW (test-ldw/) and PFN (test-pfn/), MoLF at its EPD-chosen lr under each score; (3) summary.md and
# routing.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/replication/common.sh
OUT=${OUT:-examples/replication/runs/city_codes}
DATA=examples/replication/data
SEEDS=${SEEDS:-5}
GRID=(5e-5 1e-4 2e-4 4e-4)
yaml=examples/replication/city_codes_smollm2.yaml

record_environment "$OUT/environment.txt"
[ -f "$OUT/base.json" ] || torchrun --standalone --nproc_per_node 2 -m molf_ds.commands eval smollm2-135m \
  --task jsonl --data "$DATA/city_codes_test.jsonl" --batch-size 32 --max-new-tokens 4 --no-progress \
  --output "$OUT/base.json"

dev() {  # LR METHODS
  molf-ds compare "$yaml" eval.data="$DATA/city_codes_dev.jsonl" train.lr="$1" train.lora_lr="$1" \
    --methods "$2" --seeds 1 --first-seed 100 --reuse --output-dir "$OUT/dev/lr$1"
  prune "$OUT/dev"
}
for lr in "${GRID[@]}"; do dev "$lr" fft,lora,molf; done
dev 8e-4 fft,lora,molf      # past the grid's edge: fft and molf scored best at it on the first pass, and lora's
dev 1.6e-3 lora             # training loss stayed 2-12x fft's up to 4e-4
python examples/replication/report.py select "$OUT"/dev/lr* --variants fft,lora,molf --table "$OUT/dev/selection.md" \
  --sets "$OUT/dev/chosen.txt"
mapfile -t sets < "$OUT/dev/chosen.txt"
mapfile -t molf_sets < <(grep '^--set=molf:' "$OUT/dev/chosen.txt")

molf-ds compare "$yaml" --methods fft,lora,molf --seeds "$SEEDS" "${sets[@]}" --reuse --output-dir "$OUT/test"
for score in ldw pfn; do
  molf-ds compare "$yaml" molf.score=$score --methods molf --seeds "$SEEDS" "${molf_sets[@]}" --reuse \
    --output-dir "$OUT/test-$score"
done
prune "$OUT"
tests=("$OUT/test" "$OUT/test-ldw" "$OUT/test-pfn")
python examples/replication/report.py summary "${tests[@]}" --base "$OUT/base.json" --output "$OUT/summary.md"
python examples/replication/report.py routing "${tests[@]}" --output "$OUT/routing.md"
echo "lowrank.sh: $OUT/dev/selection.md, $OUT/summary.md, $OUT/routing.md"
