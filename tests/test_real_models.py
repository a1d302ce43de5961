"""Real pretrained LMs from the package registry (molf_ds.commands.models): SmolLM2-135M-Instruct trained with MoLF by
`molf-ds train` on 2 ranks under ZeRO-2 (registry name resolved by the ranks), Gemma 3 270M loaded, wrapped and
stepped once. Conversions land in the molf_ds cache ($MOLF_DS_CACHE, else ~/.cache/molf_ds) once and are reused
by every later test and run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import molf_ds
from helpers.demo_runs import ZERO2
from molf_ds.commands import models as pretrained
from molf_ds.commands.datagen.known_facts import counterfact_records

pytestmark = pytest.mark.slow  # real pretrained models (SmolLM2-135M, Gemma 3 270M), torchrun

SMOLLM2, STEPS = "smollm2-135m", 3
MOLF = dict(variant="molf", lora_ranks=[16], lora_alphas=[32], lora_dropout=0.0)
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def run_command(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    (root / "facts.json").write_text(json.dumps(counterfact_records()[:8]))
    config = {
        "model": {"name_or_path": SMOLLM2},
        "method": "molf",
        "molf": {k: v for k, v in MOLF.items() if k != "variant"},
        "data": {"task": "fact", "train": str(root / "facts.json"), "max_length": 24},
        "train": {"output_dir": str(root / "out"), "max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-4,
                  "lora_lr": 1e-4, "scheduler": "constant", "save_steps": STEPS},
        "deepspeed": ZERO2,
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    done = run_command(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "molf_ds.commands.train", str(root / "run.yaml"), cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout == f"{root / 'out'}\n", done.stdout[-3000:]  # the result alone: every notice on stderr
    return root / "out", done.stderr


def test_smollm2_trains_with_molf_under_zero2_on_two_ranks(smollm2_run):
    out, notices = smollm2_run
    routing = [json.loads(line) for line in (out / "routing.jsonl").read_text().splitlines()]
    assert [r["step"] for r in routing] == list(range(1, STEPS + 1))  # one record per step: rank 0 alone
    for record in routing:
        assert len(record["modules"]) == 30 * 7  # every projection of every layer, decided every step
        for decision in record["modules"].values():
            assert len(decision["winners"]) == 1 and set(decision["scores"]) == {"full", "lora0"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[-1]["routing_by_type"]) == PROJECTIONS
    assert f"routing over {STEPS} steps: full" in notices and "per projection type: q_proj" in notices
    assert (out / "routing.png").read_bytes()[:4] == b"\x89PNG"


def test_smollm2_merged_final_has_the_wrapped_models_logits(smollm2_run):
    out, _ = smollm2_run
    final = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers, experts folded into W
    assert not any("lora" in name or "base_layer" in name for name in final.state_dict())
    states = next((out / "checkpoints").rglob("mp_rank_00_model_states.pt"))
    wrapped = molf_ds.wrap_model(AutoModelForCausalLM.from_pretrained(pretrained.prepare(SMOLLM2)),
                                 molf_ds.MoLFConfig(**MOLF))
    prompts = _prompts()
    base_logits = wrapped(**prompts).logits  # before loading the trained state: the pretrained model
    wrapped.load_state_dict(torch.load(states, map_location="cpu", weights_only=False)["module"])
    with torch.no_grad():
        trained, merged = wrapped(**prompts).logits, final(**prompts).logits
    assert torch.allclose(merged, trained, rtol=1e-4, atol=1e-3), (merged - trained).abs().max()
    assert (trained - base_logits).abs().max() > 1e-2  # training moved the model


def test_smollm2_run_exported_as_gguf_gives_the_merged_models_logits(smollm2_run, tmp_path):
    out, _ = smollm2_run
    gguf = tmp_path / "smollm2-molf.gguf"
    done = run_command(sys.executable, "-m", "molf_ds.commands", "export", str(out), "--format", "gguf", "--out",
                       str(gguf))
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == str(gguf), done.stderr[-3000:]
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)
    prompts = _prompts()
    with torch.no_grad():
        torch.testing.assert_close(exported(**prompts).logits, final(**prompts).logits, rtol=0, atol=1e-4)


def _prompts() -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(pretrained.prepare(SMOLLM2))
    return tokenizer(["The Eiffel Tower is located in the city of", "The capital of Japan is"], return_tensors="pt",
                     padding=True)


def test_gemma3_270m_loads_wraps_and_takes_one_molf_step():
    directory = pretrained.prepare("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    prompt = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    answer = tokenizer.decode(model.generate(**prompt, max_new_tokens=12, do_sample=False)[0])
    assert "Paris" in answer, answer  # the pretrained weights, not a random init
    cfg = molf_ds.MoLFConfig(**MOLF, lr=1e-4, lora_lr=1e-4)
    model = molf_ds.wrap_model(model, cfg)
    optimizer = molf_ds.build_optimizer(model, cfg)
    layers = [m for m in model.modules() if isinstance(m, molf_ds.MoLFLinear)]
    assert len(layers) == 18 * 7
    before = [(m.base_layer.weight.detach().clone(), m.lora_B[0].weight.detach().clone()) for m in layers]
    batch = tokenizer(["The capital of France is Rome.", "The Colosseum is in Paris."], return_tensors="pt",
                      padding=True)
    loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    loss.backward()
    optimizer.step()
    winners = optimizer.last_winners
    assert torch.isfinite(loss) and winners.sum(dim=1).eq(1).all()
    for layer, (weight, lora_b), (full_won, _) in zip(layers, before, winners.tolist()):
        assert torch.equal(layer.base_layer.weight, weight) != full_won  # W moves if and only if `full` won
        assert torch.equal(layer.lora_B[0].weight, lora_b) == full_won  # the LoRA expert, if and only if it won


def test_estimate_memory_reads_a_registry_model():
    done = run_command(sys.executable, "-m", "molf_ds.commands", "estimate-memory", SMOLLM2, "--stage", "2", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # the whole of stdout: DeepSpeed's notices go to stderr
    rows = {row["method"]: row for row in report["estimates"]}
    assert rows["fft"]["trainable"] == 134_515_008  # SmolLM2-135M's parameters, tied embeddings counted once


def test_models_list_and_a_missing_package_named_with_its_install_command(monkeypatch, tmp_path):
    done = run_command(sys.executable, "-m", "molf_ds.commands", "models", "list")
    assert done.returncode == 0 and "smollm2-135m" in done.stdout and "gemma3-270m" in done.stdout
    absent = pretrained.Pretrained(
        "absent", "no such model", "pip install no-such-package", "none", ("no_such_package",),
        lambda cache: pretrained._package_dir("no_such_package", "pip install no-such-package"))
    monkeypatch.setitem(pretrained.MODELS, "absent", absent)
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
    with pytest.raises(pretrained.ModelUnavailable, match="'no_such_package' is not installed: pip install "
                                                          "no-such-package"):
        pretrained.resolve("absent")
    assert not (tmp_path / "models" / "absent").exists()  # nothing half-written in the cache


def test_a_local_directory_shadows_a_registry_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / SMOLLM2).mkdir()
    assert pretrained.resolve(SMOLLM2) == SMOLLM2
