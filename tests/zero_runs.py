"""Training runs for the DeepSpeed tests: the single-process reference and the per-rank DeepSpeed worker."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import molf_ds
from distributed import count_collectives


def load(model_dir: str | Path, seed: int) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(seed)  # LoRA init draws from the global generator: same seed, same experts
    return model


def reference_run(model_dir: str | Path, molf: dict[str, Any], batches: list[torch.Tensor], seed: int = 0) -> dict:
    """One process, the whole global batch, build_optimizer: the run every stage must reproduce."""
    cfg = molf_ds.MoLFConfig(**molf)
    model = molf_ds.wrap_model(load(model_dir, seed), cfg)
    optimizer = molf_ds.build_optimizer(model, cfg)
    winners, scores = [], []
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        winners.append(optimizer.last_winners.clone())
        scores.append(optimizer.last_scores.clone())
    return {"winners": winners, "scores": scores, "merged": molf_ds.merged_state_dict(model)}


def deepspeed_worker(rank: int, world: int, model_dir: str, molf: dict, runs: dict, batches: list, out: str) -> None:
    """For each named DeepSpeed config in `runs`: train on this rank's slice of every global batch and
    save what the test checks (winners, scores, losses, collectives per step, layout cells, merged weights)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = {}
    for name, run in runs.items():
        log = Path(out) / f"{name}.routing.jsonl"
        engine, *_ = molf_ds.initialize(load(model_dir, seed=0), molf_ds.MoLFConfig(**molf), run["ds"], routing_log=log)
        optimizer = engine.basic_optimizer
        cells = sorted({c for layout in optimizer.layouts.layouts.values() for c in layout.cells.tolist()}) \
            if hasattr(optimizer.layouts, "layouts") else None
        record: dict[str, Any] = {"winners": [], "scores": [], "losses": [], "collectives": [], "cells": cells}
        for step, ids in enumerate(batches):
            if step == run.get("resume_at"):  # a new engine on a fresh model, from the checkpoint
                molf_ds.save_checkpoint(engine, Path(out) / f"{name}.ckpt", tag="mid")
                engine, *_ = molf_ds.initialize(load(model_dir, seed=99), molf_ds.MoLFConfig(**molf), run["ds"],
                                                routing_log=log)
                molf_ds.load_checkpoint(engine, Path(out) / f"{name}.ckpt", tag="mid")
                optimizer = engine.basic_optimizer
            local = ids.chunk(world)[rank]
            loss = engine(input_ids=local, labels=local).loss
            if step in run.get("overflow_steps", ()):
                loss = loss * float("inf")
            engine.backward(loss)
            before = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
            with count_collectives() as calls:
                engine.step()
            record["collectives"].append(list(calls))
            if step in run.get("overflow_steps", ()):
                after = engine.module.state_dict()
                record.setdefault("overflow_changed", []).append(
                    max((after[k].float() - v).abs().max().item() for k, v in before.items()))
            record["losses"].append(loss.item())
            record["winners"].append(optimizer.last_winners.clone())
            record["scores"].append(optimizer.last_scores.clone())
        record["merged"] = {k: v.float() for k, v in molf_ds.merged_state_dict(engine.module).items()}
        if "baseline_ds" in run:
            record["baseline_collectives"] = _adamw_collectives(
                model_dir, molf, run["baseline_ds"], batches[:2], rank, world)
        results[name] = record
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _adamw_collectives(model_dir: str, molf: dict, ds: dict, batches: list, rank: int, world: int) -> list[list[str]]:
    """Collectives per optimizer step with torch AdamW as DeepSpeed's client, on the same wrapped model and
    the same param groups (DeepSpeed gathers each group's partitions separately)."""
    import deepspeed

    cfg = molf_ds.MoLFConfig(**molf)
    model = molf_ds.wrap_model(load(model_dir, seed=0), cfg)
    groups = molf_ds.optim.param_groups(model, molf_ds.optim.ExpertIndex(model), cfg)
    optimizer = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    counts = []
    for ids in batches:
        local = ids.chunk(world)[rank]
        engine.backward(engine(input_ids=local, labels=local).loss)
        with count_collectives() as calls:
            engine.step()
        counts.append(list(calls))
    return counts
