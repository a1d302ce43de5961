"""Checkpoint bookkeeping: tags, the completion marker, `train.resume`, setting aside the checkpoints of an
abandoned branch, and trimming the logs on resume.

DeepSpeed writes a checkpoint from every rank; rank 0 adds `COMPLETE` to the tag's directory only after all
ranks have finished, so a checkpoint whose writing was interrupted is never picked up.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..run_dir import CHECKPOINTS, COMPLETE, CONFIG
from .config import key_error
from .data import direction

_TAG = re.compile(r"step(\d+)")


class SaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions): one line naming the checkpoint and the cause."""


@dataclass(frozen=True)
class Checkpoint:
    directory: Path  # what DeepSpeed calls the save/load dir
    tag: str
    step: int

    @property
    def universal(self) -> bool:
        """A DeepSpeed universal checkpoint (per-parameter fp32 weights and moments under zero/): loads on any
        world size and ZeRO stage."""
        return (self.directory / self.tag / "zero").is_dir()


def to_universal(source: Path, target: Path) -> Checkpoint:
    """Convert the complete checkpoint `source` (.../checkpoints/stepN) into a universal one at `target`
    (any directory; its name becomes the tag), marked complete with the same step."""
    marker = source / COMPLETE
    if not marker.is_file():
        raise key_error("train.resume", f"{source} is not a complete molf_ds checkpoint (no {COMPLETE})")
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
                    "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1",
                    "--inject_missing_state"], check=True, capture_output=True, text=True)
    _full_model_states(target)
    step = json.loads(marker.read_text())["step"]
    checkpoint = Checkpoint(target.parent, target.name, step)
    mark(checkpoint)
    return checkpoint


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


def _full_model_states(target: Path) -> None:
    """From a ZeRO-3 source, ds_to_universal keeps the per-rank model states, whose module tensors are empty
    partitions: ZeRO-0/1/2 load `mp_rank_00_model_states.pt` with full weights. Write it from rank 0's file
    (client state, MoLF state, scheduler) and the universal fp32 weights (tied weights through shared_params)."""
    full, partitioned = target / "mp_rank_00_model_states.pt", target / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if full.exists() or not partitioned.exists():
        return
    state = torch.load(partitioned, map_location="cpu", weights_only=False)
    shapes = {name: shape for group in state["param_shapes"] for name, shape in group.items()}
    optimizer_path = target / "zero" / "optimizer_state.pt"
    optimizer = torch.load(optimizer_path, map_location="cpu", weights_only=False)
    steps = [v["step"] for v in optimizer.get("optimizer_state_dict", {}).get("state", {}).values() if "step" in v]
    step = steps[0] if steps else state.get("molf", {}).get("step", 0)
    for name, shape in shapes.items():  # ZeRO-3 writes flat tensors; ZeRO-1/2 read {"param", "cat_dim"} + step.pt
        folder = target / "zero" / name
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            value = torch.load(folder / f"{kind}.pt", map_location="cpu", weights_only=False)
            if isinstance(value, torch.Tensor):
                torch.save({"param": value.reshape(shape), "cat_dim": 0}, folder / f"{kind}.pt")
        if not (folder / "step.pt").exists():
            torch.save(torch.tensor(float(step)), folder / "step.pt")
    shared = state.get("shared_params") or {}
    module = {}
    for key, empty in state["module"].items():
        name = key if key in shapes else shared.get(key, key)
        module[key] = torch.load(target / "zero" / name / "fp32.pt", weights_only=False)["param"].to(empty.dtype)
    state["module"] = module
    torch.save(state, full)
    optimizer.setdefault("ds_version", state.get("ds_version"))
    torch.save(optimizer, optimizer_path)


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


def set_aside(out: Path, start: int, logs: tuple[str, ...]) -> Path | None:
    """Rank 0, before a run starts at step `start` (0: a fresh run) in the output directory `out`: the complete
    checkpoints of later steps belong to a branch this run leaves, and resume=auto would pick them over this run's.
    Move them, with the log records after `start` (trimmed from `logs`) and that branch's config.yaml, to
    out/checkpoints/abandoned-<UTC time>/; say so in one line on stderr. Returns that directory, or None."""
    directory = out / CHECKPOINTS
    later = [c for c in complete(directory) if c.step > start]
    cut = {name: trim_jsonl(out / name, start) for name in logs}
    if not later:
        return None
    aside = directory / time.strftime("abandoned-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir(exist_ok=True)
    for checkpoint in later:
        os.replace(directory / checkpoint.tag, aside / checkpoint.tag)
    for name, lines in cut.items():
        if lines:
            (aside / name).write_text(lines)
    if (out / CONFIG).is_file():
        shutil.copy2(out / CONFIG, aside / CONFIG)
    tags = ", ".join(c.tag for c in later)
    print(f"molf-ds train: this run starts at step {start}; the later checkpoints {tags} (another branch of this "
          f"output directory) moved to {aside}/, so resume=auto continues this run", file=sys.stderr, flush=True)
    return aside


def trim_jsonl(path: Path, step: int) -> str:
    """Keep the records of steps <= `step` (a resumed run rewrites what came after its checkpoint); returns the
    lines cut."""
    if not path.is_file():
        return ""
    kept, cut = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            (kept if json.loads(line)["step"] <= step else cut).append(line + "\n")
    path.write_text("".join(kept))
    return "".join(cut)


# ---- best model and retention (train.load_best_model_at_end, train.save_total_limit) ------------------
def best_step(records: list[dict], metric: str, candidates: set[int] | None = None) -> tuple[int, float] | None:
    """(step, value) of the best evaluation at `metric` (lower for loss, otherwise higher) among the records of
    steps >= 1 (the evaluation before training is a reference, not a candidate) and, if given, in `candidates`;
    the earliest wins a tie. None when there is none."""
    sign, best = direction(metric), None
    for record in sorted(records, key=lambda r: r["step"]):
        step, value = record["step"], record.get(metric)
        if step < 1 or value is None or (candidates is not None and step not in candidates):
            continue
        if best is None or sign * value > sign * best[1]:
            best = (step, value)
    return best


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def retain(directory: Path, limit: int, keep: int | None = None) -> list[str]:
    """Rank 0, right after a checkpoint was marked complete: delete all but the newest `limit` complete
    checkpoints (and step `keep`, the best one), and the partial ones older than the newest complete one (never
    loadable). A checkpoint loses its marker before its files, so an interrupted deletion leaves nothing that
    resume would load. Returns the tags deleted."""
    found = complete(directory)
    if not found:
        return []
    kept = {c.tag for c in found[-limit:]} | ({tag_of(keep)} if keep is not None else set())
    newest = found[-1].step
    doomed = [c.tag for c in found if c.tag not in kept]
    for path in directory.glob("step*"):
        match = _TAG.fullmatch(path.name)
        if match and path.is_dir() and not (path / COMPLETE).is_file() and int(match.group(1)) < newest:
            doomed.append(path.name)
    for tag in doomed:
        (directory / tag / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(directory / tag, ignore_errors=True)
    return sorted(doomed, key=lambda tag: int(tag[4:]))


class Best:
    """The best evaluated step so far (train.load_best_model_at_end): every rank holds the same one, since the
    scores are reduced over the ranks; on resume it is read back from the trimmed eval.jsonl, among the steps
    whose checkpoint is complete."""

    def __init__(self, metric: str, step: int | None = None, value: float | None = None) -> None:
        self.metric, self.step, self.value, self.sign = metric, step, value, direction(metric)

    @classmethod
    def resumed(cls, metric: str, eval_jsonl: Path, directory: Path) -> Best:
        found = best_step(read_jsonl(eval_jsonl), metric, {c.step for c in complete(directory)})
        return cls(metric, *found) if found else cls(metric)

    def offer(self, step: int, scores: dict[str, float] | None) -> bool:
        """Whether step `step` is the new best (strictly better: the earliest of equals stays)."""
        value = (scores or {}).get(self.metric)
        if step < 1 or value is None or (self.value is not None and self.sign * value <= self.sign * self.value):
            return False
        self.step, self.value = step, value
        return True
