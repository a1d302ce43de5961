"""Issue 21: `molf-ds generate` on a 1-process `molf-ds train` run of the demo (tiny model): the run's `final/`,
the run directory and its last checkpoint (rebuilt from config.yaml: the same model as final/) give the same greedy
text, twice; `--interactive` answers the prompts on stdin; --seed makes sampling repeat; the chat template is used
when the tokenizer has one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.demo_runs import REPO, ZERO2, write_demo_run
from molf_ds.commands.cli import main
from molf_ds.commands.datagen.demo import build_model, build_tokenizer, counterfact_records
from molf_ds.commands.generate import Generator
from molf_ds.commands.loading import load_model, load_tokenizer
from molf_ds.commands.methods import REGISTRY, TRAIN_METHODS
from molf_ds.commands.train.config import saved_config
from molf_ds.commands.train.methods import merged_model, shaped_model

PROMPTS = ["Renzel Mivas is located in the country of", "The profession of Miren Findorpra is"]  # demo seed 3


def environment() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step MoLF run of the demo in one process, with a checkpoint at its last step."""
    root = tmp_path_factory.mktemp("generate")
    write_demo_run(root, n_cases=8, deepspeed=ZERO2,
                   train={"output_dir": str(root / "out"), "max_steps": 2, "save_steps": 2, "micro_batch_size": 4,
                          "lr": 1e-3, "lora_lr": 1e-3})
    done = subprocess.run([sys.executable, "-m", "molf_ds.commands", "train", "run.yaml"], cwd=root,
                          env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "out"


def generated(capsys, *argv: str) -> list[str]:
    assert main(["generate", *argv]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.slow  # trains in a subprocess, then runs the console command
def test_cli_prints_the_greedy_text_of_final_and_answers_stdin(run_dir):
    model, tokenizer = load_model(str(run_dir / "final"))
    want = [Generator(model, tokenizer, max_new_tokens=6)(prompt) for prompt in PROMPTS + PROMPTS[:1]]
    assert any(want), "the model generates nothing: the test would prove little"
    command = [sys.executable, "-m", "molf_ds.commands", "generate", str(run_dir / "final"), PROMPTS[0],
               "--interactive", "--max-new-tokens", "6"]
    done = subprocess.run(command, input=f"{PROMPTS[1]}\n{PROMPTS[0]}\n\nnot read\n", env=environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == want  # only the generated text: one line per prompt, the empty line ends it


@pytest.mark.slow
def test_json_commands_print_their_result_alone(run_dir, tmp_path):
    """stdout is the result as a whole: DeepSpeed's notices (its import says "Setting accelerator to CPU") go to
    stderr."""
    common = [sys.executable, "-m", "molf_ds.commands"]
    done = subprocess.run([*common, "estimate-memory", str(run_dir / "final"), "--json"], cwd=tmp_path,
                          env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {row["method"] for row in json.loads(done.stdout)["estimates"]} == {"fft", "lora", "molf", "molf-e"}
    data = run_dir.parent / "demo" / "data" / "counterfact.json"
    done = subprocess.run([*common, "eval", str(run_dir), "--task", "fact", "--data", str(data), "--output", "-"],
                          cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["rows"] == 8 and list(tmp_path.iterdir()) == []  # "-" is stdout, not a file


@pytest.mark.slow
def test_run_dir_and_checkpoint_generate_what_final_does_twice(run_dir, capsys):
    argv = [*PROMPTS, "--max-new-tokens", "6"]
    from_final = generated(capsys, str(run_dir / "final"), *argv)
    assert len(from_final) == 2
    assert generated(capsys, str(run_dir / "final"), *argv) == from_final  # greedy: deterministic
    assert generated(capsys, str(run_dir), *argv) == from_final  # the run directory: its final/
    checkpoint = run_dir / "checkpoints" / "step2"
    assert generated(capsys, str(checkpoint), *argv) == from_final  # the last step's checkpoint is final/
    rebuilt, tokenizer = load_model(str(checkpoint))
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch).logits, final(**batch).logits, rtol=1e-5, atol=1e-5)
    sampled = generated(capsys, str(checkpoint), PROMPTS[0], "--temperature", "1.5", "--seed", "7")
    assert generated(capsys, str(checkpoint), PROMPTS[0], "--temperature", "1.5", "--seed", "7") == sampled


def test_chat_template_unless_no_chat_template(tmp_path):
    from molf_ds.commands.datagen.demo import generate as demo

    paths = demo(tmp_path / "demo", n_cases=8, seed=3)
    tokenizer = load_tokenizer(str(paths["tokenizer"]))
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    raw = Generator(model, tokenizer).encode(PROMPTS[0])["input_ids"]
    assert raw.tolist() == tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"].tolist()  # no template: as is
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} is{% endfor %}"
    templated = Generator(model, tokenizer).encode(PROMPTS[0])["input_ids"]
    assert templated.tolist() == tokenizer(PROMPTS[0] + " is", add_special_tokens=False,
                                           return_tensors="pt")["input_ids"].tolist()
    assert Generator(model, tokenizer, chat=False).encode(PROMPTS[0])["input_ids"].tolist() == raw.tolist()


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "molf-ds generate: give a PROMPT or --interactive"
    assert main(["generate", str(tmp_path / "none"), "hi", "--top-p", "0"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "none"), "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("molf-ds generate: argument MODEL: ") and "does not exist" in err and "\n" not in err, err


@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_every_method_rebuilds_and_merges_back_into_the_vanilla_model(method):
    """What loading does to a checkpoint, from the method's registry entry alone: shaped_model adds the method's
    parameters (none for fft), merged_model folds them back; untrained, that is the model it started from."""
    records = counterfact_records(4)
    tokenizer = build_tokenizer(records)
    initial = build_model(tokenizer, seed=1).state_dict()
    cfg = saved_config({"model": {"name_or_path": "m"}, "method": method, "data": {"task": "fact", "train": "t.json"},
                        "train": {"max_steps": 4, "output_dir": "o"}, "deepspeed": {},
                        "lora": {"r": 4, "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1},
                        **({"molf": {"lora_ranks": [2, 4]}} if REGISTRY[method].molf else {})})
    shaped = shaped_model(cfg, build_model(tokenizer, seed=1))
    added = set(shaped.state_dict()) - set(initial)
    assert bool(added) == REGISTRY[method].has_lora, method
    merged = merged_model(method, shaped).state_dict()
    assert set(merged) == set(initial)
    assert all(torch.allclose(merged[k], initial[k]) for k in initial), method
