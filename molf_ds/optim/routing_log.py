"""The routing log: JSONL, one line per logged optimizer step, written by rank 0 only and flushed each step."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class RoutingLog:
    def __init__(self, path: str | Path, every: int = 1) -> None:
        self.path = Path(path)
        self.every = every
        self._file = None
        if is_rank_zero():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def wants(self, step: int) -> bool:
        return self._file is not None and step % self.every == 0

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
