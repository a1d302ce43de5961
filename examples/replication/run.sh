#!/usr/bin/env bash
# Issue 19's replication on SmolLM2-135M: does MoLF track the better of FFT and LoRA, and does MoLF-E beat AdaLoRA?
#   ./examples/replication/run.sh [fact] [sql]      (both tasks by default; outputs under $OUT)
# Per task: (0) the base model's scores; (1) every method's lrs on the dev split (other facts / two other SQL
# schemas), one training seed (100) that no test run uses, over the task's grid below, extended one step past its
# edge for the methods that won there; (2) the test comparison, 3 seeds at the chosen lrs, with
# MoLF-E at the paper's defaults and, in a second comparison, with equal expert scaling at MoLF-E's lrs (only alpha
# differs), and in a third MoLF with the LoRA lr equal to its chosen lr, where they differ; (3) tables, figures.
# `compare --reuse` skips finished runs: after an interruption, run the script again. A finished run is reused
# only while its resolved config and data files are unchanged (others move to stale/ and rerun; runs recorded
# before compare kept their data's hash rerun once). $OUT defaults to
# examples/replication/runs, where the runs' small records (config, evaluations, metrics, routing figure) are
# committed so that the work spans sessions and machines; its .gitignore keeps out the models, checkpoints and
# logs. Each run's merged model (final/, 540 MB) is deleted once its comparison is written, unless KEEP_FINAL=1.
# Pipeline smoke test: OUT=/tmp/r FIGURES=/tmp/r GRID=1e-4 RATIO4=4e-4 ADALORA_GRID= BEYOND= SEEDS=1 \
#   OVERRIDES="train.max_steps=2" run.sh      (GRID, RATIO4, ADALORA_GRID, BEYOND replace the task's grids)
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/replication/common.sh
OUT=${OUT:-examples/replication/runs}
DATA=examples/replication/data
FIGURES=${FIGURES:-examples/replication/figures}
METHODS=fft,lora,lora-rest,adalora,molf,molf-e
read -ra OVERRIDES <<< "${OVERRIDES:-}"          # key=value for every run (none for the replication)
SEEDS=${SEEDS:-3}
MOLF_E=(--set 'molf-e:molf.lora_ranks=[32,128]' --set 'molf-e:molf.lora_alphas=[32,32]')     # scalings 5.66, 2.83
MOLF_E_EQ=(--set 'molf-e:molf.lora_ranks=[32,128]' --set 'molf-e:molf.lora_alphas=[32,64]')  # scalings 5.66, 5.66
tasks=("$@")
[ ${#tasks[@]} -gt 0 ] || tasks=(fact sql)

record_environment "$OUT/environment.txt"
python -c 'from importlib.metadata import version as v
print(*(f"{p} {v(p)}" for p in ("torch", "deepspeed", "transformers", "peft")), sep=", ")' >> "$OUT/environment.txt"

for task in "${tasks[@]}"; do
  yaml=examples/replication/${task}_smollm2.yaml
  case $task in
    # grid: lr = lora_lr for grid_methods; ratio4: MoLF also with lora_lr = 4 x lr (one per grid lr, - for none);
    # adalora_grid: AdaLoRA's own lrs (its singular values start at 0: it learnt nothing on fact up to 1e-3);
    # beyond: "lr methods", the next lr past the grid's edge for the methods whose best dev score was at it
    fact) dev=(data.train=$DATA/facts_smollm2_dev.json eval.data=$DATA/facts_smollm2_dev.json)
          test_data=$DATA/facts_smollm2_test.json metrics=(efficacy paraphrase neighborhood) batch=32
          grid=(5e-5 1e-4 2e-4 4e-4) ratio4=(2e-4 4e-4 8e-4 1.6e-3) adalora_grid=(1e-3 3e-3 1e-2 3e-2 1e-1)
          grid_methods=$METHODS beyond=() ;;
    sql)  dev=(eval.data=$DATA/sql_dev.jsonl)
          test_data=$DATA/sql_test.jsonl metrics=(exact_match) batch=16
          grid=(5e-5 1e-4 2e-4) ratio4=(2e-4 4e-4 8e-4) adalora_grid=(1e-2 3e-2 1e-1)
          grid_methods=fft,lora,lora-rest,molf,molf-e beyond=("2.5e-5 fft,molf" "4e-4 molf-e" "3e-3 adalora") ;;
          # AdaLoRA scored 0 at 5e-5 here too; on the first pass fft and molf won at 5e-5, molf-e at 2e-4 and
          # adalora at 1e-2
    *)    echo "run.sh: unknown task $task (fact, sql)" >&2; exit 2 ;;
  esac
  [ -z "${GRID+set}" ] || read -ra grid <<< "$GRID"
  [ -z "${RATIO4+set}" ] || read -ra ratio4 <<< "$RATIO4"
  [ -z "${ADALORA_GRID+set}" ] || read -ra adalora_grid <<< "$ADALORA_GRID"
  [ -z "${BEYOND+set}" ] || IFS=';' read -ra beyond <<< "$BEYOND"          # "lr methods;lr methods"
  out=$OUT/$task

  # (0) the base model on the test split (2 ranks, as the runs evaluate)
  [ -f "$out/base.json" ] || torchrun --standalone --nproc_per_node 2 -m molf_ds.commands eval smollm2-135m \
    --task "$task" --data "$test_data" --batch-size $batch --max-new-tokens 48 --no-progress --output "$out/base.json"

  # (1) lrs on the dev split
  dev_compare() {  # LR LORA_LR METHODS DIR
    local molf_e=(); [[ ,$3, != *,molf-e,* ]] || molf_e=("${MOLF_E[@]}")
    molf-ds compare "$yaml" "${OVERRIDES[@]}" "${dev[@]}" train.lr="$1" train.lora_lr="$2" --methods "$3" \
      --seeds 1 --first-seed 100 "${molf_e[@]}" --reuse --output-dir "$out/dev/$4"
    prune "$out/dev"
  }
  for i in "${!grid[@]}"; do
    lr=${grid[$i]}
    dev_compare "$lr" "$lr" "$grid_methods" "lr$lr"
    [ "${ratio4[$i]:--}" = - ] || dev_compare "$lr" "${ratio4[$i]}" molf "lr$lr-molf-ratio4"
  done
  for setting in "${beyond[@]}"; do
    read -r lr methods <<< "$setting"
    dev_compare "$lr" "$lr" "$methods" "lr$lr"
  done
  for lr in "${adalora_grid[@]}"; do
    dev_compare "$lr" "$lr" adalora "lr$lr-adalora"
  done
  python examples/replication/report.py select "$out"/dev/lr* --variants $METHODS --table "$out/dev/selection.md" \
    --sets "$out/dev/chosen.txt"
  sets=$(< "$out/dev/chosen.txt")                          # --set=METHOD:train.lr=..., one a line
  sets_e=$(grep '^--set=molf-e:' "$out/dev/chosen.txt")
  lr_molf=$(sed -n 's/^--set=molf:train.lr=//p' "$out/dev/chosen.txt")
  lora_lr_molf=$(sed -n 's/^--set=molf:train.lora_lr=//p' "$out/dev/chosen.txt")

  # (2) the test comparison; a rerun with --metric only rewrites the report (every run is reused)
  for metric in "${metrics[@]}"; do
    molf-ds compare "$yaml" "${OVERRIDES[@]}" --methods $METHODS --seeds "$SEEDS" "${MOLF_E[@]}" $sets --reuse \
      --metric "$metric" --output-dir "$out/test"
    cp "$out/test/comparison.md" "$out/test/comparison_$metric.md"
  done
  molf-ds compare "$yaml" "${OVERRIDES[@]}" --methods molf-e --seeds "$SEEDS" "${MOLF_E_EQ[@]}" $sets_e --reuse \
    --output-dir "$out/test-molf-e-eq"
  tests=("$out/test" "$out/test-molf-e-eq")
  if [ "$lr_molf" != "$lora_lr_molf" ]; then  # a supplement, not a selection: MoLF with the LoRA lr equal to its
    # chosen lr (EPD scores scale with each expert's lr, so a higher LoRA lr can leave `full` no decision)
    molf-ds compare "$yaml" "${OVERRIDES[@]}" --methods molf --seeds "$SEEDS" --set "molf:train.lr=$lr_molf" \
      --set "molf:train.lora_lr=$lr_molf" --reuse --output-dir "$out/test-molf-equal-lr"
    tests+=("$out/test-molf-equal-lr")
  fi

  prune "$out"

  # (3) the results table, routing shares per projection type, and the routing figures of seed 0
  python examples/replication/report.py summary "${tests[@]}" --base "$out/base.json" --output "$out/summary.md"
  python examples/replication/report.py routing "${tests[@]}" --output "$out/routing.md"
  mkdir -p "$FIGURES"
  cp "$out/test/runs/molf-seed0/routing.png" "$FIGURES/${task}_molf_routing.png"
  cp "$out/test/runs/molf-e-seed0/routing.png" "$FIGURES/${task}_molf-e_routing.png"
  cp "$out/test-molf-e-eq/runs/molf-e-seed0/routing.png" "$FIGURES/${task}_molf-e-eq_routing.png"
  if [ "$lr_molf" != "$lora_lr_molf" ]; then
    cp "$out/test-molf-equal-lr/runs/molf-seed0/routing.png" "$FIGURES/${task}_molf-equal-lr_routing.png"
  fi
done
echo "run.sh: results under $OUT (environment.txt, TASK/base.json, TASK/dev/selection.md, TASK/test*/comparison*.md,"
echo "        TASK/summary.md, TASK/routing.md); figures in $FIGURES"
