"""`molf-ds generate`: text from a saved model for one or more prompts, or a prompt loop on stdin.

MODEL is what `molf-ds eval` loads: a model directory (e.g. a run's `final/`), a run's output directory (its
`final/`), a PEFT adapter directory (e.g. `final_peft/`), a run's checkpoint (`OUT/checkpoints/stepN`, rebuilt
from the run's config.yaml), a `molf-ds models` name or a hub id. Greedy unless --temperature or --top-p asks for
sampling; the prompt goes through the tokenizer's chat template when it has one (--no-chat-template: raw text).
Only the generated text is printed on stdout, one prompt's answer after another.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import torch

from .loading import check_model_sources, load_model
from .sources import SourceError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="model directory, run output directory (uses final/), PEFT adapter, run checkpoint "
                             "(OUT/checkpoints/stepN), `molf-ds models` name or hub id")
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="the prompts, each answered in turn")
    parser.add_argument("--interactive", action="store_true",
                        help="then read prompts from stdin, one a line, until end of input or an empty line")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer, at most [128]")
    parser.add_argument("--temperature", type=float, help="sample at this temperature (> 0) [greedy]")
    parser.add_argument("--top-p", type=float, help="sample from the top-p nucleus, 0 < p <= 1 (temperature 1 "
                                                    "unless given) [greedy]")
    parser.add_argument("--seed", type=int, help="seed the sampling: the same seed, the same text [unseeded]")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="feed the prompt as raw text, not through the tokenizer's chat template")
    parser.add_argument("--tokenizer", help="tokenizer directory or id [the model's]")
    parser.add_argument("--gguf-file", help="a GGUF checkpoint inside the model directory")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))


def run(args: argparse.Namespace) -> int:
    import transformers  # deferred: slow to import

    transformers.utils.logging.disable_progress_bar()
    problem = _check(args)
    if problem:
        print(f"molf-ds generate: {problem}", file=sys.stderr)
        return 2
    try:
        check_model_sources(args.model, args.tokenizer, args.gguf_file)
        model, tokenizer = load_model(args.model, args.tokenizer, args.dtype, args.gguf_file)
    except (SourceError, FileNotFoundError, ValueError) as error:
        print(f"molf-ds generate: {error}", file=sys.stderr)
        return 2
    generator = Generator(model, tokenizer, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                          chat=not args.no_chat_template)
    for prompt in args.prompts:
        _answer(generator, prompt)
    if args.interactive:
        for prompt in _lines(sys.stdin):
            _answer(generator, prompt)
    return 0


def _check(args: argparse.Namespace) -> str | None:
    if not args.prompts and not args.interactive:
        return "give a PROMPT or --interactive"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"
    if args.temperature is not None and args.temperature < 0:
        return f"--temperature must be >= 0 (0: greedy), got {args.temperature}"
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return f"--top-p must be in (0, 1], got {args.top_p}"
    return None


def _answer(generator: Generator, prompt: str) -> None:
    print(generator(prompt), flush=True)


def _lines(stream: TextIO) -> Iterator[str]:
    """Prompts from `stream` until its end or an empty line; '> ' on stderr before each when it is a terminal."""
    while True:
        if stream.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line.strip():
            return
        yield line.rstrip("\n")


class Generator:
    """prompt -> generated text (the new tokens only, special tokens dropped)."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 128, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, chat: bool = True) -> None:
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.chat = chat and bool(getattr(tokenizer, "chat_template", None))
        sample = bool(temperature) or top_p is not None
        eos = tokenizer.eos_token_id
        self.options: dict[str, Any] = {  # unset ones override the model's generation_config
            "max_new_tokens": max_new_tokens, "do_sample": sample,
            "temperature": (temperature or 1.0) if sample else None, "top_p": top_p if sample else None,
            "top_k": None, "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        }
        if eos is not None:
            self.options["eos_token_id"] = eos
        self.seed = seed

    def encode(self, prompt: str) -> dict[str, Any]:
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        return self.tokenizer(prompt, return_tensors="pt")

    def __call__(self, prompt: str) -> str:
        batch = {k: v.to(self.device) for k, v in self.encode(prompt).items() if k in ("input_ids", "attention_mask")}
        if self.seed is not None:
            torch.manual_seed(self.seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(self.seed)
        with torch.no_grad():
            output = self.model.generate(**batch, **self.options)
        return self.tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
