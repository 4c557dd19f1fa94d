"""The one training loop. It owns the step; every optimizer is driven through `step(closure)`.

What is fast and why:
- data lives on the device (runner/data.py); a step is an index, a gather and the model;
- metrics accumulate in device tensors and are read once per epoch: an `.item()` per step would make the
  host wait for the GPU every step;
- on CUDA: bf16 autocast (no loss scaling needed), channels_last, TF32 matmuls, optional torch.compile.
A multi-pass method (SAM) calls the closure several times per step; BN running statistics are updated by the
first pass only (runner/optim/bn.py) and train metrics are taken from the first pass, at the weights w.
A non-finite training loss ends the run as `diverged` at the end of that epoch, keeping what was logged.
"""
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm import tqdm

from runner import paramspace
from runner.config import check
from runner.data import Data, DeviceBatches
from runner.losses import measured_loss
from runner.optim.bn import FrozenBNStats


@dataclass
class TrainerConfig:
    """Schema of `conf/trainer/*.yaml`."""
    epochs: int = 20
    eval_every: int = 1
    grad_clip: Optional[float] = None
    device: str = "auto"
    precision: str = "auto"
    channels_last: Optional[bool] = None
    compile: bool = False
    deterministic: bool = False
    progress: Optional[bool] = None
    checkpoint_every: int = 1
    resume: Optional[str] = None

    def __post_init__(self):
        check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        check(self.eval_every >= 1, "eval_every", self.eval_every, ">= 1")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "null or > 0")
        check(self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] == "cuda", "device",
              self.device, "auto, cpu, cuda, cuda:N")
        check(self.precision in ("auto", "fp32", "bf16"), "precision", self.precision, "auto, fp32, bf16")
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0")


@dataclass
class Progress:
    """Where training stands; saved in checkpoints so a resumed run continues exactly."""
    epoch: int = 0
    step: int = 0
    passes: int = 0
    wall_s: float = 0.0
    final: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: DeviceBatches, autocast) -> dict:
    """Plain cross-entropy and accuracy over a split (eval mode), with one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=batches.y.device)
    correct = torch.zeros((), device=batches.y.device, dtype=torch.long)
    for x, y in batches:
        with autocast:
            logits = model(x)
        loss_sum += measured_loss(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = batches.num_samples
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}


def train(model, objective, optimizer, scheduler, data: Data, cfg: TrainerConfig,
          device: torch.device, progress: Progress, on_epoch, on_checkpoint) -> str:
    """Train from `progress.epoch` to `cfg.epochs`; returns the status: "completed" or "diverged".

    `on_epoch(record)` receives each epoch's metrics (one dict with step, epoch, train/*, test/*, lr, ...);
    `on_checkpoint()` is called when a checkpoint is due.
    """
    autocast = autocast_for(device, cfg.precision)
    params = paramspace.trainable(model)
    show = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    frozen_bn = FrozenBNStats(model)  # for the passes after the first in multi-pass steps
    model.train()
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)                    # read once per epoch
        correct = torch.zeros((), device=device, dtype=torch.long)
        for x, y in tqdm(data.train, desc=f"epoch {epoch}/{cfg.epochs}", disable=not show, leave=False):
            calls = 0

            def closure():
                nonlocal calls, loss_sum, correct
                optimizer.zero_grad(set_to_none=True)
                with (frozen_bn if calls else contextlib.nullcontext()), autocast:
                    logits = model(x)
                    loss = objective(logits, y)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
                if calls == 0:  # train metrics at w, from the first pass
                    with torch.no_grad():
                        loss_sum += measured_loss(logits.detach(), y, reduction="sum")
                        correct += (logits.detach().argmax(1) == y).sum()
                calls += 1
                return loss

            optimizer.step(closure)
            scheduler.step()
            progress.step += 1
            progress.passes += calls
        n = data.train.num_samples
        train_loss = loss_sum.item() / n                              # the epoch's one host sync
        record = {"step": progress.step, "epoch": epoch, "train/loss": train_loss,
                  "train/acc": correct.item() / n, "lr": scheduler.get_last_lr()[0], "passes": progress.passes}
        diverged = not math.isfinite(train_loss)
        if not diverged and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            for split, batches in data.evals.items():
                for key, value in evaluate(model, batches, autocast).items():
                    record[f"{split}/{key}"] = value
        elapsed = time.perf_counter() - start
        record["time/epoch_s"] = elapsed
        progress.wall_s += elapsed
        progress.epoch = epoch
        if "test/acc" in record:
            progress.final = {k: v for k, v in record.items() if "/" in k and not k.startswith("time/")}
            if not progress.best or record["test/acc"] > progress.best["test/acc"]:
                progress.best = {"test/acc": record["test/acc"], "epoch": epoch}
        if diverged:
            progress.final = {k: v for k, v in record.items() if k.startswith("train/")}
        on_epoch(record)
        if show:
            shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k.startswith(("train/", "test/")))
            tqdm.write(f"epoch {epoch}/{cfg.epochs} {shown}", file=sys.stderr)
        if diverged:
            return "diverged"
        if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 and epoch != cfg.epochs:
            on_checkpoint()
    on_checkpoint()
    return "completed"
