"""MESA: Memory-Efficient Sharpness-Aware training (Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for
Free", NeurIPS 2022, the paper's second method; code AngusDujw/SAF, MESA_train.py). SAF is runner/optim/saf.py.

MESA is SAF with the stored past outputs replaced by the outputs of a teacher: the exponential moving average
(EMA) of the weights, v. Per step, on batch B:
    t_i = f(x_i; v)                            # teacher forward: no backward, eval mode (see below)
    L(w) = CE_B(w) + lam * tau² * (1/|B|) sum_{i in B, active} KL( softmax(t_i / tau) || softmax(z_i / tau) )
    w <- base_step(w, grad L(w))
    v <- beta v + (1 - beta) w                 # after the step; v starts at the initial weights
where a sample is active from its (0-based) epoch `start_epoch` on (its epoch: how many times it was seen).
Cost: 1 forward+backward pass (`passes_per_step` 1) plus 1 forward without backward (`closure.forward`, counted
apart: summary.json's forward_only_passes = one per step; about a third of a pass in FLOPs, so ~4/3 of SGD's
compute), two copies of the weights and BN buffers into and out of the model around the teacher forward, and
the EMA update. Memory: the EMA weights and buffers, a scratch copy of them, one int64 counter per sample.

Conventions (the released code, which builds the teacher with timm's ModelEmaV2, is the reference):
- the teacher is the EMA of every parameter AND of the floating-point buffers (BN running statistics), as
  ModelEmaV2 averages the whole state dict; it runs in eval mode (ModelEmaV2's copy is in eval mode), so it
  normalizes with its own EMA'd running statistics, has dropout off, and leaves the model's statistics alone;
- beta = 0.9998 (timm's and the code's default; run.sh does not change it), lam 0.8 (README, run.sh), tau 5,
  start_epoch 6 = the code's kl_start_epoch 5 (`epoch > 5`); the paper's CIFAR settings could not be checked
  here. The code's KL form and tau² factor, as for SAF (runner/optim/saf.py);
- v <- beta v + (1 - beta) w after every step that was taken (a step skipped for a non-finite gradient leaves v
  alone; ModelEmaV2 would still average); integer buffers (BN's batch counter) are not averaged;
- the code computes the teacher's outputs every step, also before kl_start_epoch; so do we (a constant cost);
- the EMA weights and buffers and the epoch counters are tensors in `state_dict`: a resumed run continues with the
  same teacher. The code's epoch is global, ours per sample (the same: each sample is seen once per epoch).
The teacher forward needs the model: the runner's loop closure (`closure.model`, `closure.forward`) and
sample indices (registered with `sample_indices=True`). With a plain torch closure the step is the base
optimizer's, with a warning.
Many devices (`trainer.devices` > 1): the epoch counters are counted for the global batch on every rank (the step's
indices gathered, `Cluster.gather_rows`), as SAF's memory; the EMA weights are the same on every rank (so are the
weights). The teacher's BN statistics follow each rank's own model buffers, as the model's do without
`trainer.sync_bn` (the same on every rank with it; a checkpoint keeps rank 0's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from runner import paramspace
from runner.cluster import SINGLE
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, engine_kwargs
from runner.optim.saf import TrajectoryLoss, trajectory_kl


class MESA(TrajectoryLoss):
    """`lam` (coefficient), `tau` (temperature), `decay` (beta of the EMA), `start_epoch` (first epoch, 0-based,
    with the trajectory loss)."""

    needs = "the model (closure.forward) and the sample indices"

    def __init__(self, params, base, lam: float = 0.8, tau: float = 5.0, decay: float = 0.9998, start_epoch: int = 6,
                 **kwargs):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        super().__init__(params, base, lam, tau, start_epoch, **kwargs)
        self.decay = float(decay)
        self.ema = [p.detach().clone() for p in self._trainable()]    # v: the teacher's weights
        self.ema_buffers: Optional[list[torch.Tensor]] = None        # the teacher's BN statistics, from the model
        self._scratch: Optional[list[torch.Tensor]] = None
        self._model: Optional[torch.nn.Module] = None

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    @staticmethod
    def _buffers(model: torch.nn.Module) -> list[torch.Tensor]:
        return [b for b in model.buffers() if b.is_floating_point()]

    @torch.no_grad()
    def teacher_logits(self, closure) -> torch.Tensor:
        """f(x; v) in eval mode, with the EMA weights and buffers swapped into the model and back (exact copies)."""
        model, params = closure.model, self._trainable()
        buffers = self._buffers(model)
        if self.ema_buffers is None:
            self.ema_buffers = [b.detach().clone() for b in buffers]
        live = params + buffers
        self._scratch = paramspace.snapshot(live, into=self._scratch if self._scratch is not None
                                            and len(self._scratch) == len(live) else None)
        was_training = model.training
        try:
            torch._foreach_copy_(live, self.ema + self.ema_buffers)
            model.eval()
            logits = closure.forward()        # no backward, the loop's autocast; counted as a forward-only pass
            return logits.to(torch.promote_types(logits.dtype, torch.float32))
        finally:
            model.train(was_training)
            paramspace.restore(live, self._scratch)

    def extra(self, closure):
        if getattr(closure, "indices", None) is None or not hasattr(closure, "forward"):
            self._plain("the closure carries no model or sample indices (a plain torch closure)")
            return None
        self._model = closure.model
        teacher = self.teacher_logits(closure)
        cluster = getattr(closure, "cluster", SINGLE)

        def trajectory(logits: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            everyone = cluster.gather_rows(indices)  # the global batch's samples
            self.memory.ensure(everyone)
            active = self.memory.epochs[indices] >= self.start_epoch
            with torch.no_grad():
                self.memory.epochs[everyone] += 1
            return self._weighted(trajectory_kl(teacher, logits, self.tau), active)
        return trajectory

    @torch.no_grad()
    def after_step(self) -> None:
        """v <- beta v + (1 - beta) w, for the weights and (when a model was seen) its floating-point buffers."""
        if self._model is None:
            return  # plain steps (no teacher): the EMA follows the weights of the steps with a teacher only
        torch._foreach_lerp_(self.ema, self._trainable(), 1 - self.decay)
        if self.ema_buffers:
            torch._foreach_lerp_(self.ema_buffers, self._buffers(self._model), 1 - self.decay)

    def own_state(self) -> dict:
        state = {**self.memory.state(), "ema": self.ema}
        if self.ema_buffers is not None:
            state["ema_buffers"] = self.ema_buffers
        return state

    def reset_own_state(self) -> None:
        """The teacher starts at the current weights (the runner loads the model before the optimizer)."""
        super().reset_own_state()
        self.ema = [p.detach().clone() for p in self._trainable()]
        self.ema_buffers = None

    def load_own_state(self, state: dict, device: torch.device) -> None:
        self.memory.load(state, device)
        self.ema = [v.to(device) for v in state["ema"]]
        self.ema_buffers = [v.to(device) for v in state["ema_buffers"]] if "ema_buffers" in state else None


@dataclass
class MESAParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    lam: float = 0.8         # coefficient of the trajectory loss (the code's "reinforce")
    tau: float = 5.0         # temperature of both softmaxes (the loss is scaled by tau²)
    decay: float = 0.9998    # beta: v <- beta v + (1 - beta) w after every step
    start_epoch: int = 6     # first (0-based) epoch with the trajectory loss
    lr: float = 0.05
    weight_decay: float = 5e-4

    def check(self):
        check(self.lam >= 0, "lam", self.lam, ">= 0")
        check(self.tau > 0, "tau", self.tau, "> 0")
        check(0 <= self.decay < 1, "decay", self.decay, "[0, 1)")
        check(self.start_epoch >= 0, "start_epoch", self.start_epoch, ">= 0")


@OPTIMIZERS.register("mesa", MESAParams, "MESA (Du et al. 2022): trajectory loss against an EMA teacher's outputs",
                     passes_per_step=1, sample_indices=True)
def mesa(params, lam, tau, decay, start_epoch, base, weight_decay_in_loss, skip_nonfinite, **shared):
    return MESA(params, lam=lam, tau=tau, decay=decay, start_epoch=start_epoch,
                **engine_kwargs(base, weight_decay_in_loss, skip_nonfinite))
