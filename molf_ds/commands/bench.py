"""MoLF's step time, memory and collectives against FFT and LoRA, per ZeRO stage (`molf-ds bench`).

The benchmarking lab lives in the git checkout (benchmarks/lab), not in the installed package: this command runs
the lab of the checkout molf_ds is installed from (`pip install -e .`), and says so where there is none."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

NO_CHECKOUT = ("molf-ds bench runs from a git checkout of molf_ds (clone the repository, then pip install -e .); "
               "this install has no benchmarks/ beside the package")


def checkout() -> Path | None:
    """The repository root next to the imported molf_ds package, if it holds the lab."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks" / "lab" / "__init__.py").is_file() else None


def lab() -> ModuleType | None:
    """benchmarks.lab of the checkout (its root put on sys.path), None without a checkout."""
    root = checkout()
    if root is None:
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.lab")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    module = lab()
    if module is None:  # whatever follows `bench` is left to run(), which says where bench runs
        parser.set_defaults(takes_any_arguments=True)
    else:
        module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    module = lab()
    if module is None:
        print(NO_CHECKOUT, file=sys.stderr)
        return 2
    return module.run(args)
