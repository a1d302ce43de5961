"""`molf-ds export`: a saved model, merged, written as one GGUF file (llama.cpp, Ollama, LM Studio) or a transformers
directory.

MODEL is what `molf-ds eval` loads: a model directory (e.g. a run's `final/`), a run's output directory (its
`final/`), a PEFT adapter directory (merged into its base), a run's checkpoint (`OUT/checkpoints/stepN`), a
`molf-ds models` name or hub id, or with --gguf-file a GGUF checkpoint. `--format gguf` (llama and gemma3
architectures; --type f32, f16, bf16 or q8_0) writes the weights, the architecture's metadata, the tokenizer and
its chat template into --out; `--format hf` writes the merged model and tokenizer as a transformers directory.
Progress goes to stderr; stdout has only the path written.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from molf_ds.export_gguf import TYPES

    parser.add_argument("model", metavar="MODEL",
                        help="model directory, run output directory (uses final/), PEFT adapter, run checkpoint "
                             "(OUT/checkpoints/stepN), `molf-ds models` name or hub id")
    parser.add_argument("--format", choices=("gguf", "hf"), default="gguf", help="what to write [gguf]")
    parser.add_argument("--out", required=True, help="the GGUF file (gguf) or directory (hf) to write")
    parser.add_argument("--type", choices=TYPES, default="f32", help="GGUF tensor type of the 2-D weights [f32]")
    parser.add_argument("--tokenizer", help="tokenizer directory or id [the model's]")
    parser.add_argument("--gguf-file", help="a GGUF checkpoint inside the model directory")


def run(args: argparse.Namespace) -> int:
    import transformers

    from molf_ds.export_gguf import ExportError, write_gguf

    from .loading import check_model_sources, load_model
    from .sources import SourceError

    transformers.utils.logging.disable_progress_bar()
    try:
        check_model_sources(args.model, args.tokenizer, args.gguf_file)
        model, tokenizer = load_model(args.model, args.tokenizer, "float32", args.gguf_file)
        if args.format == "hf":
            model.save_pretrained(args.out)
            tokenizer.save_pretrained(args.out)
        else:
            write_gguf(model, tokenizer, args.out, args.type, progress=True)
    except (SourceError, ExportError, FileNotFoundError) as error:
        print(f"molf-ds export: {error}", file=sys.stderr)
        return 2
    print(args.out)
    return 0
