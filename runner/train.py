"""The one training loop. It owns the step (`optimizer.step(closure)`, runner/step.py) and a clock that counts
steps and epochs; everything else happens at cadence points on that clock, through callbacks.

What is fast and why:
- data lives on the device (runner/data.py; or is streamed by worker processes, one batch ahead, runner/stream.py);
  a step is an index, a gather, the task's transform and the model;
- metrics accumulate in device tensors and are read only at cadence points: an `.item()` per step would make
  the host wait for the GPU every step. A full-batch task (one step per epoch) therefore sets
  `trainer.eval_every_steps`: records, evaluations and host syncs then happen every N steps, not every epoch;
- on CUDA: bf16 autocast (no loss scaling needed), channels_last, TF32 matmuls, optional torch.compile.

The clock. Training length is `trainer.steps` when set, else `trainer.epochs` epochs. At each step the loop asks
every callback whether it is due (`Cadence`: every N steps, every N epochs, at the end: integer arithmetic, no
sync). When any is due, one record is made: `step`, `epoch` (fractional mid-epoch), train metrics since the last
record, `lr`, `passes`, the due callbacks' metrics (evaluation, and, next, analyses), `time/epoch_s` at epoch
ends (the epoch's training time: its steps only, without the evaluations, analyses, records and checkpoints made
during it; for a full-batch task, one step's cost); it goes to metrics.jsonl and the dashboard. A task may add its
own diagnostics (`task.callbacks`, factories `(cadence) -> Callback`), run with each evaluation. Without
`eval_every_steps` there is a record at every epoch end and an evaluation every `eval_every` epochs (and at the
end). Checkpoints are written at epoch ends (every `checkpoint_every` epochs, or, on the step clock, at the first
epoch end after every `checkpoint_every` records), every `checkpoint_every_steps` steps when set (mid-epoch too:
long epochs of streamed data), and at the end. A run resumed from a mid-epoch checkpoint continues that epoch from
its next batch, exactly (`task.train.epoch(n, first)`, runner/data.py).
A non-finite training loss ends the run as `diverged` at the next record, keeping what was logged.
Progress (runner/heartbeat.py): a bar over the steps on a terminal, else a start line and a heartbeat with the ETA
after 30 s without a record (`trainer.progress`: true, a bar; false, the lines; null, by the terminal).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch

from runner import paramspace
from runner.config import check
from runner.heartbeat import Work
from runner.cluster import SINGLE, Cluster
from runner.optim.bn import FrozenBNStats
from runner.step import StepClosure


#: Sane upper bounds on a run's length: far beyond any real run, far below what overflows a counter or would
#: run for ever (`trainer.epochs=1e21`).
MAX_EPOCHS = 1_000_000
MAX_STEPS = 10_000_000_000


@dataclass
class TrainerConfig:
    """Schema of `conf/trainer/*.yaml`."""
    epochs: Optional[int] = 20
    steps: Optional[int] = None                # when set, the training length in steps (instead of epochs)
    eval_every: int = 1                        # epochs
    eval_every_steps: Optional[int] = None     # when set: record + evaluate every N steps instead of per epoch
    grad_clip: Optional[float] = None
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float32"                     # the weights' and float inputs' dtype: float32 | float64
    channels_last: Optional[bool] = None
    compile: bool = False
    deterministic: bool = False
    progress: Optional[bool] = None
    checkpoint_every: int = 1
    checkpoint_every_steps: Optional[int] = None  # also every N steps, mid-epoch too
    save_best: bool = False
    resume: Optional[str] = None
    devices: int = 1                           # processes, one per device (runner/cluster.py); the global batch is
    sync_bn: bool = False                      # dataset.batch_size; sync_bn: BN over the global batch (CUDA)

    def __post_init__(self):
        check(self.epochs is not None or self.steps is not None, "epochs", self.epochs,
              ">= 1 (or set trainer.steps)")
        check(self.epochs is None or 1 <= self.epochs <= MAX_EPOCHS, "epochs", self.epochs, f"1..{MAX_EPOCHS}")
        check(self.steps is None or 1 <= self.steps <= MAX_STEPS, "steps", self.steps, f"null or 1..{MAX_STEPS}")
        check(self.eval_every >= 1, "eval_every", self.eval_every, ">= 1")
        check(self.eval_every_steps is None or self.eval_every_steps >= 1, "eval_every_steps",
              self.eval_every_steps, "null or >= 1")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "null or > 0")
        check(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:")
                                                          and self.device[5:].isdigit()), "device",
              self.device, "auto, cpu, cuda, cuda:N with N >= 0")
        check(self.precision != "fp16", "precision", self.precision,
              "auto, fp32, bf16: fp16 needs a GradScaler, and a scaler cannot unscale the gradients of the several "
              "passes of SAM-style methods (davda54/sam #55, #97); bf16 needs none")
        check(self.precision in ("auto", "fp32", "bf16"), "precision", self.precision, "auto, fp32, bf16")
        check(self.dtype in ("float32", "float64"), "dtype", self.dtype, "float32, float64")
        check(not (self.dtype == "float64" and self.precision == "bf16"), "precision", self.precision,
              "fp32 or auto with trainer.dtype=float64: bf16 autocast would run the matmuls in bfloat16 and undo "
              "float64 (use trainer.dtype=float32 for bf16)")
        if self.dtype == "float64":
            self.precision = "fp32"  # `auto` would autocast to bf16 on CUDA: float64 means no autocast anywhere
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0")
        check(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1, "checkpoint_every_steps",
              self.checkpoint_every_steps, "null or >= 1")
        check(1 <= self.devices <= 1024, "devices", self.devices, "1..1024")

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch


@dataclass
class Progress:
    """Where training stands; saved in checkpoints so a resumed run continues exactly."""
    epoch: int = 0      # completed epochs
    step: int = 0
    passes: float = 0   # forward+backward passes over a batch
    forward_passes: float = 0  # forward-only passes over a batch (ESAM's ranking, TRAM's reference, MESA's teacher)
    wall_s: float = 0.0
    final: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)  # train-metric sums not yet recorded, at a mid-record checkpoint
    last_step_lr: Optional[float] = None  # the lr the last step took (the schedule's lr after it may be 0)


@dataclass(frozen=True)
class Cadence:
    """When a callback runs: every N steps, every N epochs (at epoch ends), and/or at the end of training."""
    every_steps: Optional[int] = None
    every_epochs: Optional[int] = None
    at_end: bool = True

    def due(self, step: int, epoch: int, epoch_end: bool, final: bool) -> bool:
        return bool((final and self.at_end) or (self.every_steps and step % self.every_steps == 0)
                    or (epoch_end and self.every_epochs and epoch % self.every_epochs == 0))


class Callback:
    """Something done at cadence points: gets the experiment and the progress, returns metrics for the record
    (e.g. `{"test/acc": ...}` or `{"hessian/lambda_max": ...}`). It may sync the host; it must not change the
    training state (weights, BN statistics, optimizer, data order)."""
    cadence: Cadence = Cadence()

    def __call__(self, experiment, progress: Progress) -> dict:
        raise NotImplementedError


class Evaluate(Callback):
    """Metrics of the task over every evaluation split (`val/...`, `test/...`), in eval mode."""

    def __init__(self, cadence: Cadence, net: torch.nn.Module, autocast):
        self.cadence, self.net, self.autocast = cadence, net, autocast

    def __call__(self, experiment, progress: Progress) -> dict:
        out, cluster = {}, experiment.cluster
        cluster.broadcast_buffers(experiment.model)  # rank 0's BN running statistics everywhere (runner/cluster.py)
        for split, batches in experiment.task.evals.items():
            for key, value in evaluate(self.net, batches, experiment.task.metrics, self.autocast, cluster).items():
                out[f"{split}/{key}"] = value
        return out


class Sink(Protocol):
    """Where the loop's results go (runner/run.py writes the run directory and the dashboard)."""
    def record(self, metrics: dict) -> None: ...
    def checkpoint(self) -> None: ...
    def best(self) -> None: ...


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, metrics, autocast, cluster: Cluster = SINGLE) -> dict:
    """The task's metrics over a split (eval mode), with one host sync at the end. With many processes each
    evaluates its part of every batch and the sums are added up over the ranks: the single-device numbers."""
    was_training = model.training
    model.eval()
    sums = metrics.zeros(batches.device)
    for batch in batches:
        batch = cluster.shard(batch)
        with autocast:
            logits = model(batch.x)
        metrics.update(sums, logits, batch.y)
    model.train(was_training)
    return metrics.compute(cluster.sum_(sums), batches.num_samples)


def train(experiment, progress: Progress, sink: Sink, callbacks: Sequence[Callback] = ()) -> str:
    """Train from `progress` to the configured length; returns the status: "completed" or "diverged"."""
    from runner.experiment import rng_state
    cfg, task, device, cluster = experiment.spec.trainer, experiment.task, experiment.device, experiment.cluster
    optimizer, scheduler = experiment.optimizer, experiment.scheduler
    steps_per_epoch = len(task.train)
    total = cfg.total_steps(steps_per_epoch)
    epochs_shown = math.ceil(total / steps_per_epoch)
    autocast = autocast_for(device, cfg.precision)
    net = torch.compile(experiment.model) if cfg.compile else experiment.model
    evaluated = net
    net = cluster.wrap(net, device)  # DistributedDataParallel with many processes (runner/cluster.py)
    params = paramspace.trainable(experiment.model)
    frozen_bn = FrozenBNStats(experiment.model)  # for the passes after the first in multi-pass steps
    zero_grad = lambda: optimizer.zero_grad(set_to_none=True)  # noqa: E731
    per_sample = experiment.capabilities.per_sample_loss
    show = cfg.progress  # None: a bar on a terminal, else a start line and heartbeats (runner/heartbeat.py)
    log_objective = not getattr(experiment.objective, "is_measured_loss", False)

    if cfg.eval_every_steps is not None:   # records on the step clock (full-batch tasks, long epochs)
        train_cadence = eval_cadence = Cadence(every_steps=cfg.eval_every_steps)
    else:                                  # a record per epoch, evaluation every eval_every epochs
        train_cadence, eval_cadence = Cadence(every_epochs=1), Cadence(every_epochs=cfg.eval_every)
    # the task's own diagnostics (e.g. grokking's softmax collapse) run with each evaluation
    callbacks = [Evaluate(eval_cadence, evaluated, autocast),
                 *(make(eval_cadence) for make in task.callbacks), *callbacks]
    if not cluster.is_main:  # the other ranks take part in the evaluation (sharded) only; rank 0 records the rest
        callbacks = callbacks[:1]

    # train metrics since the last record, read at records only; the last entry sums the objective's own value
    # (`train/objective`, logged when the objective is not the reported cross-entropy itself)
    sums = task.metrics.zeros(device) + [torch.zeros((), device=device)]
    seen = records_since_checkpoint = 0
    if progress.pending:                   # resumed from a checkpoint taken between two records
        saved = progress.pending["sums"]
        saved = saved if len(saved) == len(sums) else saved + [math.nan]  # a checkpoint from before train/objective
        if cluster.is_main:                # the saved sums are the ranks' total: counted once, by rank 0
            sums = [torch.tensor(v, dtype=z.dtype, device=device) for v, z in zip(saved, sums)]
        seen, progress.pending = progress.pending["seen"], {}

    def checkpoint() -> None:
        """At an epoch end; the sums since the last record go with it (a sync, but only at a checkpoint taken
        between records, on the step clock), so a resumed run's next record is the uninterrupted run's."""
        total = cluster.sum_([s.clone() for s in sums]) if seen else []
        progress.pending = {"sums": [s.tolist() for s in total], "seen": seen} if seen else {}
        cluster.broadcast_buffers(experiment.model)  # rank 0's BN statistics are the ones saved
        if cluster.distributed:  # every rank's RNG states (dropout draws differ between ranks): resumed exactly
            experiment.rank_rngs = cluster.gather(rng_state(task.train.generator))
        sink.checkpoint()
        progress.pending = {}

    def update(logits, y, objective) -> None:  # the first pass of each step (reads `sums` when called)
        task.metrics.update(sums[:-1], logits, y)
        sums[-1] += objective.float() * len(y)
    mark = time.perf_counter()
    experiment.model.train()
    shape = f"{epochs_shown} epochs of {steps_per_epoch} steps" if steps_per_epoch > 1 else "one step per epoch"
    with Work("training", total, unit="steps", detail=f"({shape})", show=show, done=progress.step) as work:
        while progress.step < total:
            epoch = progress.epoch + 1
            epoch_start, paused = time.perf_counter(), 0.0  # paused: the records' time (evaluations, analyses, ...)
            work.describe(f"epoch {epoch}/{epochs_shown}")
            first = progress.step - progress.epoch * steps_per_epoch  # > 0: resumed from a mid-epoch checkpoint
            for i, batch in enumerate(task.train.epoch(epoch, first), first):
                global_size = batch.size
                batch = cluster.shard(batch)  # this rank's part of the global batch (all of it on one process)
                closure = StepClosure(net, experiment.objective, batch.x, batch.y, autocast=autocast,
                                      frozen_bn=frozen_bn, params=params, zero_grad=zero_grad,
                                      grad_clip=cfg.grad_clip, on_first_pass=update, indices=batch.index,
                                      per_sample=per_sample, cluster=cluster,
                                      weight=cluster.weight(len(batch.y), global_size))
                optimizer.step(closure)
                progress.last_step_lr = float(optimizer.param_groups[0]["lr"])  # before the schedule moves it
                scheduler.step()
                progress.step += 1
                work.update()
                progress.passes += closure.passes
                progress.forward_passes += closure.forward_passes
                seen += global_size
                epoch_end, final = i == steps_per_epoch - 1, progress.step >= total
                if epoch_end:
                    progress.epoch = epoch
                due_train = train_cadence.due(progress.step, progress.epoch, epoch_end, final)
                due = [cb for cb in callbacks if cb.cadence.due(progress.step, progress.epoch, epoch_end, final)]
                records_since_checkpoint += due_train
                if not (due_train or due):
                    if _checkpoint_due(cfg, progress, records_since_checkpoint, epoch_end):
                        checkpoint()
                        records_since_checkpoint = 0
                    continue
                record = {"step": progress.step, "epoch": progress.epoch if epoch_end
                          else round(progress.epoch + (i + 1) / steps_per_epoch, 6)}
                diverged = False
                if due_train and seen:
                    cluster.sum_(sums)  # the ranks' sums added up (one collective)
                    for key, value in task.metrics.compute(sums[:-1], seen).items():   # the record's host sync
                        record[f"train/{key}"] = value
                    if log_objective:
                        record["train/objective"] = sums[-1].item() / seen
                    diverged = not math.isfinite(record["train/loss"])
                    sums, seen = task.metrics.zeros(device) + [torch.zeros_like(sums[-1])], 0
                if device.type == "cuda":  # the steps queued so far are training time (the record syncs anyway)
                    torch.cuda.synchronize(device)
                pause_start = time.perf_counter()
                record.update(lr=scheduler.get_last_lr()[0], passes=progress.passes)
                if not diverged:
                    for callback in due:
                        record.update(callback(experiment, progress))
                now = time.perf_counter()
                if epoch_end:
                    record["time/epoch_s"] = pause_start - epoch_start - paused
                progress.wall_s += now - mark
                mark = now
                improved = _track(progress, record, task, diverged)
                sink.record(record)
                work.touch()
                if diverged:
                    return "diverged"
                if improved and cfg.save_best:
                    sink.best()
                if final:
                    break
                if _checkpoint_due(cfg, progress, records_since_checkpoint, epoch_end):
                    checkpoint()
                    records_since_checkpoint = 0
                paused += time.perf_counter() - pause_start
    checkpoint()
    return "completed"


def _checkpoint_due(cfg: TrainerConfig, progress: Progress, records_since_checkpoint: int, epoch_end: bool) -> bool:
    """Every `checkpoint_every_steps` steps (mid-epoch too: the batch source resumes there), and at an epoch end:
    every `checkpoint_every` epochs, or, on the step clock, once `checkpoint_every` records have passed since the
    last checkpoint (a full-batch run checkpoints with its records, not every step)."""
    if cfg.checkpoint_every_steps and progress.step % cfg.checkpoint_every_steps == 0:
        return True
    if not epoch_end or not cfg.checkpoint_every:
        return False
    if cfg.eval_every_steps is not None:
        return records_since_checkpoint >= cfg.checkpoint_every
    return progress.epoch % cfg.checkpoint_every == 0


def _track(progress: Progress, record: dict, task, diverged: bool) -> bool:
    """Update `final` (the last evaluation) and `best` (of the task's main metric); True when best improved."""
    if diverged:
        progress.final = {k: v for k, v in record.items() if k.startswith("train/")}
        return False
    metric = task.main_metric
    if metric not in record:
        return False
    progress.final = {k: v for k, v in record.items() if "/" in k and not k.startswith("time/")}
    value, best = record[metric], progress.best.get(metric)
    if best is None or (value > best if task.higher_is_better else value < best):
        progress.best = {metric: value, "epoch": record["epoch"], "step": record["step"]}
        return True
    return False
