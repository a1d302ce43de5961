#!/usr/bin/env bash
# The demo: install molf_ds, generate a small counterfactual-knowledge task (CounterFact schema), a word-level
# tokenizer and a tiny random-init Qwen2 under runs/demo/, train it with MoLF on DeepSpeed ZeRO-2 (2 CPU
# processes, or every GPU), and compare the CounterFact scores before and after training.
# Arguments are `molf-ds train` overrides, e.g. ./launch/demo.sh train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
./launch/install.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore::FutureWarning
ranks=2
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ranks=$(nvidia-smi -L | wc -l)
fi
python -m molf_ds.train.demo runs/demo
rm -rf runs/demo/out
torchrun --standalone --nproc_per_node "$ranks" -m molf_ds.train examples/demo.yaml "$@"
python - <<'PY'
import json

records = [json.loads(line) for line in open("runs/demo/out/eval.jsonl")]
before, after = records[0], records[-1]
print(f"\ndemo: efficacy (share of rewrites with P(new) > P(true)) {before['efficacy']:.3f} before training, "
      f"{after['efficacy']:.3f} after; paraphrase {before['paraphrase']:.3f} -> {after['paraphrase']:.3f}, "
      f"neighborhood {before['neighborhood']:.3f} -> {after['neighborhood']:.3f}")
print("demo: trained outputs in runs/demo/out/ (final/ is the merged model + tokenizer; routing.png, metrics.jsonl, "
      "routing.jsonl, eval.jsonl, checkpoints/); generated inputs in runs/demo/data, runs/demo/tokenizer, runs/demo/model")
PY
