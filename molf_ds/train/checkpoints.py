"""Checkpoint bookkeeping: tags, the completion marker, `train.resume`, and trimming the logs on resume.

DeepSpeed writes a checkpoint from every rank; rank 0 adds `COMPLETE` to the tag's directory only after all
ranks have finished, so a checkpoint whose writing was interrupted is never picked up.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import key_error

COMPLETE = "molf_ds_complete.json"
_TAG = re.compile(r"step(\d+)")


class SaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions): one line naming the checkpoint and the cause."""


@dataclass(frozen=True)
class Checkpoint:
    directory: Path  # what DeepSpeed calls the save/load dir
    tag: str
    step: int


def save_error(checkpoint: Checkpoint, rank: int, error: BaseException) -> SaveError:
    """One line: which checkpoint, why (free space on its file system: torch.save says "iostream error" for a
    full disk), and which complete checkpoint a resume would use."""
    cause = (getattr(error, "strerror", None) or str(error) or type(error).__name__).splitlines()[0]
    try:
        stat = os.statvfs(checkpoint.directory)
        free = stat.f_bavail * stat.f_frsize
        if free < max(16 << 20, stat.f_blocks * stat.f_frsize // 100):
            cause = f"no space left on device ({free:,} bytes free; {cause})"
    except OSError:
        pass
    previous = [c for c in complete(checkpoint.directory) if c.step < checkpoint.step]
    kept = f"the previous complete checkpoint {previous[-1].tag} is intact" if previous else \
        "there is no earlier complete checkpoint"
    return SaveError(f"saving checkpoint {checkpoint.tag} in {checkpoint.directory} failed on rank {rank}: {cause}; "
                     f"the partial {checkpoint.tag} has no {COMPLETE} and is never loaded, {kept}")


def tag_of(step: int) -> str:
    return f"step{step}"


def complete(directory: Path) -> list[Checkpoint]:
    """Complete checkpoints under `directory`, oldest first."""
    found = []
    for path in directory.glob("step*") if directory.is_dir() else ():
        match = _TAG.fullmatch(path.name)
        if match and (path / COMPLETE).is_file():
            found.append(Checkpoint(directory, path.name, json.loads((path / COMPLETE).read_text())["step"]))
    return sorted(found, key=lambda c: c.step)


def find_resume(resume: str | None, checkpoints: Path) -> Checkpoint | None:
    """`train.resume`: None (fresh start), "auto" (newest complete checkpoint in `checkpoints`, or a fresh start
    when there is none), a checkpoint directory (`.../checkpoints/step100`) or a directory of them."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete(checkpoints)
        return found[-1] if found else None
    path = Path(resume)
    if (path / COMPLETE).is_file():
        return Checkpoint(path.parent, path.name, json.loads((path / COMPLETE).read_text())["step"])
    found = complete(path)
    if not found:
        raise key_error("train.resume", f"{path} holds no complete molf_ds checkpoint (no {COMPLETE})")
    return found[-1]


def mark(checkpoint: Checkpoint) -> None:
    """Rank 0, after every rank has saved: write the marker atomically."""
    path = checkpoint.directory / checkpoint.tag / COMPLETE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"step": checkpoint.step}))
    os.replace(temporary, path)


def unmark(checkpoint: Checkpoint) -> None:
    """Rank 0, before the tag is (re)written."""
    (checkpoint.directory / checkpoint.tag / COMPLETE).unlink(missing_ok=True)


def trim_jsonl(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))
