"""Every way users launch: the deepspeed launcher on one node, two nodes on one machine (two launcher
invocations without ssh, node ranks 0 and 1), mpirun -np 2 (mpi4py discovery), and accelerate launch with each
preset. 2 CPU processes, 3 fp32 steps of the bundled demo model each; every path writes the routing log of
a plain torchrun run (winners identical, scores to float rounding)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.demo_runs import REPO, ZERO2, write_demo_run
from helpers.distributed import free_port

pytestmark = pytest.mark.slow  # torchrun, the deepspeed launcher, two nodes, mpirun

STEPS = 3


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    write_demo_run(root, n_cases=16, seed=5, eval={},
                   train={"max_steps": STEPS, "micro_batch_size": 2, "lr": 2e-3, "lora_lr": 1e-3,
                          "scheduler": "constant", "save_steps": 0})
    return root


def _run(root: Path, name: str, command: list[str], extra_env: dict | None = None) -> Path:
    out = root / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MASTER_PORT": str(free_port()),
           **(extra_env or {})}
    args = [str(root / "run.yaml"), f"train.output_dir={out}"]
    if "accelerate" not in name:  # accelerate launch passes its preset's DeepSpeed JSON
        args.append(f"deepspeed={ZERO2}")
    done = subprocess.run(command + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"{name}: {done.stdout[-2000:]}{done.stderr[-4000:]}"
    return out / "routing.jsonl"


def _routing(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    experts = list(next(iter(lines[0]["modules"].values()))["scores"])
    winners = torch.tensor([[[e in m["winners"] for e in experts] for m in line["modules"].values()] for line in lines])
    scores = torch.tensor([[[m["scores"][e] for e in experts] for m in line["modules"].values()] for line in lines],
                          dtype=torch.float64)
    return winners, scores


@pytest.fixture(scope="module")
def reference(run_config):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "molf_ds.commands.train"]
    return _routing(_run(run_config, "torchrun", command))


def _assert_same(reference, path: Path) -> None:
    winners, scores = _routing(path)
    assert torch.equal(winners, reference[0])
    torch.testing.assert_close(scores, reference[1], rtol=1e-4, atol=1e-12)


def test_deepspeed_launcher_one_node(run_config, reference):
    _assert_same(reference, _run(run_config, "deepspeed", [str(REPO / "launch" / "deepspeed.sh")], {"NUM_PROCS": "2"}))


def test_two_nodes_without_ssh(run_config, reference):
    hostfile = run_config / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = run_config / "two_nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HOSTFILE": str(hostfile),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = [str(run_config / "run.yaml"), f"train.output_dir={out}", f"deepspeed={ZERO2}"]
    nodes = [subprocess.Popen([str(REPO / "launch" / "deepspeed_node.sh"), *args], cwd=REPO,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    results = [node.communicate(timeout=400) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-2000:] + stderr[-4000:]
    _assert_same(reference, out / "routing.jsonl")


def test_mpirun(run_config, reference):
    assert shutil.which("mpirun"), "no mpirun: launch/install.sh installs it (molf-ds[mpi])"
    _assert_same(reference, _run(run_config, "mpirun", [str(REPO / "launch" / "mpirun.sh")], {"NP": "2"}))


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_accelerate_launch_presets(run_config, reference, preset):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch" / "accelerate" / f"{preset}.yaml"), "--main_process_port", str(free_port()),
               "-m", "molf_ds.commands.train"]
    _assert_same(reference, _run(run_config, f"accelerate_{preset}", command))
