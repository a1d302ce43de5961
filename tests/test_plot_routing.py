"""molf-ds plot-routing draws a real routing log (MoLF and MoLF-E) into a non-empty PNG."""
from __future__ import annotations

import subprocess
import sys

import pytest

import molf_ds
from molf_ds.commands.plot_routing import read_log
from helpers.tiny_models import token_batches

pytestmark = pytest.mark.slow  # every test runs `molf-ds plot-routing` in a subprocess


@pytest.mark.parametrize("variant", ["molf", "molf-e"])
def test_plot_routing_from_a_training_log(tiny, tmp_path, variant):
    cfg = molf_ds.MoLFConfig(variant=variant, lora_ranks=(8,) if variant == "molf" else (4, 8), lora_dropout=0.0,
                             lr=1e-3, lora_lr=6e-4)
    model = molf_ds.wrap_model(tiny("qwen2"), cfg)
    optimizer = molf_ds.build_optimizer(model, cfg, routing_log=tmp_path / "routing.jsonl")
    for ids in token_batches(6, 2, 12):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.routing_log.close()
    steps, modules, experts, winners = read_log(tmp_path / "routing.jsonl")
    assert steps == list(range(1, 7)) and len(modules) == 14 and winners.sum(axis=2).min() == 1
    out = tmp_path / "plots" / "routing.png"
    done = subprocess.run([sys.executable, "-m", "molf_ds.commands", "plot-routing", str(tmp_path / "routing.jsonl"),
                           "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_routing_names_the_problem(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "skipped": true, "modules": {}}\n')
    done = subprocess.run([sys.executable, "-m", "molf_ds.commands", "plot-routing", str(tmp_path / "empty.jsonl")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "no routed steps" in done.stderr
