"""What each rank does: build a cell's engine, train it for warm-up + measured steps, time every phase, count
collectives, read memory, then time plain AdamW steps on the optimizer's own flat tensor sizes (`run_cells`);
or train cells of one mode in the same ranks, step by step in turn, for their step times (`run_interleaved`).

Results go to OUT/cell-K.rank-R.json, one file per (cell, rank); `report.py` merges the ranks."""
from __future__ import annotations

import contextlib
import gc
import json
import resource
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from molf_ds.commands.methods import MOLF_WRAPPED
from molf_ds.distributed import init_distributed

from . import models
from .collectives import count_collectives
from .methods import Settings, build_engine, ds_config, optimizer_name, trainable_params

Cell = tuple[int, bool, str]  # (ZeRO stage, optimizer offload, method)


def cell_name(cell: Cell) -> str:
    stage, offload, method = cell
    return f"zero{stage}{'+offload' if offload else ''}/{method}"


class _Clock:
    """Wall time with the device synchronised, so that GPU work is inside the interval that launched it."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def cpu_seconds() -> float:
    """CPU time of this process (all its threads): unlike wall time, blind to other processes that share the
    cores, which on a loaded machine is the steadier measure of the work a step does."""
    return time.process_time()


class _OptimizerTimer:
    """Seconds spent in the basic optimizer (every step() call of one engine step, and MoLF's deferred routing
    under ZeRO-3), i.e. the optimizer's own work on its flat tensors, without DeepSpeed's around it."""

    def __init__(self, optimizer: Any, clock: _Clock) -> None:
        self.seconds = 0.0
        self.cpu = 0.0
        self._depth = 0
        self._clock = clock
        for name in ("step", "finish_routing"):
            if hasattr(optimizer, name):
                setattr(optimizer, name, self._timed(getattr(optimizer, name)))

    def _timed(self, fn: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start, cpu = (self._clock(), cpu_seconds()) if self._depth == 1 else (0.0, 0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += self._clock() - start
                    self.cpu += cpu_seconds() - cpu

        return call

    def take(self) -> tuple[float, float]:
        taken = self.seconds, self.cpu
        self.seconds = self.cpu = 0.0
        return taken


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _huge_page_bytes() -> int:
    """Anonymous memory of this process on transparent huge pages (0 where the kernel does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("AnonHugePages:")), 0)
    except OSError:
        return 0


def _flat_groups(engine: Any) -> list[tuple[int, torch.Tensor]]:
    """(param group, flat tensor) for every tensor the basic optimizer steps: DeepSpeed's fp32 partitions under
    ZeRO-1/2 and ZeRO-3 (one per sub-group), the trainable parameters (or their fp32 copies) otherwise."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    wrapper, basic = engine.optimizer, engine.basic_optimizer
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        return [(g, flat) for g, flat in enumerate(wrapper.single_partition_of_fp32_groups)]
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        return [(wrapper.sub_group_to_group_id[i], flat) for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat)]
    return [(g, p) for g, group in enumerate(basic.param_groups) for p in group["params"] if p.requires_grad]


def optimizer_bytes(engine: Any) -> int:
    """Bytes the basic optimizer read and wrote in its last step (fp32 states): AdamW 28 per element (grad, m, v,
    p read; m, v, p written); MoLF 20 per element of its moments+scores pass (grad, m, v read; m, v written),
    12 more where that pass also updates (p read and written, backup written), 16 per element of its winners'
    update (m, v, p read; p written), 8 per element restored from the backup, 28 per plain AdamW element."""
    optimizer = engine.basic_optimizer
    counts = getattr(optimizer, "last_step_elements", None)
    if counts is not None:
        return int(20 * counts["moments"] + 12 * counts["speculative"] + 16 * counts["update"]  # update: a device
                   + 8 * counts["restore"] + 28 * counts["adamw"])  # tensor on the Triton path (this syncs)
    return 28 * sum(flat.numel() for _, flat in _flat_groups(engine))


class _CacheFlush:
    """Evicts the CPU caches (writes a buffer as large as the last-level cache): a step on partitions of a real
    model finds its tensors in DRAM, not in cache, and every optimizer here is timed that way."""

    def __init__(self, device: str) -> None:
        self.buffer = None
        if device == "cpu":
            try:
                size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
                nbytes = int(size.rstrip("K")) * 1024 if size.endswith("K") else int(size)
            except (OSError, ValueError):
                nbytes = 64 * 2**20
            self.buffer = torch.empty(min(nbytes, 512 * 2**20) // 4)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.fill_(1.0)


def _isolated_steppers(engine: Any, repeats: int) -> dict[str, Callable[[], None]]:
    """One optimizer step over the engine's own flat tensors (its basic optimizer, as DeepSpeed calls it), and
    the best plain AdamW steps of this machine on fresh tensors of the same sizes and groups."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    basic = engine.basic_optimizer
    flats = _flat_groups(engine)
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(flat.numel(), generator=gen) * 1e-3).to(flat.device).view_as(flat) for _, flat in flats]
    zero3 = isinstance(engine.optimizer, DeepSpeedZeroOptimizer_Stage3)
    grouped = getattr(basic, "grouped_step", None)

    def own() -> None:
        for (_, flat), grad in zip(flats, grads):
            flat.grad = grad
        with grouped() if grouped else _nothing():
            if zero3:  # one sub-group at a time, as DeepSpeed's stage3 _optimizer_step does
                for g, flat in flats:
                    basic.param_groups[g]["params"] = [flat]
                    basic.step()
                    basic.param_groups[g]["params"] = []
                if getattr(getattr(basic, "router", None), "deferred", False):
                    basic.finish_routing()
            else:
                basic.step()

    def fresh() -> list[torch.nn.Parameter]:
        out = []
        for (_, flat), grad in zip(flats, grads):
            p = torch.nn.Parameter(flat.detach().clone().view(-1))
            p.grad = grad.view(-1)
            out.append(p)
        return out

    steppers: dict[str, Callable[[], None]] = {"own": own}
    device = flats[0][1].device if flats else torch.device("cpu")
    makers: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "torch_adamw_fused": lambda: torch.optim.AdamW(fresh(), lr=1e-4, weight_decay=0.01, fused=True)}
    if device.type == "cpu":
        makers["deepspeed_cpu_adam"] = lambda: DeepSpeedCPUAdam(fresh(), lr=1e-4, weight_decay=0.01)
    else:
        makers["deepspeed_fused_adam"] = lambda: FusedAdam(fresh(), lr=1e-4, weight_decay=0.01)
    for name, make in makers.items():
        try:
            steppers[name] = make().step
        except Exception as error:  # e.g. an op that does not build on this machine
            print(f"bench: reference {name} unavailable: {type(error).__name__}: {error}")
    return steppers


@contextlib.contextmanager
def _nothing():
    yield


def isolated_optimizer_steps(engine: Any, repeats: int, device: str) -> dict[str, Any]:
    """Median time of the engine's own optimizer step and of the AdamW references on the same flat tensors,
    interleaved step by step (a change of load hits them alike), caches flushed and ranks aligned before each."""
    import deepspeed.comm as dist

    steppers = _isolated_steppers(engine, repeats)
    flats = _flat_groups(engine)
    flush = _CacheFlush(flats[0][1].device.type if flats else device)  # offload: CPU tensors on a GPU machine
    clock = _Clock(device)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    cpu: dict[str, list[float]] = {name: [] for name in steppers}
    own_bytes = []
    for i in range(repeats + 2):  # two warm-up rounds: lazy optimizer state
        for name, step in steppers.items():
            flush()
            dist.barrier()
            start, start_cpu = clock(), cpu_seconds()
            step()
            elapsed, elapsed_cpu = clock() - start, cpu_seconds() - start_cpu
            if i >= 2:
                times[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
                if name == "own":
                    own_bytes.append(optimizer_bytes(engine))
    elements = sum(flat.numel() for _, flat in flats)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    nbytes = {name: (statistics.median(own_bytes) if name == "own" else 28 * elements) for name in seconds}
    return {"seconds": seconds, "min_seconds": {name: min(ts) for name, ts in times.items()},
            "cpu_seconds": {name: statistics.median(ts) for name, ts in cpu.items()}, "bytes": nbytes,
            "elements": elements}


def _routing_shares(engine: Any) -> dict[str, float] | None:
    optimizer = engine.basic_optimizer
    if getattr(optimizer, "last_winners", None) is None:
        return None
    return optimizer.routing_shares()


class _Trainer:
    """One cell's engine, trained step by step: each step timed (phases, CPU time), its collectives counted."""

    def __init__(self, cell: Cell, s: Settings, rank: int) -> None:
        stage, offload, method = cell
        self.cell, self.s, self.rank = cell, s, rank
        self.clock = _Clock(s.device)
        with _construction(s, stage, offload):
            model = models.build(s.model, s.seed, torch.float32, s.gguf_file)
        if s.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.vocab = model.config.vocab_size
        start = self.clock()
        self.engine = build_engine(method, model, s, stage, offload)
        self.setup_s = self.clock() - start
        self.timer = _OptimizerTimer(self.engine.basic_optimizer, self.clock)
        self.steps: list[dict[str, Any]] = []
        self.shares: list[dict[str, float]] = []

    def step(self, step: int) -> None:
        """Training step number `step` (the same tokens for every cell); recorded after the warm-up steps."""
        import deepspeed.comm as dist

        engine, clock = self.engine, self.clock
        ids = models.token_batch(step, self.rank, self.s.micro_batch, self.s.seq, self.vocab).to(engine.device)
        dist.barrier()  # every rank starts the step together (outside the counted and timed region)
        with count_collectives() as calls:
            t0, c0 = clock(), cpu_seconds()
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            t1, c1 = clock(), cpu_seconds()
            in_backward = len(calls)
            engine.step()
            t2, c2 = clock(), cpu_seconds()
        opt_s, opt_cpu = self.timer.take()
        if step < self.s.warmup:
            return
        self.steps.append({
            "step_s": t2 - t0, "forward_backward_s": t1 - t0, "engine_step_s": t2 - t1, "optimizer_s": opt_s,
            "step_cpu_s": c2 - c0, "engine_step_cpu_s": c2 - c1, "optimizer_cpu_s": opt_cpu,
            "collectives": len(calls), "collective_bytes": calls.total_bytes,
            "step_collectives": [list(c) for c in calls.since(in_backward)],
            "optimizer_bytes": optimizer_bytes(engine), "loss": float(loss.detach().float()),
        })
        if self.cell[2] in MOLF_WRAPPED and (r := _routing_shares(engine)) is not None:
            self.shares.append(r)

    def timings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.steps}
        if self.shares:
            out["routing_shares"] = {e: statistics.fmean(r[e] for r in self.shares) for e in self.shares[0]}
        return out


def _construction(s: Settings, stage: int, offload: bool) -> contextlib.AbstractContextManager:
    """With parameter offload the model is built partitioned (deepspeed.zero.Init), as a model too large for one
    rank must be: no rank ever holds all of it."""
    if stage == 3 and offload and s.offload_param:
        import deepspeed

        return deepspeed.zero.Init(config_dict_or_path=ds_config(s, stage, offload))
    return contextlib.nullcontext()


def _identity(cell: Cell, rank: int, world: int) -> dict[str, Any]:
    stage, offload, method = cell
    return {"cell": cell_name(cell), "stage": stage, "offload": offload, "method": method, "rank": rank, "world": world}


def _error(cell: Cell, rank: int, world: int, error: Exception) -> dict[str, Any]:
    return {**_identity(cell, rank, world), "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()}


def measure(cell: Cell, s: Settings, rank: int, world: int) -> dict[str, Any]:
    """One cell alone in its ranks: training steps, peak memory, then the isolated optimizer steps."""
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_start = _rss_bytes()
    trainer = _Trainer(cell, s, rank)
    built = {"peak_rss_built_bytes": _peak_rss_bytes(), "rss_built_bytes": _rss_bytes()}  # model and engine built
    for step in range(s.warmup + s.steps):
        trainer.step(step)
    engine = trainer.engine
    result: dict[str, Any] = {
        **_identity(cell, rank, world), **trainer.timings(),
        "optimizer": optimizer_name(engine), "trainable_params": trainable_params(engine),
        "flat_tensors": [flat.numel() for _, flat in _flat_groups(engine)], "setup_s": trainer.setup_s,
        "tokens_per_step": world * s.micro_batch * s.seq,
        "peak_rss_bytes": _peak_rss_bytes(), "rss_start_bytes": rss_start, "rss_end_bytes": _rss_bytes(), **built,
        "huge_page_bytes": _huge_page_bytes(),
    }
    if s.device == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    if s.reference_repeats > 0:  # after every training measurement: it moves the engine's weights
        result["isolated"] = isolated_optimizer_steps(engine, s.reference_repeats, s.device)
        if cell[2] in MOLF_WRAPPED and (r := _routing_shares(engine)) is not None:
            result["isolated"]["routing_shares"] = r
    return result


def run_interleaved(rank: int, world: int, cells: list[Cell], settings: dict[str, Any], out: str) -> None:
    """The entry point of each spawned rank for the timing of cells of one mode (a baseline and the methods
    measured against it): their engines in the same ranks, trained step by step in turn (the order rotates each
    step, so that no method always follows the same one). A change of the machine's speed then hits them alike,
    which separate runs minutes apart do not ensure.
    Writes OUT/cell-K.rank-R.json with each cell's step records."""
    s = Settings(**settings)
    init_distributed(device=s.device)  # spawn's environment: this rank's LOCAL_RANK device
    trainers: dict[int, _Trainer] = {}
    for k, cell in enumerate(cells):
        try:
            trainers[k] = _Trainer(cell, s, rank)
        except Exception as error:
            _write(out, k, rank, _error(cell, rank, world, error))
    for step in range(s.warmup + s.steps):
        order = sorted(trainers)
        shift = step % max(1, len(order))
        for k in order[shift:] + order[:shift]:
            try:
                trainers[k].step(step)
            except Exception as error:
                _write(out, k, rank, _error(cells[k], rank, world, error))
                del trainers[k]
    for k, trainer in trainers.items():
        _write(out, k, rank, {**_identity(cells[k], rank, world), **trainer.timings()})


def _write(out: str, k: int, rank: int, result: dict[str, Any]) -> None:
    Path(out, f"cell-{k}.rank-{rank}.json").write_text(json.dumps(result))


def run_cells(rank: int, world: int, cells: list[Cell], settings: dict[str, Any], out: str, progress: bool) -> None:
    """The entry point of each spawned rank: measure `cells` one after the other, write one JSON per cell."""
    s = Settings(**settings)
    init_distributed(device=s.device)  # spawn's environment: this rank's LOCAL_RANK device
    bar = None
    if progress and rank == 0 and len(cells) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(cells), desc="bench", unit="cell")
    for k, cell in enumerate(cells):
        if bar is not None:
            bar.set_postfix_str(cell_name(cell))
        try:
            result = measure(cell, s, rank, world)
        except Exception as error:  # one unsupported cell must not lose the others
            result = _error(cell, rank, world, error)
        _write(out, k, rank, result)
        if bar is not None:
            bar.update()
        gc.collect()
    if bar is not None:
        bar.close()
