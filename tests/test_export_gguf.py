"""GGUF export (molf_ds.export_gguf, `molf-ds export`): the written file reads back through the `gguf` package's
reader and through transformers (`gguf_file=`) with the model's logits (F32: equal within 1e-4) and the same
tokenizer; tiny random llama models with a small byte-level BPE tokenizer here, the real SmolLM2 and Gemma 3 in
the slow tests."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from helpers.tiny_models import tiny_model
from molf_ds.commands import models as pretrained
from molf_ds.commands.cli import main
from molf_ds.export_gguf import ARCHITECTURES, ExportError, write_gguf

TEXTS = ["The capital of Japan is Tokyo.", "SELECT name FROM users WHERE id = 42;",
         "  héllo\n\twörld 12345 <|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# max |logit difference| against the F32 model allowed per type, measured on SmolLM2-135M (logits up to ~28):
# F16 0.03, BF16 0.12, Q8_0 0.64 on the prompts below; the bounds leave about 2-3x room
TOLERANCE = {"f32": 1e-4, "f16": 0.1, "bf16": 0.4, "q8_0": 1.5}


def byte_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (as SmolLM2's) trained on a few lines, with two special tokens and a template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TEXTS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture
def tiny_llama(tmp_path):
    tokenizer = byte_level_tokenizer(300)
    model = tiny_model("llama", tmp_path / "llama", seed=1, vocab_size=len(tokenizer) + 4,  # padded embedding
                       tie_word_embeddings=False)
    tokenizer.save_pretrained(tmp_path / "llama")
    return model, tokenizer, tmp_path / "llama"


def assert_round_trip(model, tokenizer, path, kind: str) -> None:
    """`path` reads back with the gguf reader and transformers: same tokenizer, logits within TOLERANCE[kind]."""
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == ARCHITECTURES[model.config.model_type]
    weights = {t.name: t.tensor_type for t in reader.tensors if t.name.endswith("attn_q.weight")}
    want = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
            "q8_0": GGMLQuantizationType.Q8_0}[kind]
    assert set(weights.values()) == {want}
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    reloaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=False) == tokenizer.decode(
            tokenizer(text)["input_ids"], skip_special_tokens=False)
    assert reloaded.chat_template == tokenizer.chat_template
    assert (reloaded.bos_token_id, reloaded.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want_logits, got = model(**batch).logits, loaded(**batch).logits
    gap = (want_logits - got).abs().max().item()
    assert gap <= TOLERANCE[kind], (kind, gap)


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_tiny_llama_round_trip(tiny_llama, tmp_path, kind):
    model, tokenizer, _ = tiny_llama
    path = write_gguf(model, tokenizer, tmp_path / f"tiny-{kind}.gguf", kind)
    assert_round_trip(model, tokenizer, path, kind)


def test_export_command_writes_gguf_and_prints_only_its_path(tiny_llama, tmp_path):
    model, tokenizer, directory = tiny_llama
    out = tmp_path / "cli" / "model.gguf"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export", str(directory), "--format", "gguf", "--out", str(out)]) == 0
    assert stdout.getvalue() == f"{out}\n"
    assert_round_trip(model, tokenizer, out, "f32")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(directory), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits,
                                   model(ids).logits, rtol=0, atol=1e-6)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXTS[2])["input_ids"] == tokenizer(TEXTS[2])["input_ids"]


def test_another_architecture_is_refused_in_one_line(tmp_path, capsys):
    directory = tmp_path / "qwen2"
    tiny_model("qwen2", directory, vocab_size=300)
    byte_level_tokenizer(300).save_pretrained(directory)
    with pytest.raises(ExportError, match=r"^architecture 'qwen2' is not written to GGUF; supported: llama, "
                                          r"gemma3_text$"):
        write_gguf(AutoModelForCausalLM.from_pretrained(directory), byte_level_tokenizer(300), tmp_path / "x.gguf")
    assert main(["export", str(directory), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("molf-ds export: architecture 'qwen2'") and "\n" not in err
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def smollm2():
    directory = pretrained.prepare("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.mark.slow  # the real SmolLM2-135M (prepared once in the molf_ds cache); F16 and BF16 on the tiny model
@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_smollm2_round_trip(smollm2, tmp_path, kind):
    model, tokenizer = smollm2
    assert_round_trip(model, tokenizer, write_gguf(model, tokenizer, tmp_path / f"smollm2-{kind}.gguf", kind), kind)


@pytest.mark.slow  # the real Gemma 3 270M: sentencepiece-style vocabulary, tied embeddings, (1 + w) norms
def test_gemma3_round_trip(tmp_path):
    directory = pretrained.prepare("gemma3-270m")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert_round_trip(model, tokenizer, write_gguf(model, tokenizer, tmp_path / "gemma3.gguf"), "f32")
