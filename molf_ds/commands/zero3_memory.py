"""What a ZeRO-3 rank holds while it trains, item by item (`molf-ds estimate-memory --breakdown`).

Model states are not all of it: DeepSpeed 0.19's ZeRO-3 keeps working buffers whose sizes follow from its
`zero_optimization` values and from the model's parameter sizes and order. docs/performance.md lists the items with
the DeepSpeed code each one comes from; per rank, in bytes (w: 2 for bf16, 4 for fp32):

- the parameter partitions (w each; under offload_param one flat host buffer per parameter group);
- the fp32 master partition, the Adam moments and two gradient partitions: the accumulation buffer in the model's
  dtype that the reduce-scatter writes, and the optimizer's fp32 gradient, one per sub-group;
- MoLF's experts and the parameters of at most `stage3_param_persistence_threshold` elements, kept whole;
- the reduce bucket (`reduce_bucket_size` elements; on CPU ranks only its written pages count);
- in forward and backward: the gathered parameters at their peak, found by replaying DeepSpeed's parameter
  coordinator on the module order; the largest parameter's gradient and the copy its reduction makes (gloo's
  reduce-scatter on CPU ranks; with offload_optimizer its partition's fp64 norm); the activations;
- at set-up, the largest sub-group's whole parameters as fp32 zeros (freed before training);
- on CPU ranks, the gathered parameters' heap blocks glibc keeps once they are freed (under its 32 MiB mmap
  threshold), and the process itself (Python, torch, DeepSpeed, transformers, the gloo group): `PROCESS_BYTES`.

The peak is what is kept plus the larger of the training working set and the set-up transient."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM

# RSS of a rank before it builds its model: Python 3.11, torch 2.13 (CPU), deepspeed 0.19.8, transformers and molf_ds
# imported and the 2-rank gloo group started (benchmarks/host_memory.py's `rss_start`, 584 MiB on each rank).
PROCESS_BYTES = 584 * 2**20
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest dynamic mmap threshold (64-bit): smaller blocks come from the heap
NORM_CHUNK = 250_000_000  # elements DeepSpeed's gradient norm converts to fp64 at a time
MASTER, MOMENTS = 4, 8  # bytes per trainable element: fp32 master copy, Adam's two moments


@dataclass(frozen=True)
class ZeroSettings:
    """The `zero_optimization` values that size ZeRO-3's buffers (DeepSpeed's defaults unless given)."""
    reduce_bucket_size: int
    prefetch_bucket_size: int
    max_live_parameters: int
    max_reuse_distance: int
    param_persistence_threshold: int
    model_persistence_threshold: int
    sub_group_size: int


def zero_settings(items: Sequence[str] = ()) -> ZeroSettings:
    """`KEY=VALUE` items (DeepSpeed's `zero_optimization` keys, e.g. reduce_bucket_size=5e7), read by DeepSpeed's own
    config model so that its names, aliases and defaults apply; a bad item raises ValueError naming it."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--zero {item!r}: give KEY=VALUE, e.g. reduce_bucket_size=5e7")
        try:
            values[key] = json.loads(value)
        except ValueError:
            values[key] = value
    try:
        config = DeepSpeedZeroConfig(stage=3, **values)
    except ValidationError as error:
        first = error.errors()[0]
        raise ValueError(f"--zero {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return ZeroSettings(**{f.name: int(getattr(config, f.name)) for f in fields(ZeroSettings)})


@dataclass(frozen=True)
class Layout:
    """A model's parameters as ZeRO-3 meets them: numel per parameter (tied ones once), and per module, in the order
    a decoder runs them (registration order, containers first; the output embedding last), the indices of the
    parameters it owns itself (none for containers, which still take their turn in DeepSpeed's trace)."""
    numel: tuple[int, ...]
    modules: tuple[tuple[int, ...], ...]


def layout(config) -> Layout:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    index: dict[int, int] = {}
    numel: list[int] = []
    modules = []
    for module in model.modules():
        owned = []
        for p in module.parameters(recurse=False):
            if id(p) not in index:
                index[id(p)] = len(numel)
                numel.append(p.numel())
            owned.append(index[id(p)])
        modules.append(tuple(owned))
    return Layout(tuple(numel), tuple(modules))


def persistent(lay: Layout, z: ZeroSettings) -> set[int]:
    """The parameters DeepSpeed keeps gathered (`ds_persist`): at most `param_persistence_threshold` elements each,
    in model order while their sum stays within `model_persistence_threshold`."""
    kept, total = set(), 0
    for i, n in enumerate(lay.numel):
        if n <= z.param_persistence_threshold and total + n <= z.model_persistence_threshold:
            kept.add(i)
            total += n
    return kept


def gathered_peak(lay: Layout, z: ZeroSettings, held_below: int = 0) -> int:
    """The most elements of non-persistent parameters gathered at once in a training step after the first (the
    first records DeepSpeed's trace and neither prefetches nor keeps anything), replaying its coordinator: each
    module fetches its parameters, prefetches the next ones in trace order up to `prefetch_bucket_size` while fewer
    than `max_live_parameters` are gathered, and afterwards releases those of its parameters that neither a later
    module within `max_reuse_distance` elements of the trace nor an already popped prefetch entry still needs.
    Parameters of fewer than `held_below` elements stay counted once gathered (the heap blocks glibc keeps)."""
    kept = persistent(lay, z)
    trace = lay.modules + lay.modules[::-1]  # forward, then backward in reverse
    queue = [(step, i) for step, module in enumerate(trace) for i in module if i not in kept]
    live: set[int] = set()
    held: set[int] = set()
    wanted_at: dict[int, int] = {}  # the latest trace step a popped queue entry needs the parameter for
    head = peak = 0
    for step, module in enumerate(trace):
        live.update(i for i in module if i not in kept)
        while head < len(queue) and queue[head][0] <= step:
            wanted_at[queue[head][1]] = max(wanted_at.get(queue[head][1], -1), step)
            head += 1
        budget = min(z.max_live_parameters - sum(lay.numel[i] for i in live), z.prefetch_bucket_size)
        fetched = 0
        while head < len(queue) and fetched < budget:
            at, i = queue[head]
            head += 1
            wanted_at[i] = max(wanted_at.get(i, -1), at)
            if i not in live:
                live.add(i)
                fetched += lay.numel[i]
        held.update(i for i in live if lay.numel[i] < held_below)
        peak = max(peak, sum(lay.numel[i] for i in live | held))
        reused, traversed = set(), 0
        for later in trace[step + 1:]:
            if traversed >= z.max_reuse_distance:
                break
            reused.update(later)
            traversed += sum(lay.numel[i] for i in later)
        live -= {i for i in module if i not in reused and wanted_at.get(i, -1) <= step + 1}
    return peak


def largest_sub_group(sizes: list[int], world: int, sub_group_size: int) -> int:
    """Whole elements of the largest sub-group of one parameter group (`sizes`: its parameters' numel in order):
    DeepSpeed closes a sub-group once its partition elements reach `sub_group_size`."""
    largest = whole = local = 0
    for n in sizes:
        whole += n
        local += -(-n // world)
        if local >= sub_group_size:
            largest, whole, local = max(largest, whole), 0, 0
    return max(largest, whole)


@dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    place: str  # "device" (the GPU; host RAM on CPU ranks) or "host"
    phase: str  # "kept" (from set-up to the end), "training" (forward/backward peak), "set-up" (transient)


def breakdown(lay: Layout, z: ZeroSettings, *, trains_base: bool, lora: int, resident: int, world: int,
              offload_optimizer: bool, offload_param: bool, weight_bytes: int, activation_bytes: int,
              cpu_ranks: bool = False) -> list[Item]:
    """Bytes per rank of every buffer a ZeRO-3 rank holds (see the module's docstring). `trains_base`: the model's
    own parameters train (fft, molf) or stay frozen (lora, molf-e); `lora` counts the trainable expert elements,
    `resident` those kept whole on every rank (MoLF's experts). `cpu_ranks`: the ranks run on CPUs (gloo), whose
    reduce-scatter copies its input."""
    w = weight_bytes
    optimizer_place = "host" if offload_optimizer else "device"
    param_place = "host" if offload_param else "device"
    base = list(lay.numel) if trains_base else []
    trainable = sum(base) + lora
    part = -(-trainable // world)
    largest = max(base, default=0)  # the largest trainable parameter (experts' gradients fit the bucket)
    gathered = gathered_peak(lay, z)
    # CPU ranks: glibc serves blocks under its mmap threshold from the heap and keeps them once freed
    heap = gathered_peak(lay, z, MMAP_THRESHOLD_MAX // w) - gathered if cpu_ranks else 0
    # reducing the largest gradient: gloo's copy of it, then (offload_optimizer) its partition's norm in fp64
    reducing = max(w * largest if cpu_ranks else 0,
                   8 * min(-(-largest // world), NORM_CHUNK) if offload_optimizer else 0)
    items = [
        Item("parameter partitions", w * -(-sum(lay.numel) // world) + w * -(-lora // world), param_place, "kept"),
        Item("fp32 master partition", MASTER * part, optimizer_place, "kept"),
        Item("Adam moments", MOMENTS * part, optimizer_place, "kept"),
        Item("fp32 gradient partition (optimizer)", MASTER * part, optimizer_place, "kept"),
        Item("gradient accumulation partition", w * part, optimizer_place, "kept"),
        Item("persistent parameters, whole", w * sum(lay.numel[i] for i in persistent(lay, z)), "device", "kept"),
        Item("MoLF experts, whole", w * resident, "device", "kept"),
        # CPU ranks: the bucket's pages count once written, and the gradients fill at most all of it
        Item("reduce bucket", w * (min(z.reduce_bucket_size, trainable) if cpu_ranks else z.reduce_bucket_size),
             "device", "kept"),
        Item("gathered parameters (peak)", w * gathered, "device", "training"),
        Item("gathered parameters freed into the heap", w * heap, "host", "training"),
        Item("largest parameter's gradient", w * largest, "device", "training"),
        Item("its reduction's copy", reducing, "device", "training"),
        Item("activations", activation_bytes, "device", "training"),
        Item("largest sub-group, whole (fp32)", MASTER * largest_sub_group(base + [lora], world, z.sub_group_size),
             optimizer_place, "set-up"),
    ]
    return [item for item in items if item.bytes]


def peak(items: list[Item], places: tuple[str, ...] = ("device", "host")) -> int:
    """What persists plus the larger of the training working set and the set-up transient, over `places`."""
    def total(phase: str) -> int:
        return sum(i.bytes for i in items if i.phase == phase and i.place in places)
    return total("kept") + max(total("training"), total("set-up"))
