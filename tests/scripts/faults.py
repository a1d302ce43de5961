"""Entry point for the fault tests: `torchrun ... tests/scripts/faults.py CONFIG.yaml key=value...` runs `molf-ds train`
with the fault that MOLF_DS_FAULT names injected into one rank (the rank's own code, nothing mocked around it):

- `kill_at_step:STEP:RANK`: RANK SIGKILLs itself as optimizer step STEP begins (after writing the time to
  MOLF_DS_FAULT_STAMP);
- `kill_in_save:STEP:RANK`: RANK SIGKILLs itself after writing its files of checkpoint STEP, before the
  checkpoint is marked complete;
- `nan_batch:MICRO:RANK`: RANK's training micro-batch number MICRO (0-based, counted in this process) has
  every label masked, so its loss is NaN (a mean over no tokens), as a batch of bad data would make it.
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch

from molf_ds.commands.cli import main

kind, _, args = os.environ.get("MOLF_DS_FAULT", "").partition(":")
rank = int(os.environ.get("RANK", "0"))
if kind:
    at, victim = map(int, args.split(":"))


def _die() -> None:
    stamp = os.environ.get("MOLF_DS_FAULT_STAMP")
    if stamp:
        Path(stamp).write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "kill_at_step" and rank == victim:
    from molf_ds.commands.train import loop

    step = loop.Loop.step

    def killed_step(self, s):
        if s == at:
            _die()
        return step(self, s)

    loop.Loop.step = killed_step
elif kind == "kill_in_save" and rank == victim:
    from molf_ds.commands.train import methods

    save = methods.Trainee.save_checkpoint

    def killed_save(self, directory, tag, client_state):
        save(self, directory, tag, client_state)
        if client_state["step"] == at:
            _die()

    methods.Trainee.save_checkpoint = killed_save
elif kind == "nan_batch" and rank == victim:
    from molf_ds.commands.train import loop

    class BadCollator(loop.Collator):
        calls = 0

        def __call__(self, features):
            batch = super().__call__(features)
            if BadCollator.calls == at:
                batch["labels"] = torch.full_like(batch["labels"], -100)
            BadCollator.calls += 1
            return batch

    loop.Collator = BadCollator
elif kind and kind not in ("kill_at_step", "kill_in_save", "nan_batch"):
    raise SystemExit(f"unknown MOLF_DS_FAULT {kind!r}")

sys.exit(main(["train", *sys.argv[1:]]))
