"""The Triton kernels on CPU, as the tests run them: the environment of a rank that uses them (Triton's interpreter),
and a count of the Triton launches a block of code makes, by kernel (the interpreter's launch entry)."""
from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

import molf_ds

TRITON_ENV = {"MOLF_DS_KERNEL": "triton", "TRITON_INTERPRET": "1"}


@contextlib.contextmanager
def count_triton_launches() -> Iterator[Counter]:
    """Launches of interpreted Triton kernels inside the block, by kernel name."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: Counter = Counter()
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    InterpretedFunction.run = counted
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


def launches_per_step(rank: int, world: int, model_dirs: list[str], ds: dict, molf: dict, batches: list,
                      out: str) -> None:
    """For each model: train on this rank's slice of `batches` under DeepSpeed config `ds`; save the Triton launches
    of each engine.step() (one Counter per step and model) and the backend the optimizer reported."""
    import deepspeed

    from helpers.zero_runs import load

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = {}
    for model_dir in model_dirs:
        engine, *_ = molf_ds.initialize(load(model_dir, seed=0), molf_ds.MoLFConfig(**molf), ds)
        steps = []
        for ids in batches:
            local = ids.chunk(world)[rank]
            engine.backward(engine(input_ids=local, labels=local).loss)
            with count_triton_launches() as launches:
                engine.step()
            steps.append(dict(launches))
        results[model_dir] = {"launches": steps, "backend": engine.basic_optimizer.kernel_backend}
    torch.save(results, Path(out) / f"launches{rank}.pt")
