"""torch DDP, 2 ranks (gloo, CPU), each with half of the same global batch, vs one process on the
whole batch: same winners every step, same scores, weights allclose at the end; only rank 0
writes the routing log.

Equal-length sequences and no padding, so the mean of the two per-rank mean losses is the
global mean loss and DDP's averaged gradient is the single-process gradient.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import molf_ds
from helpers.tiny_models import token_batches
from molf_ds.distributed import free_port

pytestmark = pytest.mark.slow  # 2 processes (torch.multiprocessing)


WORLD = 2
STEPS = 10
BATCH, SEQ = 4, 16
CFG = dict(variant="molf", lora_ranks=(8,), lora_alphas=(16.0,), lora_dropout=0.0, score="epd", top_k=1,
           lr=1e-3, lora_lr=6e-4)


def _build(model_dir, state_path):
    from transformers import AutoModelForCausalLM

    cfg = molf_ds.MoLFConfig(**CFG)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = molf_ds.wrap_model(model, cfg)
    model.load_state_dict(torch.load(state_path))
    model.train()
    return model, cfg


def _schedule(opt):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=STEPS)


def _worker(rank, port, model_dir, state_path, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _train(rank, model_dir, state_path, out_dir)
        # DDP's reducer went with _train's frame while the group was alive, and every rank is done with the group.
        # Freed after destroy_process_group instead, the reducer destroys the gloo group while holding the GIL, and
        # can deadlock with gloo's thread releasing a finished work's tensors (it hung once here, torch 2.13).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train(rank, model_dir, state_path, out_dir):
    model, cfg = _build(model_dir, state_path)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = molf_ds.build_optimizer(model, cfg, routing_log=os.path.join(out_dir, f"routing_rank{rank}.jsonl"))
    sched = _schedule(opt)
    per = BATCH // WORLD
    records = []
    for ids in token_batches(STEPS, BATCH, SEQ):
        half = ids[rank * per:(rank + 1) * per]
        ddp(input_ids=half, labels=half).loss.backward()
        opt.step()
        records.append(json.loads(json.dumps(opt.last_routing)))
        sched.step()
        opt.zero_grad()
    torch.save({"records": records, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_ranks_match_single_process(tiny, tmp_path):
    base = tiny("qwen2", seed=0)
    model_dir = tmp_path / "model"
    base.save_pretrained(model_dir)
    cfg = molf_ds.MoLFConfig(**CFG)
    wrapped = molf_ds.wrap_model(base, cfg)
    state_path = tmp_path / "wrapped.pt"
    torch.save(wrapped.state_dict(), state_path)

    # single process, whole batch
    single, cfg = _build(str(model_dir), str(state_path))
    opt = molf_ds.build_optimizer(single, cfg)
    sched = _schedule(opt)
    single_records = []
    for ids in token_batches(STEPS, BATCH, SEQ):
        single(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        single_records.append(json.loads(json.dumps(opt.last_routing)))
        sched.step()
        opt.zero_grad()

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_worker, args=(free_port(), str(model_dir), str(state_path), str(out_dir)), nprocs=WORLD, join=True)

    # only rank 0 writes the routing log, one line per step, equal to rank 0's records
    assert not (out_dir / "routing_rank1.jsonl").exists() or (out_dir / "routing_rank1.jsonl").read_text() == ""
    lines = (out_dir / "routing_rank0.jsonl").read_text().splitlines()
    assert len(lines) == STEPS
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]
    assert [json.loads(line) for line in lines] == results[0]["records"]

    wins = set()
    for rank, res in enumerate(results):
        assert len(res["records"]) == STEPS
        for t, (rec, srec) in enumerate(zip(res["records"], single_records), start=1):
            assert rec["step"] == srec["step"] == t
            assert set(rec["modules"]) == set(srec["modules"])
            for name, s in srec["modules"].items():
                d = rec["modules"][name]
                assert sorted(d["winners"]) == sorted(s["winners"]), (rank, t, name, d, s)
                wins.update(s["winners"])
                # the scores are the global ones (gradients are already averaged: no double counting)
                assert set(d["scores"]) == set(s["scores"])
                for e, sv in s["scores"].items():
                    assert d["scores"][e] == pytest.approx(sv, rel=1e-4, abs=1e-20), (rank, t, name, e, d, s)
        ref_state = single.state_dict()
        for k, v in res["state"].items():
            torch.testing.assert_close(v, ref_state[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {k}: {m}")
    # both ranks identical to each other, bit for bit
    for k, v in results[0]["state"].items():
        assert torch.equal(v, results[1]["state"][k]), k
    assert {"full", "lora0"} <= wins, wins
