"""DeepSpeed checkpoints that carry MoLF's routing state.

ZeRO saves the wrapped optimizer's per-tensor state (exp_avg, exp_avg_sq, step) but not its attributes,
so the MoLF step counter rides in the engine's client state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

MOLF_KEY = "molf"


def save_checkpoint(engine: Any, save_dir: str | Path, tag: str | None = None, client_state: dict | None = None) -> None:
    """engine.save_checkpoint with the MoLF step counter in the client state (all ranks must call it)."""
    state = {**(client_state or {}), MOLF_KEY: {"step": engine.basic_optimizer.molf_step}}
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=state)


def load_checkpoint(engine: Any, load_dir: str | Path, tag: str | None = None, **kwargs: Any) -> tuple[str | None, dict]:
    """engine.load_checkpoint, then restore the MoLF step counter; returns (path, client state without it)."""
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
    if path is None:
        return None, {}
    client_state = dict(client_state or {})
    molf = client_state.pop(MOLF_KEY, None)
    if molf is None:
        raise ValueError(f"checkpoint {path} was not written by molf_ds.save_checkpoint: it has no MoLF state")
    engine.basic_optimizer.restore_step(molf["step"])
    return path, client_state
