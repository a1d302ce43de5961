"""wrap_model on Qwen2, Llama and Gemma3; merge round trip through save_pretrained / from_pretrained;
every MoLFConfig validation error; DeepSpeed config checks that run before any process group."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import molf_ds
from molf_ds.zero.ds_config import TESTED_DEEPSPEED, check_deepspeed_version, prepare_ds_config
from helpers.distributed import spawn
from helpers.tiny_models import token_batches


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
@pytest.mark.parametrize("variant", ["molf", "molf-e"])
def test_wrap_names_and_trainable_sets(tiny, arch, variant):
    cfg = molf_ds.MoLFConfig(variant=variant, lora_ranks=(4, 8) if variant == "molf-e" else (8,))
    model = molf_ds.wrap_model(tiny(arch), cfg)
    wrapped = molf_ds.molf_modules(model)
    assert len(wrapped) == 2 * 7  # two layers, seven projections each
    name, layer = wrapped[0]
    assert name == "model.layers.0.self_attn.q_proj"
    assert isinstance(layer.base_layer, torch.nn.Linear)
    assert layer.expert_names == list(cfg.expert_names)
    assert [a.out_features for a in layer.lora_A] == list(cfg.lora_ranks)
    assert layer.scaling == [a / r**0.5 for a, r in zip(cfg.lora_alphas, cfg.lora_ranks)]
    assert all((b.weight == 0).all() for b in layer.lora_B)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if variant == "molf-e":
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert model.molf_summary.trainable["full"] == 0 and model.molf_summary.trainable["other"] == 0
    else:
        assert f"{name}.base_layer.weight" in trainable and "model.embed_tokens.weight" in trainable
        assert model.molf_summary.trainable["full"] > 0


def test_wrapped_model_starts_equal_to_base(tiny):
    base = tiny("qwen2")
    ids = token_batches(1, 2, 12)[0]
    before = base(input_ids=ids).logits
    model = molf_ds.wrap_model(base, molf_ds.MoLFConfig(lora_dropout=0.0))
    torch.testing.assert_close(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_merge_round_trip_through_disk(tiny, tmp_path, arch):
    cfg = molf_ds.MoLFConfig(lora_ranks=(8,), lora_dropout=0.0, lr=1e-2, lora_lr=1e-2)
    model = molf_ds.wrap_model(tiny(arch), cfg)
    optimizer = molf_ds.build_optimizer(model, cfg)
    for ids in token_batches(3, 2, 12):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(layer.lora_B[0].weight.abs().sum() > 0 for _, layer in molf_ds.molf_modules(model))
    ids = token_batches(1, 2, 12, seed=9)[0]
    wrapped_logits = model(input_ids=ids).logits
    merged = molf_ds.merge_and_unwrap(model)
    assert not molf_ds.molf_modules(merged)
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in n or "base_layer" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(loaded(input_ids=ids).logits, wrapped_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(lora_ranks=(8, 16), lora_alphas=(32.0,)), "lora_alphas has 1 values but lora_ranks has 2"),
        (dict(lora_ranks=(0,)), "lora_ranks has 0"),
        (dict(lora_ranks=()), "lora_ranks is empty"),
        (dict(top_k=0), r"top_k=0 is outside \[1, 2\]"),
        (dict(top_k=3), r"top_k=3 is outside \[1, 2\]"),
        (dict(variant="molf-e", lora_ranks=(8, 16), top_k=3), r"top_k=3 is outside \[1, 2\]"),
        (dict(score="l2"), r"score='l2' is unknown: use one of \('epd', 'pfn', 'ldw'\)"),
        (dict(variant="lora"), "variant='lora' is unknown"),
        (dict(variant="molf-e", lora_ranks=(8,)), "at least two ranks"),
        (dict(lr=0.0), r"lr=0.0 must be > 0"),
        (dict(weight_decay=-1.0), "weight_decay=-1.0 must be >= 0"),
        (dict(lora_dropout=1.0), "lora_dropout=1.0 must be in"),
        (dict(betas=(0.9,)), "betas"),
        (dict(target_modules=()), "target_modules is empty"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        molf_ds.MoLFConfig(**fields)


def test_unknown_config_field_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"no field\(s\) \['rank'\].*valid fields"):
        molf_ds.MoLFConfig.from_dict({"rank": 8})


def test_targets_that_match_nothing_list_the_linear_names(tiny):
    with pytest.raises(ValueError, match=r"match no linear layer.*'down_proj'.*'q_proj'"):
        molf_ds.wrap_model(tiny("qwen2"), molf_ds.MoLFConfig(target_modules=("query",)))


def test_wrapping_twice_is_refused(tiny):
    model = molf_ds.wrap_model(tiny("qwen2"), molf_ds.MoLFConfig())
    with pytest.raises(ValueError, match="already has MoLF layers"):
        molf_ds.wrap_model(model, molf_ds.MoLFConfig())


def test_optimizer_refuses_a_config_with_other_experts(tiny):
    model = molf_ds.wrap_model(tiny("qwen2"), molf_ds.MoLFConfig())
    with pytest.raises(ValueError, match="differ from the config's"):
        molf_ds.build_optimizer(model, molf_ds.MoLFConfig(variant="molf-e"))


@pytest.mark.parametrize(
    "ds, message",
    [
        (None, "needs a DeepSpeed config"),
        ("missing.json", "missing.json does not exist"),
        ({"optimizer": {"type": "AdamW"}}, "key 'optimizer': remove it"),
        ({"train_micro_batch_size_per_gpu": "auto"}, r"\['train_micro_batch_size_per_gpu'\] are 'auto'"),
        ({"zero_optimization": {"stage": 4}}, "'zero_optimization.stage'=4"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "NVMe offload"),
        ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "needs ZeRO stage 1, 2 or 3"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param' needs ZeRO stage 3"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "NVMe offload"),
        ({"zero_force_ds_cpu_optimizer": True, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
         "zero_force_ds_cpu_optimizer"),
        ({"zero_optimization": {"stage": 2, "zenflow": {"topk_ratio": 0.1}}},
         r"^DeepSpeed config key 'zero_optimization.zenflow': ZenFlow .* bypassing MoLF's routing: remove it"),
        ({"zero_optimization": {"stage": 3, "zenflow": {}}}, "'zero_optimization.zenflow': ZenFlow"),
        ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}},
         r"^DeepSpeed config key 'zero_optimization.zero_quantized_weights': ZeRO\+\+ weight quantization .*: remove "
         "it .*zero_hpz_partition_size, is supported"),
        ({"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": True}},
         "'zero_optimization.zero_quantized_nontrainable_weights': ZeRO\\+\\+ frozen-weight quantization"),
        ({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}},
         "'zero_optimization.zero_quantized_gradients': ZeRO\\+\\+ gradient quantization"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}},
         r"^DeepSpeed config key 'zero_optimization.offload_optimizer.ratio'=0.3: partial offload .* remove it"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "super_offload": True}}},
         r"^DeepSpeed config key 'zero_optimization.offload_optimizer.super_offload': .* remove it"),
        ({"pipeline": {"stages": 2}}, r"^DeepSpeed config key 'pipeline': molf_ds does not run pipeline parallelism"),
        ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
         r"^DeepSpeed config key 'data_types.grad_accum_dtype'='fp32': .* BF16_Optimizer, .* use ZeRO stage 2 or 3"),
    ],
)
def test_deepspeed_config_errors_name_the_key(ds, message):
    with pytest.raises(ValueError, match=message):
        prepare_ds_config(ds)


def test_deepspeed_modes_molf_runs_are_accepted():
    """ZeRO++ hpZ (covered by the ZeRO-3 exactness runs), explicit whole offload, and the modes refused above
    when switched off."""
    zero = {"stage": 3, "zero_hpz_partition_size": 2, "zenflow": None, "zero_quantized_weights": False,
            "zero_quantized_gradients": False, "offload_optimizer": {"device": "cpu", "ratio": 1.0,
                                                                     "super_offload": False}}
    assert prepare_ds_config({"zero_optimization": zero})["zero_optimization"] == zero
    for stage, device in ((2, "none"), (3, "none"), (1, "cpu")):  # DeepSpeed steps through its ZeRO optimizer
        prepare_ds_config({"zero_optimization": {"stage": stage, "offload_optimizer": {"device": device}},
                           "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}})


def _initialize_a_pipeline_module(rank: int, world: int, out: str) -> None:
    import deepspeed
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    model = PipelineModule(layers=[torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)], num_stages=1)
    try:
        molf_ds.initialize(model, molf_ds.MoLFConfig(), {"train_batch_size": 1})
    except ValueError as error:
        Path(out).write_text(str(error))


@pytest.mark.slow
def test_pipeline_module_is_refused_at_initialize(tmp_path):
    out = tmp_path / "error.txt"
    spawn(_initialize_a_pipeline_module, 1, str(out))
    assert out.read_text().startswith("molf_ds.initialize got a deepspeed PipelineModule: molf_ds does not run "
                                      "pipeline parallelism (each stage would route only its own layers): pass the "
                                      "model itself and use data parallelism with ZeRO")


def test_offload_config_is_made_to_accept_the_client_optimizer(tmp_path):
    path = tmp_path / "zero2_offload.json"
    path.write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}')
    ds = prepare_ds_config(path)
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["zero_allow_untested_optimizer"] is True


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(ValueError, match="broken.json is not valid JSON: line 2"):
        prepare_ds_config(path)


def test_pyproject_accepts_the_range_initialize_accepts():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    low, high = TESTED_DEEPSPEED
    assert re.findall(r'"deepspeed([^"]*)"', text) == [f">={low},<{high}"]


def test_untested_deepspeed_is_refused(monkeypatch):
    monkeypatch.delenv("MOLF_DS_ALLOW_UNTESTED_DEEPSPEED", raising=False)
    with pytest.raises(RuntimeError, match="deepspeed>=0.19.8,<0.20"):
        check_deepspeed_version("0.21.0")
    check_deepspeed_version("0.19.8")
    monkeypatch.setenv("MOLF_DS_ALLOW_UNTESTED_DEEPSPEED", "1")
    check_deepspeed_version("0.21.0")
