"""The training job: model, data, DeepSpeed engine, the loop, logs, checkpoints, evaluation, outputs.

Runs on every rank; ranks come from the launcher's environment (deepspeed, torchrun, mpirun, accelerate),
or it is a single process. Every optimizer step reseeds torch from (seed, step, rank), and the data order is
a function of (seed, epoch), so a resumed run continues exactly as the uninterrupted one would.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import transformers
import yaml

from molf_ds.distributed import init_distributed

from ..methods import lone_expert
from ..models import resolve
from ..plot_routing import plot as plot_routing
from ..run_dir import CHECKPOINTS, CONFIG, EVAL, LOGS, METRICS, ROUTING, ROUTING_PNG
from . import checkpoints
from .config import ModelSection, TrainConfig, check_packing
from .data import Collator, DataError, load_task, pack, pad_id, tokenize
from .evaluate import evaluate
from .methods import Trainee, build
from .outputs import routing_summary, save_final
from .tracking import Trackers

WATCH_STEPS = 100


def run(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; returns the output directory. The process group (started here unless there is one)
    stays for the caller: DeepSpeed keeps its groups for the rest of the process."""
    init_distributed(cfg.train.collective_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines drown the progress bar
    transformers.utils.logging.disable_progress_bar()
    t = cfg.train
    out = Path(t.output_dir)
    tokenizer = _load_tokenizer(cfg.model)
    with _rank_zero_first(rank):  # datasets' cache is written once
        task = load_task(cfg.data, cfg.eval)
    features, dropped = tokenize(task.train, tokenizer, cfg.data.max_length)
    if dropped:
        _say(f"{dropped} of {len(task.train)} training examples dropped: no completion token fits in "
             f"data.max_length={cfg.data.max_length}")
    if cfg.data.packing:
        rows, features = len(features), pack(features, cfg.data.max_length)
        _say(f"data.packing: {rows} rows in {len(features)} sequences of at most {cfg.data.max_length} tokens")
    order = Order(len(features), cfg.deepspeed["train_micro_batch_size_per_gpu"], world,
                  cfg.deepspeed["gradient_accumulation_steps"], t.seed)
    total = t.max_steps or t.epochs * order.steps_per_epoch
    resume = checkpoints.find_resume(t.resume, out / CHECKPOINTS)
    start = resume.step if resume else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.set_aside(out, start, LOGS)
        (out / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dist.barrier()

    if resume and resume.universal:  # another world size or ZeRO stage: DeepSpeed reshards on load
        cfg.deepspeed["checkpoint"] = {**(cfg.deepspeed.get("checkpoint") or {}), "load_universal": True}
    torch.manual_seed(t.seed)  # LoRA experts start the same on every rank and in every run
    model = _load_model(cfg.model, cfg.deepspeed)
    if cfg.data.packing:  # the implementation transformers picked when model.attn_implementation is unset
        check_packing(model.config._attn_implementation)
    trainee = build(cfg, model, total, out / ROUTING)
    if resume:
        trainee.load_checkpoint(resume.directory, resume.tag)
        _say(f"resumed from {resume.directory / resume.tag} at step {start}")
    trackers = Trackers(t.report_to, t.logging_steps, out, cfg.to_dict(), start)  # rank 0 opens them when it writes
    evaluator = Evaluator(cfg, trainee, tokenizer, task, out / EVAL, trackers)
    if cfg.eval.before_training and start == 0:
        evaluator(0, "before training")
    best = _best(cfg, task.metrics, out, rank) if t.load_best_model_at_end else None
    Loop(cfg, trainee, features, order, pad_id(tokenizer), out, evaluator, best, trackers).train(start, total)
    scores = evaluator(total, "after training")
    trackers.close()
    if best is not None and not best.offer(total, scores) and best.step is not None:
        trainee.load_checkpoint(out / CHECKPOINTS, checkpoints.tag_of(best.step))
        _say(f"final/ is the best evaluated model: step {best.step} ({best.metric} {best.value:.3f})")
    written = save_final(trainee, tokenizer, out)
    trainee.close()
    if rank == 0 and trainee.is_molf:
        try:
            written.append(plot_routing(out / ROUTING, out / ROUTING_PNG))
        except (FileNotFoundError, ValueError) as error:  # no step logged: molf.log_every > the steps run
            _say(f"{ROUTING_PNG} not drawn: {error}")
        if summary := routing_summary(out / METRICS):
            _say(summary)
    logs = [out / name for name in (METRICS, ROUTING, EVAL) if (out / name).exists()]
    _say(f"outputs in {out}/: " + ", ".join(str(p.relative_to(out)) for p in written + logs)
         + (f", {CHECKPOINTS}/" if (out / CHECKPOINTS).is_dir() else ""))
    return out


class Order:
    """Which examples each rank trains on at each micro-batch: a seeded permutation per epoch, cut into
    global micro-batches of micro x world examples (the remainder of an epoch is dropped)."""

    def __init__(self, n: int, micro: int, world: int, accumulation: int, seed: int) -> None:
        self.n, self.micro, self.world, self.seed = n, micro, world, seed
        self.steps_per_epoch = n // (micro * world) // accumulation
        if self.steps_per_epoch < 1:
            raise DataError(f"data: {n} training examples are fewer than one global batch ({micro} micro-batch "
                             f"x {world} ranks x {accumulation} accumulation steps)")
        self.micro_per_epoch = self.steps_per_epoch * accumulation
        self._epoch, self._perm = -1, torch.empty(0)

    def indices(self, k: int, rank: int) -> list[int]:
        """Examples of micro-batch `k` (counted over the whole run) on `rank`."""
        epoch, i = divmod(k, self.micro_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = (i * self.world + rank) * self.micro
        return self._perm[start:start + self.micro].tolist()


class Loop:
    def __init__(self, cfg: TrainConfig, trainee: Trainee, features: list[dict], order: Order, pad: int,
                 out: Path, evaluator: Evaluator | None = None, best: checkpoints.Best | None = None,
                 trackers: Trackers | None = None) -> None:
        self.cfg, self.trainee, self.features, self.order, self.out = cfg, trainee, features, order, out
        self.evaluator, self.best = evaluator, best  # eval.steps; train.load_best_model_at_end
        self.trackers = trackers
        self.collate = Collator(pad)
        self.engine = trainee.engine
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.accumulation = cfg.deepspeed["gradient_accumulation_steps"]
        self.watch = RoutingWatch()

    def train(self, start: int, total: int) -> None:
        from tqdm.auto import tqdm

        seed = self.cfg.train.seed
        metrics = open(self.out / METRICS, "a", encoding="utf-8") if self.rank == 0 else None
        bar = tqdm(total=total, initial=start, disable=self.rank != 0, desc="train", dynamic_ncols=True)
        self.engine.train()
        try:
            for step in range(start + 1, total + 1):
                torch.manual_seed((seed * 1_000_003 + step) * 1_009 + self.rank)  # dropout: same on resume
                record = self.step(step)
                if step == start + 1 and (backend := self.trainee.kernel_backend()):
                    _say(f"optimizer kernels: {backend}")
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if self.trackers:
                    self.trackers.step(step, record, self.engine.get_global_grad_norm())
                bar.update(1)
                bar.set_postfix(self._postfix(record), refresh=False)
                warning = self.watch.add(record.get("routing"))
                if warning and self.rank == 0:
                    bar.write(warning)
                self.evaluate_and_save(step, total)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()

    def step(self, step: int) -> dict[str, Any]:
        began = time.perf_counter()
        lr = self.engine.get_lr()[0]  # this step's lr (DeepSpeed steps the schedule inside engine.step)
        sums = torch.zeros(2, dtype=torch.float64)  # loss over micro-batches, tokens
        for a in range(self.accumulation):
            k = (step - 1) * self.accumulation + a
            features = [self.features[i] for i in self.order.indices(k, self.rank)]
            batch = {key: value.to(self.engine.device) for key, value in self.collate(features).items()}
            loss = self.engine(**batch, use_cache=False).loss
            self._check_finite(loss, step, a, k)
            self.engine.backward(loss)
            if a == self.accumulation - 1:
                self.trainee.before_step(step)
            self.engine.step()
            sums += torch.tensor([loss.item(), sum(len(f["input_ids"]) for f in features)], dtype=torch.float64)
        reduced = sums.to(self.engine.device)
        dist.all_reduce(reduced)
        loss_sum, tokens = reduced.tolist()
        record = {
            "step": step,
            "epoch": round(step / self.order.steps_per_epoch, 4),
            "loss": loss_sum / (self.accumulation * self.world),
            "lr": lr,
            "tokens_per_s": tokens / (time.perf_counter() - began),
        }
        if not self.engine.was_step_applied():  # fp16 overflow / inf-NaN gradients: DeepSpeed skipped the update
            record["skipped"] = True
            _say(f"step {step}: gradient overflow (inf/NaN), update skipped"
                 + (f", loss scale now {self.engine.optimizer.cur_scale:g}"
                    if hasattr(self.engine.optimizer, "cur_scale") else ""))
            return record
        record.update(self.trainee.routing_shares() or {})
        return record

    def _check_finite(self, loss: torch.Tensor, step: int, micro: int, k: int) -> None:
        """A non-finite loss (bad data, or a model the data drove to inf) stops the run before its backward:
        every rank learns which ranks saw it, and the error names the step, micro-batch and examples."""
        bad = torch.zeros(self.world, dtype=torch.float64)
        bad[self.rank] = float(not torch.isfinite(loss.detach()).all().item())
        on_device = bad.to(self.engine.device)
        dist.all_reduce(on_device)
        ranks = [r for r, flag in enumerate(on_device.tolist()) if flag]
        if ranks:
            where = "; ".join(f"rank {r}: examples {self.order.indices(k, r)}" for r in ranks)
            raise DataError(f"non-finite loss at optimizer step {step}, micro-batch {micro} (global micro-batch "
                            f"{k}), {where} (indices into the tokenized training set); not trained on: the run "
                            "stops here, the last complete checkpoint is intact")

    def evaluate_and_save(self, step: int, total: int) -> None:
        """Every eval.steps steps (the last step's evaluation is run()'s), evaluate; save every train.save_steps
        steps and, under train.load_best_model_at_end, at each new best."""
        t, every = self.cfg.train, self.cfg.eval.steps
        new_best = False
        if every and step % every == 0 and step < total and self.evaluator is not None:
            scores = self.evaluator(step, "during training")
            new_best = self.best is not None and self.best.offer(step, scores)
        if new_best or (t.save_steps and step % t.save_steps == 0):
            self.save(step)

    def save(self, step: int) -> None:
        checkpoint = checkpoints.Checkpoint(self.out / CHECKPOINTS, checkpoints.tag_of(step), step)
        if self.rank == 0:
            checkpoints.unmark(checkpoint)
        dist.barrier()
        try:
            self.trainee.save_checkpoint(checkpoint.directory, checkpoint.tag, {"step": step})
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
            raise checkpoints.save_error(checkpoint, self.rank, error) from error
        dist.barrier()  # every rank's files are written
        if self.rank == 0:
            checkpoints.mark(checkpoint)
            if self.cfg.train.save_total_limit:  # only now that a newer one is complete
                keep = self.best.step if self.best is not None else None
                checkpoints.retain(checkpoint.directory, self.cfg.train.save_total_limit, keep)

    @staticmethod
    def _postfix(record: dict[str, Any]) -> dict[str, str]:
        postfix = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if "full" in record.get("routing", {}):
            postfix["full"] = f"{record['routing']['full']:.0%}"
        return postfix


class RoutingWatch:
    """Warns once when one expert took more than DEGENERATE of the routing decisions over the last WATCH_STEPS
    steps."""

    def __init__(self) -> None:
        self.recent: collections.deque[dict[str, float]] = collections.deque(maxlen=WATCH_STEPS)
        self.warned = False

    def add(self, shares: dict[str, float] | None) -> str | None:
        if shares is None or self.warned:
            return None
        self.recent.append(shares)
        if len(self.recent) < WATCH_STEPS:
            return None
        totals = {e: sum(s[e] for s in self.recent) for e in shares}
        expert = lone_expert(totals)
        if expert is not None:
            share = totals[expert] / sum(totals.values())
            self.warned = True
            return (f"warning: MoLF is effectively running as '{expert}' alone ({share:.1%} of the routing "
                    f"decisions over the last {WATCH_STEPS} steps); to shift it, change the full/LoRA lr ratio "
                    "(train.lr / train.lora_lr), the LoRA alphas (molf.lora_alphas) or rsLoRA (molf.use_rslora)")
        return None


class Evaluator:
    def __init__(self, cfg: TrainConfig, trainee: Trainee, tokenizer: Any, task: Any, path: Path,
                 trackers: Trackers | None = None) -> None:
        self.cfg, self.trainee, self.tokenizer, self.task, self.path = cfg, trainee, tokenizer, task, path
        self.trackers = trackers

    def __call__(self, step: int, when: str) -> dict[str, float] | None:
        if not self.task.evals:
            return None
        e = self.cfg.eval
        engine = self.trainee.engine
        scores = evaluate(engine.module, self.tokenizer, self.task.evals, self.task.metrics, e.batch_size,
                          e.max_new_tokens, engine.device)
        if dist.get_rank() == 0:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps({"step": step, **scores}) + "\n")
        if self.trackers:
            self.trackers.eval(step, scores)
        _say(f"eval {when} (step {step}): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores


def _best(cfg: TrainConfig, metrics: tuple[str, ...], out: Path, rank: int) -> checkpoints.Best:
    """The best-model tracker, on resume from rank 0's eval.jsonl (the same on every rank)."""
    metric = cfg.eval.metric or metrics[0]
    state = [checkpoints.Best.resumed(metric, out / EVAL, out / CHECKPOINTS) if rank == 0 else None]
    dist.broadcast_object_list(state, src=0)
    return state[0]


def _zero_stage(ds: dict[str, Any]) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def _say(message: str) -> None:
    """A notice, on rank 0's stderr: a command's stdout carries its result alone."""
    if dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _rank_zero_first(rank: int) -> Iterator[None]:
    if rank != 0:
        dist.barrier()
    yield
    if rank == 0:
        dist.barrier()


def _load_tokenizer(m: ModelSection) -> Any:
    from transformers import AutoTokenizer

    if m.tokenizer:
        return AutoTokenizer.from_pretrained(resolve(m.tokenizer))
    return AutoTokenizer.from_pretrained(resolve(m.name_or_path), **_gguf(m))


def _gguf(m: ModelSection) -> dict[str, str]:
    return {"gguf_file": m.gguf_file} if m.gguf_file else {}


_HF_DS_CONFIG: list[Any] = []  # transformers holds it by weak reference: keep it alive for the whole run


def _load_model(m: ModelSection, ds: dict[str, Any]) -> torch.nn.Module:
    """Under ZeRO-3 the model is built partitioned (transformers' ZeRO-3 loading through HfDeepSpeedConfig),
    and generate() then keeps the ranks' forward passes in step (synced_gpus)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    _HF_DS_CONFIG.clear()
    if _zero_stage(ds) == 3:
        _HF_DS_CONFIG.append(HfDeepSpeedConfig(ds))

    kwargs: dict[str, Any] = {"dtype": getattr(torch, m.dtype), **_gguf(m)}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(resolve(m.name_or_path), **kwargs)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model
