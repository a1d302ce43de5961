"""estimate-memory --breakdown: ZeRO-3's buffers per rank from the zero_optimization values, by hand on a tiny Qwen2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.tiny_models import CONFIGS
from molf_ds.commands.memory import load_config
from molf_ds.commands.zero3_memory import (PROCESS_BYTES, Layout, breakdown, gathered_peak, largest_sub_group, layout,
                                           peak, persistent, zero_settings)

# The tiny Qwen2 (hidden 64, intermediate 96, 2 layers, 4 heads of 16, 2 KV heads, vocab 128, untied head), by hand:
EMBED = HEAD = 128 * 64
Q, K, V, O = 64 * 64, 32 * 64, 32 * 64, 64 * 64  # weights; q, k and v also have biases (64, 32, 32)
GATE = UP = DOWN = 96 * 64
SMALL_PER_LAYER = 64 + 32 + 32 + 64 + 64  # the three biases, the two norms
PARAMS = EMBED + HEAD + 64 + 2 * (Q + K + V + O + GATE + UP + DOWN + SMALL_PER_LAYER)  # 64: the final norm


@pytest.fixture(scope="module")
def tiny():
    return layout(CONFIGS["qwen2"]())


def test_layout_by_hand(tiny):
    assert sum(tiny.numel) == PARAMS and max(tiny.numel) == EMBED
    q_proj = [m for m in tiny.modules if m][1]
    assert q_proj == (1, 2) and [tiny.numel[i] for i in q_proj] == [Q, 64]  # weight, bias
    assert len(persistent(tiny, zero_settings(["stage3_param_persistence_threshold=100"]))) == 2 * 5 + 1
    assert persistent(tiny, zero_settings(["stage3_param_persistence_threshold=0"])) == set()


def test_gathered_peak_by_hand(tiny):
    no_small = "stage3_param_persistence_threshold=100"  # biases and norms stay gathered, weights do not
    alone = zero_settings([no_small, "stage3_max_reuse_distance=0", "stage3_prefetch_bucket_size=0"])
    assert gathered_peak(tiny, alone) == EMBED  # one module at a time: the largest one
    # DeepSpeed's default reuse distance (1e9) exceeds the whole trace: nothing is released before backward
    assert gathered_peak(tiny, zero_settings([no_small])) == PARAMS - 2 * SMALL_PER_LAYER - 64


def test_prefetch_by_hand():
    """A container, then modules owning 100, 200 and 300 elements; forward, then backward in reverse. Prefetching one
    element takes the next parameter not gathered: at module 2's backward turn that is module 0's (100), beside
    300 and the prefetched 200, which the forward turn of 2 popped (its own backward entry was gathered)."""
    lay = Layout(numel=(100, 200, 300), modules=((), (0,), (1,), (2,)))
    settings = ["stage3_param_persistence_threshold=0", "stage3_max_reuse_distance=0"]
    assert gathered_peak(lay, zero_settings(settings + ["stage3_prefetch_bucket_size=0"])) == 300
    assert gathered_peak(lay, zero_settings(settings + ["stage3_prefetch_bucket_size=1"])) == 600
    assert gathered_peak(lay, zero_settings(settings + ["stage3_prefetch_bucket_size=1",
                                                        "stage3_max_live_parameters=300"])) == 500
    assert gathered_peak(lay, zero_settings(["stage3_param_persistence_threshold=0"])) == 600  # all reused


def test_largest_sub_group_by_hand():
    assert largest_sub_group([10, 10, 10, 10], 2, 10) == 20  # closes when its partitions reach 10 elements
    assert largest_sub_group([10, 30, 5], 2, 10) == 40
    assert largest_sub_group([10, 30, 5], 2, 10**9) == 45


def test_items_by_hand(tiny):
    z = zero_settings(["reduce_bucket_size=1000", "stage3_param_persistence_threshold=100", "sub_group_size=10000",
                       "stage3_max_reuse_distance=0", "stage3_prefetch_bucket_size=0"])
    lora = 500
    items = {i.name: i for i in breakdown(tiny, z, trains_base=True, lora=lora, resident=lora, world=2,
                                          offload_optimizer=True, offload_param=True, weight_bytes=2,
                                          activation_bytes=7, cpu_ranks=True)}
    part = (PARAMS + lora) // 2
    assert {n: i.bytes for n, i in items.items()} == {
        "parameter partitions": 2 * part, "fp32 master partition": 4 * part, "Adam moments": 8 * part,
        "fp32 gradient partition (optimizer)": 4 * part, "gradient accumulation partition": 2 * part,
        "persistent parameters, whole": 2 * (2 * SMALL_PER_LAYER + 64), "MoLF experts, whole": 2 * lora,
        "reduce bucket": 2 * 1000, "gathered parameters (peak)": 2 * EMBED, "largest parameter's gradient": 2 * EMBED,
        # CPU ranks: every weight but the largest module's is gathered once and its heap block kept
        "gathered parameters freed into the heap": 2 * (PARAMS - 2 * SMALL_PER_LAYER - 64 - EMBED),
        "its reduction's copy": max(2 * EMBED, 8 * EMBED // 2), "activations": 7,
        # sub-groups close once their partitions reach 10000 elements: embed + layer 0's attention (10,304), then
        # layer 0's MLP, its two norms and layer 1's q weight (11,328), the largest
        "largest sub-group, whole (fp32)": 4 * (GATE + UP + DOWN + 64 + 64 + Q),
    }
    assert items["Adam moments"].place == "host" and items["reduce bucket"].place == "device"
    kept = sum(i.bytes for i in items.values() if i.phase == "kept")
    training = sum(i.bytes for i in items.values() if i.phase == "training")
    assert peak(list(items.values())) == kept + max(training, items["largest sub-group, whole (fp32)"].bytes)
    host_kept = sum(i.bytes for i in items.values() if i.place == "host" and i.phase == "kept")
    assert peak(list(items.values()), ("host",)) == host_kept + max(
        items["largest sub-group, whole (fp32)"].bytes, items["gathered parameters freed into the heap"].bytes)


def _peak(lay, items: list[str], **kw) -> int:
    options = dict(trains_base=True, lora=0, resident=0, world=2, offload_optimizer=True, offload_param=True,
                   weight_bytes=4, activation_bytes=0, cpu_ranks=False)
    return peak(breakdown(lay, zero_settings(items), **{**options, **kw}))


def test_buckets_move_the_estimate_by_their_bytes(tiny):
    base = ["stage3_param_persistence_threshold=100", "stage3_max_reuse_distance=0", "sub_group_size=1000"]
    assert (_peak(tiny, base + ["reduce_bucket_size=3000"]) - _peak(tiny, base + ["reduce_bucket_size=1000"])
            == 4 * 2000)
    prefetch = [gathered_peak(tiny, zero_settings(base + [f"stage3_prefetch_bucket_size={b}"])) for b in (0, 10**4)]
    assert prefetch[1] > prefetch[0] == EMBED
    moved = _peak(tiny, base + ["stage3_prefetch_bucket_size=1e4"]) - _peak(tiny, base + ["stage3_prefetch_bucket_size=0"])
    assert moved == 4 * (prefetch[1] - prefetch[0])


def test_frozen_base_has_no_large_gradient(tiny):
    items = {i.name: i.bytes for i in breakdown(
        tiny, zero_settings(), trains_base=False, lora=500, resident=0, world=2, offload_optimizer=True,
        offload_param=True, weight_bytes=2, activation_bytes=0, cpu_ranks=True)}
    assert "largest parameter's gradient" not in items and "its reduction's copy" not in items
    assert items["fp32 master partition"] == 4 * 250 and items["parameter partitions"] == 2 * (PARAMS // 2 + 250)


def test_cpu_ranks_count_the_written_bucket(tiny):
    """On CPU ranks the bucket's untouched pages are no memory: the gradients fill at most all trainable elements."""
    options = dict(trains_base=True, lora=0, resident=0, world=2, offload_optimizer=True, offload_param=True,
                   weight_bytes=4, activation_bytes=0)
    z = zero_settings(["reduce_bucket_size=1e9"])
    bucket = {cpu: next(i.bytes for i in breakdown(tiny, z, **options, cpu_ranks=cpu) if i.name == "reduce bucket")
              for cpu in (False, True)}
    assert bucket == {False: 4 * 10**9, True: 4 * PARAMS}


def test_qwen05b_reuse_distance_and_live_parameters():
    """Qwen2.5-0.5B (tied 151936 x 896 embedding): with DeepSpeed's defaults every parameter is gathered before
    backward, and so it is with a reuse distance of 0 while 1e9 live parameters let the prefetch run ahead; with
    5e7 live parameters the embedding stays (it is used again as the head) beside at most 5e7 more plus one."""
    lay = layout(load_config("qwen2.5-0.5b"))
    everything = sum(n for n in lay.numel if n > 100_000)
    assert gathered_peak(lay, zero_settings()) == everything
    assert gathered_peak(lay, zero_settings(["stage3_max_reuse_distance=0"])) == everything
    tight = gathered_peak(lay, zero_settings(["stage3_max_reuse_distance=0", "stage3_max_live_parameters=5e7"]))
    assert max(lay.numel) == 151_936 * 896 < tight <= max(lay.numel) + 5e7 + 896 * 4864
    # on CPU ranks the heap keeps every layer's weights (under 32 MiB in fp32) once gathered: all of them again
    held = gathered_peak(lay, zero_settings(["stage3_max_reuse_distance=0", "stage3_max_live_parameters=5e7"]),
                         held_below=2**23)
    assert held == everything


def test_bad_zero_values_name_the_key():
    with pytest.raises(ValueError, match="--zero reduce_bucket_sz: Extra inputs"):
        zero_settings(["reduce_bucket_sz=5e7"])
    with pytest.raises(ValueError, match="give KEY=VALUE"):
        zero_settings(["reduce_bucket_size"])
    assert zero_settings(["stage3_prefetch_bucket_size=2e7"]).prefetch_bucket_size == 20_000_000


@pytest.mark.slow
def test_breakdown_command_json():
    """The command's JSON: per method the items and the peaks; CPU ranks hold everything in host RAM."""
    common = [sys.executable, "-m", "molf_ds.commands", "estimate-memory", "qwen2.5-0.5b", "--stage", "3",
              "--offload-optimizer", "--offload-param", "--gpus-per-node", "2", "--breakdown", "--seq", "64",
              "--method", "molf", "--zero", "reduce_bucket_size=5e7", "--json"]
    gpu, cpu = (json.loads(subprocess.run(common + extra, check=True, capture_output=True, text=True).stdout)
                for extra in ([], ["--cpu-ranks"]))
    row = gpu["breakdown"][0]
    assert gpu["zero"]["reduce_bucket_size"] == 50_000_000 and row["method"] == "molf"
    host = sum(i["bytes"] for i in row["items"] if i["place"] == "host" and i["phase"] in ("kept", "set-up"))
    assert row["host_bytes"] == PROCESS_BYTES + host and row["device_bytes"] > 0
    assert cpu["breakdown"][0]["device_bytes"] == 0 and cpu["breakdown"][0]["host_bytes"] > row["host_bytes"]
    bad = subprocess.run(common[:-1] + ["--zero", "nope=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--zero nope" in bad.stderr
