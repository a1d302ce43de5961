"""The routing log: JSONL, one line per logged optimizer step, written by rank 0 only and flushed each step."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist


def is_rank_zero() -> bool:
    """Whether this process writes rank-0-only outputs. Ask when writing, not earlier: before the process group
    starts (e.g. `molf_ds.initialize` under torchrun, which starts it inside `deepspeed.initialize`) every rank
    looks like rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class RoutingLog:
    """Opened by rank 0 at the first step, once the process group exists, whatever the order of setup."""

    def __init__(self, path: str | Path, every: int = 1) -> None:
        self.path = Path(path)
        self.every = every
        self._writer: bool | None = None  # decided at the first step
        self._file = None

    def _writes(self) -> bool:
        if self._writer is None:
            self._writer = is_rank_zero()
        return self._writer

    def wants(self, step: int) -> bool:
        return step % self.every == 0 and self._writes()

    def write(self, record: dict[str, Any]) -> None:
        if not self._writes():
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
