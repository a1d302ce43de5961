"""Issue 23: a model, tokenizer or dataset that cannot be loaded is one line naming the key (exit status 2, no
traceback), printed once, before any process group: through `molf-ds train` (each source key), `eval`, `compare`,
`bench` and `estimate-memory`, and under torchrun with 2 ranks. Offline: HF_HUB_OFFLINE=1 and empty caches in the
commands; in-process checks against fake hub and datasets caches, and a hub that is unreachable or lacks the id."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.demo_runs import REPO, ZERO2, write_demo_run
from molf_ds.commands import sources
from molf_ds.commands.sources import SourceError, check_dataset, check_model, check_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo under root/demo (model/, tokenizer/, data/counterfact.json) and root/run.yaml, with evaluation."""
    root = tmp_path_factory.mktemp("sources")
    write_demo_run(root, n_cases=8, eval_samples=4, deepspeed=ZERO2,
                   train={"output_dir": str(root / "out"), "max_steps": 1})
    return root


def command(root: Path, *argv: str, launcher: tuple[str, ...] = ("-m", "molf_ds.commands"),
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A molf-ds command in `cwd` [root], offline, with empty Hugging Face caches under root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(root / "hub-cache"), "HF_DATASETS_CACHE": str(root / "datasets-cache")}
    return subprocess.run([sys.executable, *launcher, *argv], cwd=cwd or root, env=env, capture_output=True,
                          text=True, timeout=300)


def one_line(result: subprocess.CompletedProcess, prefix: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr[-3000:]
    print(lines[0])
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("override,words", [
    ("model.name_or_path=demo/modle", ["config key 'model.name_or_path': demo/modle does not exist",
                                       "did you mean demo/model?"]),
    ("model.tokenizer=demo/model", ["config key 'model.tokenizer': demo/model holds no tokenizer"]),
    ("model.gguf_file=model.gguf", ["config key 'model.gguf_file': model.gguf is neither a file in"]),
    ("data.train=gretelai/synthetic_text_to_sql", [
        "config key 'data.train': 'gretelai/synthetic_text_to_sql' is not a local path", "HF_HUB_OFFLINE=1",
        "`hf download gretelai/synthetic_text_to_sql --repo-type dataset --local-dir DIR`", "set data.train=FILE"]),
    ("eval.data=demo/data", ["config key 'eval.data': demo/data is a directory"]),
], ids=lambda value: value.split("=")[0] if isinstance(value, str) else "")
def test_train_names_the_key_in_one_line(demo, override, words):
    line = one_line(command(demo, "train", "run.yaml", override), "molf-ds train:")
    for word in words:
        assert word in line


@pytest.mark.slow
def test_the_readme_sql_example_offline_is_one_line(demo):
    result = command(demo, "train", "examples/sql.yaml", "train.epochs=null", "train.max_steps=2", cwd=REPO)
    line = one_line(result, "molf-ds train:")
    assert line.startswith("molf-ds train: config key 'model.name_or_path': 'Qwen/Qwen2.5-1.5B' is not a local path")
    assert "HF_HUB_OFFLINE=1" in line and "`hf download Qwen/Qwen2.5-1.5B --local-dir DIR`" in line
    assert "set model.name_or_path=DIR" in line


@pytest.mark.slow
def test_under_torchrun_the_line_comes_once(demo):
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "molf_ds.commands.train")
    result = command(demo, "run.yaml", "model.name_or_path=demo/modle", launcher=torchrun)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "molf-ds train:" in line]
    assert lines == ["molf-ds train: config key 'model.name_or_path': demo/modle does not exist (did you mean "
                     "demo/model?); relative paths start at the working directory"], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # the first rank's (the other one waited to be stopped)
    assert "[rank0]" not in result.stderr and "[rank1]" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("argv,prefix,words", [
    (["eval", "demo/modle", "--task", "fact", "--data", "demo/data/counterfact.json", "--tokenizer", "demo/tokenizer"],
     "molf-ds eval:", ["argument MODEL: demo/modle does not exist (did you mean demo/model?)"]),
    (["eval", "demo/model", "--task", "fact", "--data", "demo/data/counterfact.json"],
     "molf-ds eval:", ["argument --tokenizer: unset, so the tokenizer comes from MODEL (demo/model)",
                       "pass --tokenizer DIR"]),
    (["eval", "demo/model", "--task", "fact", "--data", "some/dataset", "--tokenizer", "demo/tokenizer"],
     "molf-ds eval:", ["argument --data: 'some/dataset' is not a local path", "pass --data FILE"]),
    (["compare", "run.yaml", "model.name_or_path=demo/nothing", "--methods", "molf", "--seeds", "1",
      "--output-dir", "cmp"], "molf-ds compare:", ["config key 'model.name_or_path': demo/nothing does not exist"]),
    (["bench", "--model", "qwen2-h265"], "molf-ds bench:", ["argument --model: 'qwen2-h265' is neither",
                                                            "did you mean qwen2-h256?"]),
    (["estimate-memory", "demo/data"], "molf-ds estimate-memory:",
     ["argument MODEL: demo/data is not a model directory (no config.json)"]),
], ids=["eval-model", "eval-tokenizer", "eval-data", "compare", "bench", "estimate-memory"])
def test_other_commands_name_the_argument_in_one_line(demo, argv, prefix, words):
    line = one_line(command(demo, *argv), prefix)
    for word in words:
        assert word in line
    assert not (demo / "cmp").exists()  # compare launched no run


# ---- the checks in-process ---------------------------------------------------------------------------
@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty hub and datasets caches under tmp_path (the working directory), offline; returns tmp_path."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    sources._hub_lookup.cache_clear()
    yield tmp_path
    sources._hub_lookup.cache_clear()


def cache_model(root: Path, repo_id: str, *files: str) -> None:
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    for name in files:
        (repo / "snapshots" / "abc123" / name).write_text("{}")


def fails(check, *args, **kwargs) -> str:
    with pytest.raises(SourceError) as error:
        check(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_local_model_paths(caches):
    (caches / "model").mkdir()
    (caches / "model" / "weights.gguf").write_text("")
    (caches / "notes.txt").write_text("")
    assert fails(check_model, "model.name_or_path", "model") == (
        "config key 'model.name_or_path': model is not a model directory (no config.json)")
    assert "it holds GGUF files: set model.gguf_file=weights.gguf" in fails(
        check_model, "model.name_or_path", "model", gguf_key="model.gguf_file")
    assert "set model.gguf_file=weights.gguf and set model.name_or_path=model" in fails(
        check_model, "model.name_or_path", "model/weights.gguf", gguf_key="model.gguf_file")
    assert "notes.txt is a file, not a model directory" in fails(check_model, "MODEL", "notes.txt")
    assert fails(check_model, "MODEL", "./elsewhere").startswith("argument MODEL: ./elsewhere does not exist")
    assert fails(check_model, "MODEL", " ") == "argument MODEL: is empty"
    (caches / "model" / "config.json").write_text("{}")
    check_model("MODEL", "model")


def test_hub_models_offline_come_from_the_cache(caches):
    message = fails(check_model, "model.name_or_path", "owner/name")
    assert "not in the local cache" in message and "while HF_HUB_OFFLINE=1" in message
    cache_model(caches, "owner/name", "config.json")
    check_model("model.name_or_path", "owner/name")
    assert "while HF_HUB_OFFLINE=1" in fails(check_tokenizer, "model.tokenizer", "owner/name")  # no tokenizer files
    cache_model(caches, "owner/tok", "tokenizer.json")
    check_tokenizer("model.tokenizer", "owner/tok")
    (caches / "owner").mkdir()  # ./owner/ beside the hub id: a cached id still loads from the hub cache
    check_model("model.name_or_path", "owner/name")
    assert "owner/other does not exist" in fails(check_model, "model.name_or_path", "owner/other")


def test_hub_unreachable_or_without_the_repository(caches, monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, repo_id, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    message = fails(check_model, "model.name_or_path", "owner/name")
    assert "the hub is unreachable (OSError: Name or service not known)" in message
    assert message.endswith("where there is no hub access, set HF_HUB_OFFLINE=1")
    sources._hub_lookup.cache_clear()

    def missing(self, repo_id, **kwargs):
        raise RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(HfApi, "repo_info", missing)
    assert "the Hugging Face hub has no dataset of that id" in fails(check_dataset, "--data", "owner/data")
    sources._hub_lookup.cache_clear()
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kwargs: object())
    check_model("model.name_or_path", "owner/name")  # on the hub: the loader downloads it


def test_datasets(caches):
    assert fails(check_dataset, "data.train", "rows.jsonl").startswith(
        "config key 'data.train': file rows.jsonl does not exist")
    (caches / "rows.txt").write_text("")
    assert "unsupported file type '.txt'" in fails(check_dataset, "data.train", "rows.txt")
    assert "while HF_HUB_OFFLINE=1" in fails(check_dataset, "eval.data", "owner/MyData")
    (caches / "datasets" / "owner___my_data" / "default" / "0.0.0" / "f00").mkdir(parents=True)
    check_dataset("eval.data", "owner/MyData")  # prepared before: load_dataset reads it offline


def test_gguf(caches, monkeypatch):
    import importlib.util

    (caches / "gguf-dir").mkdir()
    (caches / "gguf-dir" / "smollm2.gguf").write_text("")
    kwargs = {"gguf_key": "model.gguf_file"}
    assert "did you mean smollm2.gguf?" in fails(check_model, "model.name_or_path", "gguf-dir", "smolm2.gguf", **kwargs)
    assert fails(check_model, "model.name_or_path", "owner/name", "x.gguf", **kwargs).startswith(
        "config key 'model.name_or_path': owner/name does not exist")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    assert fails(check_model, "model.name_or_path", "gguf-dir", "smollm2.gguf", **kwargs) == (
        "config key 'model.gguf_file': loading a GGUF checkpoint needs the gguf package: pip install gguf")
    monkeypatch.undo()
    if real("gguf") is not None:
        check_model("model.name_or_path", str(caches / "gguf-dir"), str(caches / "gguf-dir" / "smollm2.gguf"),
                    **kwargs)


def test_eval_checks_an_adapters_base_model(caches):
    from molf_ds.commands.evaluate import check_sources

    (caches / "adapter").mkdir()
    (caches / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base/model"}))
    (caches / "rows.jsonl").write_text("")
    message = fails(check_sources, "adapter", "rows.jsonl")
    assert message.startswith("argument MODEL's base model: 'base/model' is not a local path")
    assert message.endswith("set base_model_name_or_path in adapter/adapter_config.json to DIR")


def test_only_the_first_rank_of_a_node_reports_at_once(monkeypatch, capsys):
    from molf_ds import distributed

    for name in distributed.LOCAL_RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    waits = []
    monkeypatch.setattr(distributed.time, "sleep", waits.append)
    distributed.report_before_group("no launcher")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    distributed.report_before_group("a second rank, not stopped by its launcher")
    monkeypatch.setenv("LOCAL_RANK", "0")
    distributed.report_before_group("a first rank")
    assert waits == [distributed.PEER_WAIT_S]
    assert capsys.readouterr().err.splitlines() == ["no launcher", "a second rank, not stopped by its launcher",
                                                    "a first rank"]
