"""The demos' closing lines: the CounterFact scores before and after training, from OUT_DIR/eval.jsonl."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines() if line.strip()]
before, after = records[0], records[-1]
print(f"\ndemo: efficacy (share of rewrites with P(new) > P(true)) {before['efficacy']:.3f} before training, "
      f"{after['efficacy']:.3f} after; paraphrase {before['paraphrase']:.3f} -> {after['paraphrase']:.3f}, "
      f"neighborhood {before['neighborhood']:.3f} -> {after['neighborhood']:.3f}")
print(f"demo: outputs in {out}/ (final/ is the merged model + tokenizer; routing.png, metrics.jsonl, routing.jsonl, "
      f"eval.jsonl)")
