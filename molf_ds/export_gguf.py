"""A merged transformers model written as one GGUF file (llama.cpp, Ollama, LM Studio) with the `gguf` package's
writer: weights under llama.cpp's tensor names (the `gguf` package's own name map), the architecture's metadata,
and the tokenizer the model was trained with (vocabulary, merges, token types, special tokens, chat template).

Architectures: llama (SmolLM2, Llama 2/3 without rope scaling) and gemma3 (Gemma 3 text). Types: F32, F16, BF16,
Q8_0 (2-D weights; norms stay F32, and a weight whose rows do not split into 32-blocks stays F16 under Q8_0).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

TYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {"llama": "llama", "gemma3_text": "gemma3"}  # transformers model_type -> GGUF architecture


class ExportError(ValueError):
    """A model or tokenizer that cannot be written as GGUF; one line saying why."""


def _llama_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's llama rotates interleaved pairs; transformers' rotates halves: rows of each head reordered
    (the inverse of what transformers does when it reads a llama GGUF)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _rope_theta(config: Any) -> float:
    """The rope base of the global (full) attention layers; rope scaling is refused."""
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    by_layer_type = rope if all(isinstance(v, dict) for v in rope.values()) else {"full_attention": rope}
    for parameters in by_layer_type.values():
        if parameters.get("rope_type", "default") != "default":
            raise ExportError(f"rope scaling {parameters['rope_type']!r} is not written to GGUF (only default rope)")
    return float(by_layer_type["full_attention"]["rope_theta"])


def _metadata(writer: Any, config: Any, arch: str) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3" or head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)


def _tensor(tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """(data, raw GGML type) of one tensor in `kind`: 1-D tensors stay F32."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    data = tensor.detach().to(torch.float32).numpy()
    if kind == "f32" or data.ndim == 1:
        return data, T.F32
    if kind == "q8_0" and data.shape[-1] % 32 != 0:
        kind = "f16"
    if kind == "f16":
        return data.astype(np.float16), T.F16
    qtype = T.BF16 if kind == "bf16" else T.Q8_0
    return quantize(data, qtype), qtype


def _tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """The tokenizer's vocabulary (in id order, padded with unused `[PADi]` tokens to the embedding's
    `vocab_size`), merges and token types, special token ids, whether BOS/EOS are added, and the chat template;
    byte-level BPE as llama.cpp's `gpt2` model, byte-fallback BPE (sentencepiece converted, as Gemma's) as its
    `llama` model, scored in id order (the merge order)."""
    from gguf import TokenType

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model["type"] != "BPE":
        raise ExportError(f"tokenizer model {model['type']!r}: only BPE tokenizers (byte-level or byte-fallback) "
                          "are written to GGUF")
    size = len(tokenizer)
    if size > vocab_size:
        raise ExportError(f"the tokenizer has {size} tokens, more than the model's vocab_size {vocab_size}")
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    if any(t is None for t in tokens):
        raise ExportError("the tokenizer's ids are not contiguous from 0: cannot be written as a GGUF vocabulary")
    tokens += [f"[PAD{i}]" for i in range(size, vocab_size)]
    special = set(tokenizer.all_special_ids)
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    byte_fallback = bool(model.get("byte_fallback"))
    types = []
    for i, token in enumerate(tokens):
        if i >= size:
            types.append(TokenType.UNUSED)
        elif i in special or added.get(i, {}).get("special"):
            types.append(TokenType.CONTROL)
        elif i in added:
            types.append(TokenType.USER_DEFINED)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("llama" if byte_fallback else "gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(state) if not byte_fallback else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if byte_fallback:
        writer.add_token_scores([-float(i) for i in range(vocab_size)])
        writer.add_add_space_prefix(False)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(len(full) > len(bare) and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > len(bare) and full[-1] == tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(state: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: GPT-2's byte-level split ("gpt-2"), or a split regex
    transformers knows by a llama.cpp name."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    split = next((s for s in steps if s.get("type") == "Split"), None)
    pattern = (split or {}).get("pattern", {}).get("Regex")
    name = next((n for n, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern), None)
    if name is None:
        raise ExportError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) has no llama.cpp name known here")
    return name


def write_gguf(model: Any, tokenizer: Any, out: str | Path, kind: str = "f32", progress: bool = False,
               name: str | None = None) -> Path:
    """Write the (merged, vanilla) transformers causal LM `model` and its `tokenizer` to the GGUF file `out`."""
    from gguf import GGUFWriter, LlamaFileType, get_tensor_name_map
    from gguf.constants import MODEL_ARCH_NAMES
    from tqdm import tqdm

    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ExportError(f"architecture {config.model_type!r} is not written to GGUF; supported: "
                          f"{', '.join(ARCHITECTURES)}")
    if kind not in TYPES:
        raise ExportError(f"type {kind!r}: use one of {', '.join(TYPES)}")
    names = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch), config.num_hidden_layers)
    process: Callable[[str, torch.Tensor], torch.Tensor] = lambda gguf_name, t: t
    if arch == "llama":
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

        def process(gguf_name: str, t: torch.Tensor) -> torch.Tensor:
            part = gguf_name.split(".")[-2]
            return _llama_qk(t, heads[part]) if part in heads else t
    elif arch == "gemma3":  # llama.cpp's Gemma norms scale by w, transformers' by 1 + w
        def process(gguf_name: str, t: torch.Tensor) -> torch.Tensor:
            return t + 1 if gguf_name.endswith("norm.weight") else t

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(out, arch)
    writer.add_type("model")
    writer.add_name(name or Path(getattr(config, "_name_or_path", "") or "model").name)
    writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                          "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[kind])
    writer.add_quantization_version(2)
    _metadata(writer, config, arch)
    _tokenizer(writer, tokenizer, config.vocab_size)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for key in tqdm(list(state), desc=f"GGUF {kind.upper()}", unit="tensor", disable=not progress):
        if tied and key == "lm_head.weight":
            continue
        base, _, suffix = key.rpartition(".")
        gguf_base = names.get_name(base)
        if gguf_base is None:
            raise ExportError(f"tensor {key} has no GGUF name in the {arch} architecture")
        gguf_name = f"{gguf_base}.{suffix}"
        data, qtype = _tensor(process(gguf_name, state[key]), kind)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    return out
