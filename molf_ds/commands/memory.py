"""`molf-ds estimate-memory`: bytes of model states per GPU and per node's CPU, for FFT, LoRA, MoLF, MoLF-E.

Counts come from the real architecture built on the meta device (no weights, no download). Byte
conventions follow DeepSpeed's own estimators for mixed-precision Adam: 2 bytes per 16-bit parameter,
and per trainable parameter 2 (16-bit grad) + 4 (fp32 grad) + 4 (fp32 master) + 8 (two moments).
Under ZeRO-3, MoLF's LoRA experts are kept resident (replicated) on every GPU. (DeepSpeed's ZeRO-3
estimator counts 2 bytes less per parameter than its ZeRO-2 one; we count the fp32 gradient whole.)
`--gpu-gib N` answers what fits: every ZeRO stage and offload mode, each method's model states plus its activations
(molf_ds.commands.activations: counted on the architecture for `--seq` x `--micro-batch` tokens) against N GiB.
`speculative_update` adds a 4-byte backup per MoLF trainable parameter beside the offloaded optimizer states
(it runs in the CPU kernel only, so without optimizer offload it costs nothing on the GPU).
`--breakdown` (ZeRO-3) lists every buffer a rank holds beyond the model states too, from the `--zero` values and the
model's parameters (molf_ds.commands.zero3_memory), with each rank's peak on its device and in host RAM.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from molf_ds.config import DEFAULT_TARGETS
from .activations import activations
from .methods import MEMORY_METHODS, REGISTRY
from .models import MODELS, resolve
from .sources import SourceError, check_model
from .zero3_memory import PROCESS_BYTES, Item, Layout, ZeroSettings, breakdown, layout, peak, zero_settings

BUNDLED = Path(__file__).parent / "model_configs"
DEFAULT_RANKS = {"lora": (128,), "molf": (128,), "molf-e": (32, 128)}
GRAD16, STATES32 = 2, 16  # bytes per trainable parameter: 16-bit grad; fp32 grad + master + m + v
BACKUP32 = 4  # bytes per MoLF trainable parameter with speculative_update (CPU optimizer)
GIB = 2**30
MODES = ((0, False, False), (1, False, False), (1, True, False), (2, False, False), (2, True, False),
         (3, False, False), (3, True, False), (3, True, True))  # (stage, offload optimizer, offload params)


@dataclass(frozen=True)
class ModelCounts:
    params: int  # the base model, tied weights once
    largest: int  # numel of its largest parameter
    lora_per_rank: int  # LoRA parameters per unit of rank over all target linears: sum(in + out)


@dataclass(frozen=True)
class Estimate:
    method: str
    trainable: int
    frozen: int
    gpu_bytes: int
    cpu_bytes_per_node: int


def load_config(model: str, key: str = "MODEL", also: Sequence[str] = (), gguf_file: str | None = None):
    """A bundled architecture name (gemma-3-1b, qwen2.5-1.5b, qwen2.5-3b; or one of `also`, which the caller
    resolves), a `molf-ds models` name, a config.json, a model folder, or a folder and the GGUF checkpoint
    `gguf_file` in it; otherwise `SourceError` naming `key`."""
    if gguf_file:
        check_model(key, model, gguf_file, gguf_key="--gguf-file")
        return AutoConfig.from_pretrained(model, gguf_file=gguf_file)
    bundled = BUNDLED / f"{model}.json"
    if not bundled.is_file() and model in MODELS and not Path(model).exists():
        check_model(key, model)  # a registry name whose package is installed
        model = resolve(model)
    path = bundled if bundled.is_file() else Path(model)
    if not path.exists():
        names = [*also, *sorted(p.stem for p in BUNDLED.glob("*.json")), *MODELS]
        near = difflib.get_close_matches(model, names, n=1)
        raise SourceError(key, f"{model!r} is neither a bundled architecture {names} (`molf-ds models` names included) "
                               "nor an existing config.json or model folder"
                               + (f" (did you mean {near[0]}?)" if near else ""))
    if path.is_dir():
        check_model(key, model)
        path = path / "config.json"
    try:
        values = json.loads(path.read_text())
    except ValueError as error:
        raise SourceError(key, f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise SourceError(key, f"{path} is not a transformers config.json (no model_type)")
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError:
        raise SourceError(key, f"{path}: model_type {model_type!r} is unknown to this transformers "
                               f"{transformers.__version__}") from None


def count(config, targets: tuple[str, ...] = DEFAULT_TARGETS) -> ModelCounts:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): p.numel() for p in model.parameters()}
    output = model.get_output_embeddings()
    lora = sum(
        m.in_features + m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not output and name.rsplit(".", 1)[-1] in targets
    )
    return ModelCounts(sum(params.values()), max(params.values()), lora)


def estimate(
    counts: ModelCounts, method: str, ranks: tuple[int, ...], stage: int, offload_optimizer: bool,
    offload_param: bool, gpus_per_node: int, nodes: int, speculative_update: bool = False, weight_bytes: int = 2,
) -> Estimate:
    """`weight_bytes` 2: mixed precision (16-bit weights and gradients beside the fp32 states); 4: fp32 training
    (CPU), whose gradients are the fp32 ones counted in the states."""
    n = gpus_per_node * nodes
    w = weight_bytes
    spec = REGISTRY[method]
    lora = counts.lora_per_rank * sum(ranks) if spec.has_lora else 0
    trainable = (counts.params if spec.trains_base else 0) + lora
    frozen = 0 if spec.trains_base else counts.params
    resident = lora if stage == 3 and spec.molf else 0
    weights = w * (trainable + frozen)
    if stage == 3:
        weights = w * (trainable + frozen - resident) / n + w * resident + 2 * w * counts.largest
    states = STATES32 * trainable / (n if stage >= 1 else 1)
    grads = (GRAD16 if w == 2 else 0) * trainable / (n if stage >= 2 else 1)
    gpu, cpu = weights + grads + states, 0.0
    if offload_optimizer:  # grads stream to the CPU's fp32 buffers as they are reduced
        gpu, cpu = gpu - states - grads, cpu + states * gpus_per_node
        if speculative_update and spec.molf:
            cpu += BACKUP32 * trainable / (n if stage >= 1 else 1) * gpus_per_node
    if offload_param:
        moved = w * (trainable + frozen - resident) / n
        gpu, cpu = gpu - moved, cpu + moved * gpus_per_node
    return Estimate(method, trainable, frozen, int(gpu), int(cpu))


def deepspeed_fft_estimate(counts: ModelCounts, stage: int, offload_optimizer: bool, offload_param: bool,
                           gpus_per_node: int, nodes: int) -> tuple[int, int] | None:
    """DeepSpeed's own estimator for full fine-tuning, as (cpu bytes per node, gpu bytes); stages 2 and 3."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            counts.params, counts.largest, gpus_per_node, nodes, offload_optimizer, offload_param)
        return cpu, gpu
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(counts.params, gpus_per_node, nodes, offload_optimizer)
    return None


def fits(config, counts: ModelCounts, methods: Sequence[str], ranks: tuple[int, ...] | None, gpu_gib: float,
         seq: int, micro_batch: int, lora_dropout: float, checkpointing: bool, gpus_per_node: int = 1,
         nodes: int = 1) -> list[dict]:
    """For every ZeRO mode and method: GPU bytes of model states and of activations, and whether their sum fits
    in `gpu_gib` GiB; host bytes per node beside them."""
    acts = {m: activations(config, m, ranks or DEFAULT_RANKS.get(m, (0,)), seq, micro_batch, lora_dropout).total(
        checkpointing) for m in methods}
    rows = []
    for stage, opt, param in MODES:
        for m in methods:
            e = estimate(counts, m, ranks or DEFAULT_RANKS.get(m, (0,)), stage, opt, param, gpus_per_node, nodes)
            gpu = e.gpu_bytes + acts[m]
            rows.append({"stage": stage, "offload_optimizer": opt, "offload_param": param, "method": m,
                         "states_bytes": e.gpu_bytes, "activation_bytes": acts[m], "gpu_bytes": gpu,
                         "cpu_bytes_per_node": e.cpu_bytes_per_node, "fits": gpu <= gpu_gib * GIB})
    return rows


def rank_breakdown(config, counts: ModelCounts, lay: Layout, method: str, ranks: tuple[int, ...], z: ZeroSettings,
                   world: int, offload_optimizer: bool, offload_param: bool, weight_bytes: int, seq: int,
                   micro_batch: int, lora_dropout: float, cpu_ranks: bool) -> dict:
    """ZeRO-3: every buffer of one rank (`items`), its peak on the device (`device_bytes`, 0 on CPU ranks, where the
    device is host RAM) and in host RAM with the process itself (`host_bytes`)."""
    spec = REGISTRY[method]
    lora = counts.lora_per_rank * sum(ranks) if spec.has_lora else 0
    acts = activations(config, method, ranks, seq, micro_batch, lora_dropout,
                       torch.float32 if weight_bytes == 4 else torch.bfloat16).total()
    items = breakdown(lay, z, trains_base=spec.trains_base, lora=lora, resident=lora if spec.molf else 0, world=world,
                      offload_optimizer=offload_optimizer, offload_param=offload_param, weight_bytes=weight_bytes,
                      activation_bytes=acts, cpu_ranks=cpu_ranks)
    host_places = ("device", "host") if cpu_ranks else ("host",)
    return {"method": method, "items": [asdict(i) for i in items],
            "device_bytes": 0 if cpu_ranks else peak(items, ("device",)),
            "host_bytes": PROCESS_BYTES + peak(items, host_places)}


def _mode(row: dict) -> str:
    offload = [name for name, on in (("optimizer", row["offload_optimizer"]), ("params", row["offload_param"])) if on]
    return f"ZeRO-{row['stage']}" + (f" + offload {' + '.join(offload)}" if offload else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="gemma-3-1b, qwen2.5-1.5b, qwen2.5-3b, a `molf-ds models` name (smollm2-135m, "
                                      "gemma3-270m), a config.json or a model folder")
    parser.add_argument("--gguf-file", help="a GGUF checkpoint inside the model folder: read its architecture")
    parser.add_argument("--method", choices=("all",) + MEMORY_METHODS, default="all")
    parser.add_argument("--ranks", default=None, help="LoRA ranks, comma-separated (default: 128; 32,128 for molf-e)")
    parser.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=3)
    parser.add_argument("--offload-optimizer", action="store_true", help="offload_optimizer: cpu")
    parser.add_argument("--offload-param", action="store_true", help="offload_param: cpu (stage 3)")
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--speculative-update", action="store_true",
                        help="MoLF's speculative_update: a 4-byte backup per MoLF parameter (with --offload-optimizer)")
    parser.add_argument("--gpu-gib", type=float, help="what fits in this much GPU memory: every stage and offload "
                                                      "mode, model states plus activations")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence for the activations (default 1024)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU for the activations (default 1)")
    parser.add_argument("--lora-dropout", type=float, default=0.1, help="the experts' input dropout (default 0.1)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="activations with checkpointing: each layer keeps its input")
    parser.add_argument("--fp32", action="store_true", help="fp32 training (CPU): 4-byte weights, fp32 gradients only")
    parser.add_argument("--breakdown", action="store_true",
                        help="ZeRO-3: every buffer a rank holds (model states, buckets, gathered parameters, "
                             "activations, the process) and its peak per rank")
    parser.add_argument("--zero", action="append", default=[], metavar="KEY=VALUE",
                        help="with --breakdown: a zero_optimization value, e.g. reduce_bucket_size=5e7 (repeatable; "
                             "DeepSpeed's defaults otherwise)")
    parser.add_argument("--cpu-ranks", action="store_true",
                        help="with --breakdown: the ranks run on CPUs (gloo), their device memory is host RAM")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.offload_param and args.stage != 3:
        raise SystemExit("estimate-memory: --offload-param needs --stage 3")
    if (args.breakdown or args.zero or args.cpu_ranks) and args.stage != 3:
        raise SystemExit("estimate-memory: --breakdown, --zero and --cpu-ranks need --stage 3")
    if (args.zero or args.cpu_ranks) and not args.breakdown:
        raise SystemExit("estimate-memory: --zero and --cpu-ranks go with --breakdown")
    try:
        config = load_config(args.model, gguf_file=args.gguf_file)
    except SourceError as error:
        print(f"molf-ds estimate-memory: {error}", file=sys.stderr)
        return 2
    counts = count(config)
    methods = MEMORY_METHODS if args.method == "all" else (args.method,)
    ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else None
    if args.gpu_gib is not None:
        return _print_fits(args, config, counts, methods, ranks)
    if args.breakdown:
        return _print_breakdown(args, config, counts, methods, ranks)
    setup = (args.stage, args.offload_optimizer, args.offload_param, args.gpus_per_node, args.nodes)
    rows = [estimate(counts, m, ranks or DEFAULT_RANKS.get(m, (0,)), *setup, speculative_update=args.speculative_update,
                     weight_bytes=4 if args.fp32 else 2) for m in methods]
    deepspeed_row = deepspeed_fft_estimate(counts, *setup)
    if args.json:
        print(json.dumps({"counts": asdict(counts), "estimates": [asdict(r) for r in rows],
                          "deepspeed_fft": deepspeed_row}, indent=2))
        return 0
    print(f"{args.model}: {counts.params / 1e9:.2f}B parameters; ZeRO-{args.stage}, offload optimizer "
          f"{args.offload_optimizer}, offload params {args.offload_param}, {args.nodes} x {args.gpus_per_node} GPUs")
    print(f"{'method':<22}{'trainable':>14}{'GPU GiB':>10}{'CPU GiB/node':>14}")
    for r in rows:
        print(f"{r.method:<22}{r.trainable:>14,}{r.gpu_bytes / GIB:>10.2f}{r.cpu_bytes_per_node / GIB:>14.2f}")
    if deepspeed_row:
        cpu, gpu = deepspeed_row
        print(f"{'fft (DeepSpeed est.)':<22}{counts.params:>14,}{gpu / GIB:>10.2f}{cpu / GIB:>14.2f}")
    print("Model states only: activations, logits and buffers come on top (DeepSpeed's own estimate adds a 1.5x "
          "buffer on the CPU side; --breakdown counts them under ZeRO-3).")
    return 0


def _print_fits(args: argparse.Namespace, config, counts: ModelCounts, methods: Sequence[str],
                ranks: tuple[int, ...] | None) -> int:
    rows = fits(config, counts, methods, ranks, args.gpu_gib, args.seq, args.micro_batch, args.lora_dropout,
                args.activation_checkpointing, args.gpus_per_node, args.nodes)
    if args.json:
        print(json.dumps({"counts": asdict(counts), "gpu_gib": args.gpu_gib, "fits": rows}, indent=2))
        return 0
    print(f"{args.model}: {counts.params / 1e9:.2f}B parameters; what fits in {args.gpu_gib:g} GiB per GPU, "
          f"{args.nodes} x {args.gpus_per_node} GPUs, bf16, micro-batch {args.micro_batch} x {args.seq} tokens, "
          f"LoRA dropout {args.lora_dropout:g}, activation checkpointing "
          f"{'on' if args.activation_checkpointing else 'off'}")
    print(f"{'mode':<40}{'method':<8}{'states GiB':>11}{'activ. GiB':>11}{'GPU GiB':>9}{'CPU GiB/node':>14}  fits")
    for r in rows:
        print(f"{_mode(r):<40}{r['method']:<8}{r['states_bytes'] / GIB:>11.2f}{r['activation_bytes'] / GIB:>11.2f}"
              f"{r['gpu_bytes'] / GIB:>9.2f}{r['cpu_bytes_per_node'] / GIB:>14.2f}  {'yes' if r['fits'] else 'no'}")
    print("GPU: model states (molf_ds's byte conventions) + activations counted on the architecture (saved tensors, "
          "the logits' gradient); allocator fragmentation and communication buffers come on top.")
    return 0


def _print_breakdown(args: argparse.Namespace, config, counts: ModelCounts, methods: Sequence[str],
                     ranks: tuple[int, ...] | None) -> int:
    try:
        z = zero_settings(args.zero)
    except ValueError as error:
        print(f"molf-ds estimate-memory: {error}", file=sys.stderr)
        return 2
    lay = layout(config)
    world = args.gpus_per_node * args.nodes
    rows = [rank_breakdown(config, counts, lay, m, ranks or DEFAULT_RANKS.get(m, (0,)), z, world,
                           args.offload_optimizer, args.offload_param, 4 if args.fp32 else 2, args.seq,
                           args.micro_batch, args.lora_dropout, args.cpu_ranks) for m in methods]
    if args.json:
        print(json.dumps({"counts": asdict(counts), "zero": asdict(z), "process_bytes": PROCESS_BYTES,
                          "breakdown": rows}, indent=2))
        return 0
    print(f"{args.model}: {counts.params / 1e9:.2f}B parameters; ZeRO-3, offload optimizer {args.offload_optimizer}, "
          f"offload params {args.offload_param}, {world} ranks{' on CPUs' if args.cpu_ranks else ''}, "
          f"{'fp32' if args.fp32 else 'bf16'}, micro-batch {args.micro_batch} x {args.seq} tokens; per rank")
    print("zero_optimization: " + ", ".join(f"{k} {v:.3g}" for k, v in asdict(z).items()))
    for r in rows:
        print(f"{r['method']:<44}{'place':<8}{'phase':<10}{'GiB':>7}")
        for i in (Item(**i) for i in r["items"]):
            print(f"  {i.name:<42}{i.place:<8}{i.phase:<10}{i.bytes / GIB:>7.2f}")
        print(f"  {'process (Python, torch, DeepSpeed)':<42}{'host':<8}{'kept':<10}{PROCESS_BYTES / GIB:>7.2f}")
        device = "" if args.cpu_ranks else f"device {r['device_bytes'] / GIB:.2f} GiB, "
        print(f"  peak per rank: {device}host {r['host_bytes'] / GIB:.2f} GiB")
    print("Peak: what is kept plus the larger of the training working set and the set-up transient "
          "(docs/performance.md lists each item's source).")
    return 0
