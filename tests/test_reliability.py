"""Issue 8, reliability, end to end on the demo task with 2 CPU ranks under torchrun (tests/scripts/faults.py injects
the faults into one rank): a SIGKILLed rank fails the job fast and resume=auto reproduces the uninterrupted
run; a rank killed while writing a checkpoint leaves a partial one that is never loaded; a full disk gives one
clear line and keeps the previous checkpoint; a NaN loss stops the run naming step and examples; fp16 overflow
steps are skipped and logged; ZeRO-3 runs, writes every output and resumes, and its universal checkpoint resumes
on another ZeRO stage and world size (ZeRO-3 on 2 ranks -> ZeRO-2 on 1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.demo_runs import REPO, ZERO2, jsonl, only_the_output_directory, write_demo_run
from helpers.distributed import needs_fp16
from molf_ds.commands.train.checkpoints import COMPLETE, to_universal

pytestmark = pytest.mark.slow  # torchrun, 2 ranks, faults injected

FAULTS = Path(__file__).resolve().parent / "scripts" / "faults.py"
STEPS = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    write_demo_run(
        root, lora_dropout=0.1, deepspeed=ZERO2,  # dropout: resume must replay it
        train={"output_dir": str(root / "out"), "max_steps": STEPS, "micro_batch_size": 4,
               "gradient_accumulation_steps": 2, "lr": 2e-3, "lora_lr": 2e-3, "scheduler": "constant_with_warmup",
               "warmup_steps": 2, "save_steps": 2},
    )
    return root


def launch(root: Path, *overrides: str, fault: str = "", stamp: Path | None = None,
           nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(FAULTS), str(root / "run.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MOLF_DS_FAULT": fault,
           "MOLF_DS_FAULT_STAMP": str(stamp or "")}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert only_the_output_directory(result.stdout), result.stdout[-3000:]
    return result.stderr


def assert_same_run(out: Path, want: Path) -> None:
    assert jsonl(out / "routing.jsonl") == jsonl(want / "routing.jsonl")  # winners and scores, every step
    a, b = load_file(out / "final" / "model.safetensors"), load_file(want / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(demo):
    out = demo / "uninterrupted"
    ok(launch(demo, f"train.output_dir={out}"))
    return out


def test_sigkilled_rank_fails_fast_and_resume_reproduces_the_run(demo, uninterrupted):
    out, stamp = demo / "sigkill", demo / "sigkill.time"
    result = launch(demo, f"train.output_dir={out}", fault="kill_at_step:6:1", stamp=stamp)
    seconds = time.time() - float(stamp.read_text())
    print(f"SIGKILL of rank 1 at step 6 -> torchrun exited {result.returncode} after {seconds:.1f} s")
    assert result.returncode != 0 and seconds < 60
    assert [c.name for c in sorted((out / "checkpoints").glob("step*"))] == ["step2", "step4"]
    notices = ok(launch(demo, f"train.output_dir={out}", "train.resume=auto"))
    assert f"resumed from {out / 'checkpoints' / 'step4'} at step 4" in notices
    assert_same_run(out, uninterrupted)


def test_a_checkpoint_whose_writing_was_killed_is_never_loaded(demo, uninterrupted):
    out = demo / "killed-in-save"
    result = launch(demo, f"train.output_dir={out}", fault="kill_in_save:6:1")
    assert result.returncode != 0
    partial = out / "checkpoints" / "step6"
    assert any(partial.iterdir()) and not (partial / COMPLETE).exists()  # rank 1's files are there, no marker
    notices = ok(launch(demo, f"train.output_dir={out}", "train.resume=auto"))
    assert f"resumed from {out / 'checkpoints' / 'step4'} at step 4" in notices
    assert_same_run(out, uninterrupted)


def test_disk_full_while_saving_is_one_clear_line_and_keeps_the_previous_checkpoint(demo, uninterrupted):
    """A real ENOSPC: the output directory is a tmpfs with room for the logs and one checkpoint, not two."""
    mount = demo / "small-disk"
    mount.mkdir()
    size = sum(f.stat().st_size for f in (uninterrupted / "checkpoints" / "step2").iterdir())
    size += sum(f.stat().st_size for f in (uninterrupted / "checkpoints").iterdir() if f.is_file())
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 + (64 << 10)}", "tmpfs",
                              str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = launch(demo, f"train.output_dir={mount / 'out'}")
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.startswith("molf-ds train: saving checkpoint")]
        assert lines, result.stderr[-5000:]
        print(lines[0])
        assert "step4" in lines[0] and "no space left on device" in lines[0]
        assert "the previous complete checkpoint step2 is intact" in lines[0]
        assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
        previous = mount / "out" / "checkpoints" / "step2"
        assert json.loads((previous / COMPLETE).read_text()) == {"step": 2}
        assert not (mount / "out" / "checkpoints" / "step4" / COMPLETE).exists()
        out = demo / "after-disk-full"  # the kept checkpoint loads and continues the run exactly
        ok(launch(demo, f"train.output_dir={out}", f"train.resume={previous}", "train.save_steps=0"))
        assert jsonl(out / "routing.jsonl") == jsonl(uninterrupted / "routing.jsonl")[2:]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_nan_loss_stops_the_run_naming_step_and_examples(demo):
    out = demo / "nan"
    result = launch(demo, f"train.output_dir={out}", fault="nan_batch:3:1")  # step 2, 2nd micro-batch, rank 1
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("molf-ds train: non-finite loss")]
    assert lines, result.stderr[-5000:]
    assert "optimizer step 2, micro-batch 1" in lines[0] and "rank 1: examples [" in lines[0]
    assert "rank 0:" not in lines[0]
    assert [m["step"] for m in jsonl(out / "metrics.jsonl")] == [1]  # step 2 never ran its update
    assert [r["step"] for r in jsonl(out / "routing.jsonl")] == [1]


def test_zero3_run_writes_every_output_and_resumes(demo, tmp_path):
    """Dropout 0 (the ZeRO-2 tests replay it on resume), so that the one-rank resume at the end, whose random
    streams differ from two ranks', can be compared with the two-rank run."""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter really partitioned
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    no_dropout = "molf.lora_dropout=0.0"
    common = [f"deepspeed={tmp_path / 'zero3.json'}", no_dropout, "eval.max_samples=7", "eval.batch_size=3",
              f"eval.data={demo / 'demo' / 'data' / 'counterfact.json'}", "train.save_steps=4"]  # 7: uneven shards
    full = tmp_path / "full"
    notices = ok(launch(demo, f"train.output_dir={full}", *common))
    assert "eval before training (step 0)" in notices and f"outputs in {full}/" in notices
    assert [r["step"] for r in jsonl(full / "routing.jsonl")] == list(range(1, STEPS + 1))
    assert [e["step"] for e in jsonl(full / "eval.jsonl")] == [0, STEPS]
    assert (full / "routing.png").exists() and (full / "checkpoints" / "step4" / COMPLETE).exists()
    initial = load_file(demo / "demo" / "model" / "model.safetensors")
    final = load_file(full / "final" / "model.safetensors")
    assert set(initial) <= set(final) and all(final[k].shape == initial[k].shape for k in initial)
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
    resumed = tmp_path / "resumed"
    notices = ok(launch(demo, f"train.output_dir={resumed}", *common[:2], "eval=null",
                       f"train.resume={full / 'checkpoints' / 'step4'}"))
    assert f"resumed from {full / 'checkpoints' / 'step4'} at step 4" in notices
    assert jsonl(resumed / "routing.jsonl") == jsonl(full / "routing.jsonl")[4:]
    want, have = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=0, atol=0, msg=name)
    # through a universal checkpoint to ZeRO-2 on one rank: the global batch stays 16 (1 x 8 x 2, not 2 x 4 x 2)
    universal = tmp_path / "universal" / "step4"
    to_universal(full / "checkpoints" / "step4", universal)
    assert universal.is_dir() and (universal / COMPLETE).exists()
    one_rank = tmp_path / "zero2-one-rank"
    notices = ok(launch(demo, f"train.output_dir={one_rank}", no_dropout, "eval=null", "train.micro_batch_size=8",
                       f"train.resume={universal}", nproc=1))
    assert f"resumed from {universal} at step 4" in notices
    assert_close_run(one_rank, full, first=5)


def assert_close_run(out: Path, want: Path, first: int) -> None:
    """Winners identical, scores and final weights within float tolerance, from step `first` on."""
    have, expected = jsonl(out / "routing.jsonl"), jsonl(want / "routing.jsonl")[first - 1:]
    assert [r["step"] for r in have] == [r["step"] for r in expected]
    for a, b in zip(have, expected):
        assert {m: v["winners"] for m, v in a["modules"].items()} == {m: v["winners"] for m, v in b["modules"].items()}
        for m, v in a["modules"].items():
            for e, score in v["scores"].items():
                assert score == pytest.approx(b["modules"][m]["scores"][e], rel=1e-5, abs=1e-12), (a["step"], m, e)
    x, y = load_file(out / "final" / "model.safetensors"), load_file(want / "final" / "model.safetensors")
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], rtol=1e-4, atol=1e-5, msg=name)


@needs_fp16
def test_fp16_overflow_steps_are_skipped_and_logged(demo, tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["fp16"] = {"enabled": True, "initial_scale_power": 18}  # too large a loss scale: the first steps overflow
    (tmp_path / "fp16.json").write_text(json.dumps(config))
    out = tmp_path / "fp16"
    notices = ok(launch(demo, f"train.output_dir={out}", f"deepspeed={tmp_path / 'fp16.json'}", "model.dtype=float16",
                       "train.save_steps=0"))
    metrics, routing = jsonl(out / "metrics.jsonl"), jsonl(out / "routing.jsonl")
    skipped = [m.get("skipped", False) for m in metrics]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)) and skipped[0] and not all(skipped)
    assert [r.get("skipped", False) for r in routing] == skipped  # one routing record per loop step
    assert all("routing" not in m for m in metrics if m.get("skipped"))
    molf_steps = [r["step"] for r in routing]  # a skipped step's number is reused by the next update
    assert molf_steps == [1 + sum(not s for s in skipped[:i]) for i in range(STEPS)]
    assert "step 1: gradient overflow (inf/NaN), update skipped" in notices


TRAIN_THEN_REPORT_GROUP = """
import os
import sys
import torch.distributed as dist
from molf_ds.commands.cli import main

config, out, callers_group = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if callers_group:  # as a script under torchrun may
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=0, world_size=1)
assert main(["train", config, f"train.output_dir={out}", "train.max_steps=1", "train.save_steps=0"]) == 0
print("process group after train:", dist.is_initialized())
"""


@pytest.mark.parametrize("callers_group", [False, True])
def test_train_ends_the_process_group_it_started_and_leaves_a_callers_alone(demo, tmp_path, callers_group):
    """Left to interpreter exit, gloo's teardown once aborted a rank that had finished its work."""
    result = subprocess.run([sys.executable, "-c", TRAIN_THEN_REPORT_GROUP, str(demo / "run.yaml"),
                             str(tmp_path / "out"), str(int(callers_group))], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-5000:]
    assert result.stdout.splitlines()[-1] == f"process group after train: {callers_group}"
