"""Training runs for the DeepSpeed tests: the single-process reference, the per-rank DeepSpeed worker,
and the check that a run reproduces the reference."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import molf_ds
from helpers.distributed import count_collectives

STEPS, GLOBAL_BATCH, SEQ = 20, 4, 16
MOLF = dict(lora_ranks=(8,), lora_alphas=(16.0,), lora_dropout=0.0, lr=1e-3, lora_lr=6e-4)  # both experts win
NEAR_TIE = 1e-6


def load(model_dir: str | Path, seed: int) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(seed)  # LoRA init draws from the global generator: same seed, same experts
    return model


def reference_run(
    model_dir: str | Path, molf: dict[str, Any], batches: list[torch.Tensor], seed: int = 0, clip: float = 0.0
) -> dict:
    """One process, the whole global batch, build_optimizer: the run every stage must reproduce."""
    cfg = molf_ds.MoLFConfig(**molf)
    model = molf_ds.wrap_model(load(model_dir, seed), cfg)
    optimizer = molf_ds.build_optimizer(model, cfg)
    winners, scores = [], []
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        winners.append(optimizer.last_winners.clone())
        scores.append(optimizer.last_scores.clone())
    return {"winners": winners, "scores": scores, "merged": molf_ds.merged_state_dict(model)}


def deepspeed_worker(rank: int, world: int, model_dir: str, molf: dict, runs: dict, batches: list, out: str) -> None:
    """For each named DeepSpeed config in `runs`: train on this rank's slice of every global batch and
    save what the test checks (winners, scores, losses, collectives per step, layout cells, merged weights).
    Run options: "molf" overrides MoLFConfig fields, "zero_init" loads the model partitioned (transformers'
    ZeRO-3 loading), "save_merged" writes the merged checkpoint to OUT/NAME.final, "export_peft" the PEFT
    adapter to OUT/NAME.peft (and the logits on batch 0), "resume_at", "overflow_steps", "baseline_ds"."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = {}
    for name, run in runs.items():
        log = Path(out) / f"{name}.routing.jsonl"
        zero3_loading = HfDeepSpeedConfig(run["ds"]) if run.get("zero_init") else None  # alive while loading
        model = load(model_dir, seed=0)
        partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
        cfg = molf_ds.MoLFConfig(**{**molf, **run.get("molf", {})})
        engine, *_ = molf_ds.initialize(model, cfg, run["ds"], routing_log=log)
        del zero3_loading
        optimizer = engine.basic_optimizer
        cells = sorted({s[2] for layout in optimizer.router.layouts.layouts.values() for s in layout.segments}) \
            if hasattr(optimizer.router.layouts, "layouts") else None
        record: dict[str, Any] = {"winners": [], "scores": [], "losses": [], "collectives": [], "cells": cells,
                                  "built_partitioned": partitioned, "step_elements": []}
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
            overflow = step in run.get("overflow_steps", ())
            before = molf_ds.merged_state_dict(engine.module) if overflow else None  # gathered under ZeRO-3
            with count_collectives() as calls:
                engine.step()
            record["collectives"].append(list(calls))
            if overflow:
                after = molf_ds.merged_state_dict(engine.module)
                record.setdefault("overflow_changed", []).append(
                    max((after[k].float() - v.float()).abs().max().item() for k, v in before.items()))
            record["losses"].append(loss.item())
            record["winners"].append(optimizer.last_winners.clone())
            record["scores"].append(optimizer.last_scores.clone())
            record["step_elements"].append(dict(optimizer.last_step_elements))
        record["resident"] = _residency(engine.module)
        record["merged"] = {k: v.float() for k, v in molf_ds.merged_state_dict(engine.module).items()}
        if run.get("save_merged"):
            molf_ds.save_merged(engine, Path(out) / f"{name}.final")
        if run.get("export_peft"):
            molf_ds.export_peft(engine, Path(out) / f"{name}.peft")
            with torch.no_grad():
                record["probe_logits"] = engine(input_ids=batches[0]).logits.float()
        if "baseline_ds" in run:
            record["baseline_collectives"] = _adamw_collectives(
                model_dir, molf, run["baseline_ds"], batches[:2], rank, world)
        results[name] = record
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _residency(model: torch.nn.Module) -> dict[str, bool] | None:
    """Under ZeRO-3: whether LoRA and base weights are gathered (resident) between steps."""
    layer = molf_ds.molf_modules(model)[0][1]
    if not hasattr(layer.base_layer.weight, "ds_status"):
        return None
    available = lambda p: p.ds_status.name == "AVAILABLE"  # noqa: E731
    return {"lora": all(available(p) for m in (*layer.lora_A, *layer.lora_B) for p in m.parameters()),
            "base": available(layer.base_layer.weight)}


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


def _near_tie(scores: torch.Tensor) -> torch.Tensor:
    top2 = scores.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).abs() <= NEAR_TIE * top2[:, 0].abs()


def assert_reproduces(reference: dict, got_per_rank: list[dict], run: str, root) -> None:
    """Winners at every step and module (near-ties excepted), scores, merged weights, and the routing log."""
    for got in got_per_rank:
        for step, (want, have, scores) in enumerate(zip(reference["winners"], got["winners"], reference["scores"])):
            differs = (want != have).any(dim=1)
            assert not (differs & ~_near_tie(scores)).any(), f"{run}: winners differ at step {step + 1}"
            torch.testing.assert_close(got["scores"][step], scores, rtol=1e-4, atol=1e-12)
        for key, value in reference["merged"].items():
            torch.testing.assert_close(got["merged"][key], value, rtol=1e-5, atol=1e-5, msg=f"{run}: {key}")
    wins = torch.stack(reference["winners"]).float().mean(dim=(0, 1))
    assert (wins > 0).all(), f"the run must route to every expert to test anything: shares {wins.tolist()}"
    lines = [json.loads(line) for line in (root / f"{run}.routing.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
