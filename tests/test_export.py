"""MoLF-E experts exported as one PEFT LoRA adapter load with peft and give the wrapped model's logits;
save_merged writes a vanilla checkpoint that loads with from_pretrained."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import molf_ds
from helpers.tiny_models import token_batches


def _trained(model, cfg, steps=3):
    optimizer = molf_ds.build_optimizer(model, cfg)
    for ids in token_batches(steps, 2, 12):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_peft_export_round_trip(tiny, tmp_path, arch):
    cfg = molf_ds.MoLFConfig(variant="molf-e", lora_ranks=(4, 8), lora_alphas=(16.0, 8.0), lora_dropout=0.0,
                             lora_lr=1e-2, top_k=2)  # both experts train
    model = _trained(molf_ds.wrap_model(tiny(arch, seed=3), cfg), cfg)
    assert all(layer.lora_B[1].weight.abs().sum() > 0 for _, layer in molf_ds.molf_modules(model))
    ids = token_batches(1, 2, 12, seed=7)[0]
    want = model(input_ids=ids).logits
    molf_ds.export_peft(model, tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 12 and adapter_config["peft_type"] == "LORA"
    base = tiny(arch, seed=3)  # the same frozen base, from disk
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(peft_model(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_peft_export_refuses_a_trained_base(tiny, tmp_path):
    model = molf_ds.wrap_model(tiny("qwen2"), molf_ds.MoLFConfig())
    with pytest.raises(ValueError, match="use molf_ds.save_merged"):
        molf_ds.export_peft(model, tmp_path / "adapter")


def test_save_merged_writes_vanilla_checkpoint(tiny, tmp_path):
    cfg = molf_ds.MoLFConfig(lora_ranks=(8,), lora_dropout=0.0, lr=1e-2, lora_lr=1e-2)
    model = _trained(molf_ds.wrap_model(tiny("llama"), cfg), cfg)
    ids = token_batches(1, 2, 12, seed=7)[0]
    want = model(input_ids=ids).logits
    molf_ds.save_merged(model, tmp_path / "final")
    assert molf_ds.molf_modules(model), "save_merged must leave the training model wrapped"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32)
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=0)
