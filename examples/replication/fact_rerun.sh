#!/usr/bin/env bash
# The fact comparison rerun on the regenerated data (no trained neighbours), at the lrs the first data's dev half
# chose (runs/fact/dev/chosen.txt), MoLF at equal lrs as its main row, under EPD and LDW:
#   test/            fft, lora, adalora, molf (EPD, LoRA lr = lr), molf-e (EPD, the paper's alphas)
#   test-ldw/        molf and molf-e under LDW
#   test-molf-e-eq/  molf-e with equal expert scalings (alpha 64 on r=128), EPD
#   test-pfn/        molf and molf-e under the authors' PFN
#   test-lora-4x/    molf with LoRA lr = 4 x lr, EPD (LDW's decisions do not depend on it: tests/test_scores.py)
#   test-top2/       molf-e with top_k=2 of its 2 experts, the authors' public command: both update every step
# then summary.md (paired per-seed differences against FFT, LoRA and AdaLoRA) and routing.md.
#   ./examples/replication/fact_rerun.sh      (SEEDS=5; `compare --reuse` resumes an interrupted run)
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/replication/common.sh
OUT=${OUT:-examples/replication/runs/fact-rerun}
DATA=examples/replication/data/facts_smollm2_test.json
SEEDS=${SEEDS:-5}
yaml=examples/replication/fact_smollm2.yaml
# --set=METHOD:key=value lines: the dev choices, MoLF's full lr for both of its lrs, MoLF-E's ranks
sets=$(grep -v -e '^--set=molf:' examples/replication/runs/fact/dev/chosen.txt
       printf '%s\n' --set=molf:train.lr=2e-4 --set=molf:train.lora_lr=2e-4 '--set=molf-e:molf.lora_ranks=[32,128]')

mkdir -p "$OUT"
[ -f "$OUT/base.json" ] || torchrun --standalone --nproc_per_node 2 -m molf_ds.commands eval smollm2-135m \
  --task fact --data "$DATA" --batch-size 32 --max-new-tokens 48 --no-progress --output "$OUT/base.json"
compare() {  # DIR METHODS [compare arguments ...]; an argument --set=METHOD:key=value replaces the chosen key
  local dir=$1 methods=$2 own arg rest replaced=(-e '^$')
  shift 2
  for arg in "$@"; do
    rest=${arg#--set=}
    [[ $arg == --set=* ]] && replaced+=(-e "^--set=${rest%%=*}=")
  done
  mapfile -t own < <(grep -E "^--set=(${methods//,/|}):" <<< "$sets" | grep -v "${replaced[@]}")   # compare refuses others' --set
  molf-ds compare "$yaml" "$@" --methods "$methods" --seeds "$SEEDS" "${own[@]}" --reuse --output-dir "$OUT/$dir"
  prune "$OUT"
}
compare test fft,lora,adalora,molf,molf-e --set 'molf-e:molf.lora_alphas=[32,32]'
compare test-ldw molf,molf-e molf.score=ldw --set 'molf-e:molf.lora_alphas=[32,32]'
compare test-molf-e-eq molf-e --set 'molf-e:molf.lora_alphas=[32,64]'
compare test-pfn molf,molf-e molf.score=pfn --set 'molf-e:molf.lora_alphas=[32,32]'
compare test-lora-4x molf --set=molf:train.lora_lr=8e-4
compare test-top2 molf-e --set 'molf-e:molf.lora_alphas=[32,32]' --set=molf-e:molf.top_k=2
tests=("$OUT/test" "$OUT/test-ldw" "$OUT/test-molf-e-eq" "$OUT/test-pfn" "$OUT/test-lora-4x" "$OUT/test-top2")
python examples/replication/report.py summary "${tests[@]}" --base "$OUT/base.json" --output "$OUT/summary.md"
python examples/replication/report.py routing "${tests[@]}" --output "$OUT/routing.md"
echo "fact_rerun.sh: $OUT/summary.md, $OUT/routing.md"
