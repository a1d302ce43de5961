"""Training runs for the DeepSpeed tests: the single-process reference (the package's own optimizer), the
independent oracle (helpers/reference_molf.py), the per-rank DeepSpeed worker, and the checks that a run
reproduces the one or the other, or (resumed) another run bit for bit."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

import molf_ds
from molf_ds.export import gathered
from helpers.distributed import count_collectives
from helpers.reference_molf import ReferenceMoLF
from helpers.routing_checks import assert_routing_varies

STEPS, GLOBAL_BATCH, SEQ = 20, 4, 16
MOLF = dict(lora_ranks=(8,), lora_alphas=(16.0,), lora_dropout=0.0, lr=1e-3, lora_lr=6e-4)  # both experts win
NEAR_TIE = 1e-6
# Weight decays large enough that a wrong one shows in the weights after STEPS steps (the defaults, 0.1 and 0.01,
# move a zero-initialised bias or a LoRA factor by less than float noise), and different, so a swap shows too.
ORACLE_DECAYS = dict(weight_decay=0.5, lora_weight_decay=2.0)
# LDW against the oracle: full and two LoRA experts of different scalings, each winning somewhere.
LDW_TOP2 = dict(score="ldw", top_k=2, lora_ranks=(4, 8), lora_alphas=(16.0, 8.0), **ORACLE_DECAYS)
SCORE_RTOL = 1e-4
DELTA_RTOL = 1e-3  # each weight's change from its initial value, relative to the tensor's largest change


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


def oracle_run(model_dir: str | Path, molf: dict[str, Any], batches: list[torch.Tensor],
               warmup: int | None = None) -> dict:
    """The independent oracle (helpers/reference_molf.py, written from docs/design.md) on one process and the
    whole global batch (equal-length rows: the mean over ranks and micro-batches is the global mean)."""
    cfg = molf_ds.MoLFConfig(**molf)
    model = molf_ds.wrap_model(load(model_dir, seed=0), cfg)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    oracle = ReferenceMoLF(model, cfg)
    records = []
    for ids, factor in zip(batches, lr_factors(warmup, len(batches)), strict=True):
        model(input_ids=ids, labels=ids).loss.backward()
        records.append(oracle.step(factor))
        oracle.zero_grad()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"records": records, "initial": initial, "params": final,
            "switching": cfg.score != "pfn"}  # see assert_routing_varies


def deepspeed_worker(rank: int, world: int, model_dir: str, molf: dict, runs: dict, batches: list, out: str) -> None:
    """For each named DeepSpeed config in `runs`: train on this rank's slice of every global batch and
    save what the test checks (winners, scores, losses, collectives per step, layout cells, merged weights).
    Run options: "molf" overrides MoLFConfig fields, "zero_init" loads the model partitioned (transformers'
    ZeRO-3 loading), "save_merged" writes the merged checkpoint to OUT/NAME.final, "export_peft" the PEFT
    adapter to OUT/NAME.peft (and the logits on batch 0), "resume_at" (a step or steps: checkpoint after it and go
    on in a new engine), "overflow_steps" (an inf loss: DeepSpeed skips the step), "baseline_ds", "kernel" (the
    MOLF_DS_KERNEL backend of this run), "warmup" (a cosine schedule over the run with these warm-up steps).
    The DeepSpeed config's gradient_accumulation_steps splits each rank's slice into that many micro-batches."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = {}
    for name, run in runs.items():
        start = time.perf_counter()
        with kernel_backend(run.get("kernel")):
            results[name] = _train(rank, world, model_dir, molf, name, run, batches, Path(out))
        results[name]["seconds"] = time.perf_counter() - start  # what each run costs the suite (not checked)
    torch.save(results, Path(out) / f"rank{rank}.pt")


@contextlib.contextmanager
def kernel_backend(name: str | None) -> Iterator[None]:
    """MOLF_DS_KERNEL=name inside the block (read at every kernel call); None leaves the default backend."""
    before = os.environ.get("MOLF_DS_KERNEL")
    if name is not None:
        os.environ["MOLF_DS_KERNEL"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MOLF_DS_KERNEL", None)
        else:
            os.environ["MOLF_DS_KERNEL"] = before


def schedule(warmup: int | None, steps: int):
    """A cosine schedule with `warmup` warm-up steps over `steps` (DeepSpeed calls it with its optimizer), or None."""
    if warmup is None:
        return None
    return lambda optimizer: get_cosine_schedule_with_warmup(optimizer, warmup, steps)


def lr_factors(warmup: int | None, steps: int) -> list[float]:
    """Each step's lr factor under `schedule(warmup, steps)`, from the scheduler on a one-parameter optimizer."""
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    make = schedule(warmup, steps)
    scheduler = make(dummy) if make else None
    factors = []
    for _ in range(steps):
        factors.append(dummy.param_groups[0]["lr"])
        dummy.step()
        if scheduler:
            scheduler.step()
    return factors


def _train(rank: int, world: int, model_dir: str, molf: dict, name: str, run: dict, batches: list,
           out: Path) -> dict[str, Any]:
    """One run of deepspeed_worker on this rank: what the tests check (also each step's routing record, the final
    parameters, and ZeRO-3's sub-group count)."""
    from transformers.integrations import HfDeepSpeedConfig

    log = out / f"{name}.routing.jsonl"
    zero3_loading = HfDeepSpeedConfig(run["ds"]) if run.get("zero_init") else None  # alive while loading
    model = load(model_dir, seed=0)
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    cfg = molf_ds.MoLFConfig(**{**molf, **run.get("molf", {})})
    lr_scheduler = schedule(run.get("warmup"), len(batches))
    engine, *_ = molf_ds.initialize(model, cfg, run["ds"], lr_scheduler=lr_scheduler, routing_log=log)
    del zero3_loading
    optimizer = engine.basic_optimizer
    cells = sorted({s[2] for layout in optimizer.router.layouts.layouts.values() for s in layout.segments}) \
        if hasattr(optimizer.router.layouts, "layouts") else None
    record: dict[str, Any] = {"winners": [], "scores": [], "losses": [], "collectives": [], "cells": cells,
                              "built_partitioned": partitioned, "step_elements": [], "routing": []}
    resume_at = run.get("resume_at", ())
    resume_at = resume_at if isinstance(resume_at, tuple) else (resume_at,)
    accumulation = run["ds"].get("gradient_accumulation_steps", 1)
    for step, ids in enumerate(batches):
        if step in resume_at:  # a new engine on a fresh model, from the checkpoint
            molf_ds.save_checkpoint(engine, out / f"{name}.ckpt", tag=f"step{step}")
            engine, *_ = molf_ds.initialize(load(model_dir, seed=99), cfg, run["ds"], lr_scheduler=lr_scheduler,
                                            routing_log=log)
            molf_ds.load_checkpoint(engine, out / f"{name}.ckpt", tag=f"step{step}")
            optimizer = engine.basic_optimizer
        overflow = step in run.get("overflow_steps", ())
        losses = []
        for micro, local in enumerate(ids.chunk(world)[rank].chunk(accumulation), start=1):
            loss = engine(input_ids=local, labels=local).loss
            engine.backward(loss * float("inf") if overflow else loss)
            losses.append(loss.item())
            if micro < accumulation:
                engine.step()  # not a boundary: DeepSpeed only accumulates
        before = _optimizer_state(engine) if overflow else None  # gathered under ZeRO-3
        with count_collectives() as calls:
            engine.step()
        record["collectives"].append(list(calls))
        if overflow:
            after = _optimizer_state(engine)
            assert before.keys() == after.keys()
            record.setdefault("overflow_changed", []).append(
                max((after[k].float() - v.float()).abs().max().item() for k, v in before.items()))
        record["losses"].append(sum(losses) / len(losses))
        record["winners"].append(optimizer.last_winners.clone())
        record["scores"].append(optimizer.last_scores.clone())
        record["step_elements"].append(dict(optimizer.last_step_elements))
        record["routing"].append(copy.deepcopy(optimizer.last_routing))
    record["resident"] = _residency(engine.module)
    record["sub_groups"] = len(getattr(engine.optimizer, "fp32_partitioned_groups_flat", ()))  # ZeRO-3's flat tensors
    record["merged"] = {k: v.float() for k, v in molf_ds.merged_state_dict(engine.module).items()}
    record["params"] = _parameters(engine.module)
    if run.get("save_merged"):
        molf_ds.save_merged(engine, out / f"{name}.final")
    if run.get("export_peft"):
        molf_ds.export_peft(engine, out / f"{name}.peft")
        with torch.no_grad():
            record["probe_logits"] = engine(input_ids=batches[0]).logits.float()
    if "baseline_ds" in run:
        record["baseline_collectives"] = _adamw_collectives(
            model_dir, molf, run["baseline_ds"], batches[:2], rank, world)
    return record


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, full (gathered under ZeRO-3), as fp32 copies on CPU."""
    with gathered(list(model.parameters())):
        return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def _optimizer_state(engine: Any) -> dict[str, torch.Tensor]:
    """The model's parameters and this rank's optimizer moments (DeepSpeed's flat fp32 partitions), as copies."""
    state = {f"param:{k}": v for k, v in _parameters(engine.module).items()}
    for i, moments in enumerate(engine.basic_optimizer.state.values()):
        for key, value in moments.items():  # exp_avg, exp_avg_sq, step
            state[f"moment:{i}:{key}"] = torch.as_tensor(value).detach().float().cpu().clone()
    return state


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
    assert len(reference["winners"]) == STEPS
    for got in got_per_rank:
        assert len(got["winners"]) == len(got["scores"]) == STEPS, f"{run}: a rank logged {len(got['winners'])} steps"
        for step, (want, have, scores) in enumerate(zip(reference["winners"], got["winners"], reference["scores"])):
            differs = (want != have).any(dim=1)
            assert not (differs & ~_near_tie(scores)).any(), f"{run}: winners differ at step {step + 1}"
            torch.testing.assert_close(got["scores"][step], scores, rtol=1e-4, atol=1e-12)
        assert got["merged"].keys() == reference["merged"].keys()
        for key, value in reference["merged"].items():
            torch.testing.assert_close(got["merged"][key], value, rtol=1e-5, atol=1e-5, msg=f"{run}: {key}")
    wins = torch.stack(reference["winners"]).float().mean(dim=(0, 1))
    assert (wins > 0).all(), f"the run must route to every expert to test anything: shares {wins.tolist()}"
    lines = [json.loads(line) for line in (root / f"{run}.routing.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))


def assert_matches_oracle(oracle: dict, got_per_rank: list[dict], run: str, root: Path) -> None:
    """Every rank against the independent oracle: the lr factor, winners (near-ties excepted) and scores (rtol
    SCORE_RTOL) at every step and module, and each weight's change from its initial value (DELTA_RTOL of the
    tensor's largest change); the routing varies (so a stuck router or a wrong top-k cannot pass); rank 0's
    routing log holds every step."""
    want = oracle["records"]
    assert len(want) == STEPS
    assert_routing_varies(want, run, switching=oracle["switching"])
    for rank, got in enumerate(got_per_rank):
        assert len(got["routing"]) == STEPS, f"{run}: rank {rank} logged {len(got['routing'])} steps"
        for have, ref in zip(got["routing"], want, strict=True):
            where = f"{run}, rank {rank}, step {ref['step']}"
            assert have["step"] == ref["step"], where
            assert abs(have["lr_scale"] - ref["lr_scale"]) <= 1e-12, f"{where}: lr factor {have['lr_scale']}"
            assert have["modules"].keys() == ref["modules"].keys(), where
            for module, r in ref["modules"].items():
                h, r_scores = have["modules"][module], r["scores"]
                assert h["scores"].keys() == r_scores.keys(), f"{where} {module}"
                for expert, score in r_scores.items():
                    assert abs(h["scores"][expert] - score) <= SCORE_RTOL * abs(score) + 1e-20, (
                        f"{where} {module} {expert}: score {h['scores'][expert]!r}, oracle {score!r}")
                if sorted(h["winners"]) != sorted(r["winners"]):
                    ranked = sorted(r_scores.values(), reverse=True)
                    k = len(r["winners"])
                    assert abs(ranked[k - 1] - ranked[k]) <= NEAR_TIE * abs(ranked[k - 1]), (
                        f"{where} {module}: winners {h['winners']}, oracle {r['winners']} (scores {r_scores})")
        assert got["params"].keys() == oracle["params"].keys(), run
        for name, final in oracle["params"].items():
            change, initial = got["params"][name] - oracle["initial"][name], oracle["initial"][name]
            want_change = final - initial
            scale = want_change.abs().max().item()
            torch.testing.assert_close(change, want_change, rtol=DELTA_RTOL, atol=DELTA_RTOL * scale,
                                       msg=lambda m, name=name: f"{run}, rank {rank}, change of {name}: {m}")
    lines = [json.loads(line) for line in (root / f"{run}.routing.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))


def oracle_runs(model_dir: str | Path, runs: dict[str, dict], batches: list[torch.Tensor]) -> dict[str, dict]:
    """The oracle of every run marked "oracle" (its MoLF overrides on MOLF, its schedule)."""
    return {name: oracle_run(model_dir, {**MOLF, **run.get("molf", {})}, batches, run.get("warmup"))
            for name, run in runs.items() if run.get("oracle")}


def assert_same_run(resumed: dict, uninterrupted: dict, run: str) -> None:
    """Bit for bit: scores and winners at every step, and every final weight (a resumed run against the same
    configuration run without interruption, on one rank)."""
    assert len(resumed["scores"]) == len(uninterrupted["scores"]) == STEPS
    for step, (a, b) in enumerate(zip(resumed["scores"], uninterrupted["scores"], strict=True), start=1):
        assert torch.equal(a, b), f"{run}: scores differ at step {step}"
    assert resumed["routing"] == uninterrupted["routing"], run
    assert resumed["params"].keys() == uninterrupted["params"].keys()
    for name, value in uninterrupted["params"].items():
        assert torch.equal(resumed["params"][name], value), f"{run}: {name}"


def assert_log_matches_reference(reference: dict, lines: list[dict], steps: int, what: str = "") -> None:
    """A routing log (one line per step) against the reference run: winners exactly, scores rtol 1e-4."""
    assert [line["step"] for line in lines] == list(range(1, steps + 1)), what
    experts = ["full", "lora0"]
    for line, winners, scores in zip(lines, reference["winners"], reference["scores"], strict=True):
        got = torch.tensor([[e in m["winners"] for e in experts] for m in line["modules"].values()])
        assert torch.equal(got, winners), f"{what}: step {line['step']}"
        got_scores = torch.tensor([[m["scores"][e] for e in experts] for m in line["modules"].values()],
                                  dtype=scores.dtype)
        torch.testing.assert_close(got_scores, scores, rtol=1e-4, atol=1e-12, msg=lambda m: f"{what}: {m}")
