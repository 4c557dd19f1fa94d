"""SAF: Sharpness-Aware training for Free (Du, Zhou, Feng, Tan, Zhou, NeurIPS 2022; code AngusDujw/SAF,
SAF_train.py). MESA, the paper's memory-efficient variant, is runner/optim/mesa.py.

SAF replaces SAM's sharpness term by a trajectory loss: the KL divergence between each training sample's
outputs E epochs ago and now, softened by a temperature tau. Per step, on batch B with logits z_i = f(x_i; w):
    L(w) = CE_B(w) + lam * tau² * (1/|B|) sum_{i in B, active} KL( softmax(z_i^(e - E) / tau) || softmax(z_i / tau) )
    w   <- base_step(w, grad L(w))
    z_i^(e) <- z_i (detached): the memory keeps each sample's last E + 1 outputs (a ring indexed by epoch)
where e is the sample's epoch (how many times it was seen before) and a sample is active once e >= start_epoch
and its output from epoch e - E exists (e >= E). The gradient of the trajectory term w.r.t. z_i is
lam * tau * (softmax(z_i/tau) - softmax(z_i^(e-E)/tau)) / |B|.
Cost: 1 forward+backward pass per step (the objective's extra term rides on the pass: `closure(extra=f)`).
Memory: (E + 1) x N x C float32 (bf16 logits are stored in float32) on the training device (CIFAR-10: 8 MB;
CIFAR-100: 80 MB; ImageNet-1k: 20 GB, which the released code keeps in host memory instead) plus one int64 epoch
counter per sample.

Conventions (the paper's Algorithm 1 as the released code implements it, which we follow):
- tau² and the KL's direction come from the code: F.kl_div(log softmax(z/tau), softmax(stored/tau)) summed over
  classes, averaged over the batch, times tau², times lam ("reinforce"). We could check the paper's text only
  through its abstract here, so the code is the reference for the exact form;
- the stored outputs are the logits of the training forward pass (augmented inputs, train mode), detached;
- the code's epoch is global (`epoch > kl_start_epoch`, slot `epoch % (E + 1)`); ours is each sample's own epoch,
  counted by the memory (the training split is shuffled once per epoch and every sample is seen once per
  epoch, so the two are the same). `start_epoch` = 6 is the code's kl_start_epoch = 5 (`epoch > 5`, 0-based);
  a sample whose output from E epochs ago is missing is inactive (the code would read zeros);
- the code's kl_end_epoch (300, past its runs' end) is not implemented;
- lam 0.3, tau 5, E 3, start 6: the README's and SAF_train.py's values (run.sh uses E = 2 on ImageNet). The
  paper's CIFAR settings could not be checked here;
- weight decay by the base optimizer (the code's SGD); `weight_decay_in_loss` as everywhere (engine).
Ours differs from the code in one more way: the memory is sized lazily, from the largest sample index seen
(it grows exactly to it; one host sync per step to read that index) and the number of classes of the first
batch; it is a tensor in `state_dict`, so a resumed run continues with it (the code loses it on resume).
Without sample indices (a plain torch closure, e.g. a unit test) there is no memory: the step is the base
optimizer's, with a warning. The loop passes them: the optimizer is registered with `sample_indices=True`.
Many devices (`trainer.devices` > 1): every rank keeps the whole memory. Each computes the term for its own
samples, then the step's indices and outputs of all ranks are gathered (`Cluster.gather_rows`, one all-gather of
the indices and one of the logits per step) and every rank stores all of them: the memory is the one process's
with the global batch, whichever device sees a sample in an epoch (tested against one process in
tests/test_distributed.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from runner.cluster import SINGLE, Cluster
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs


def trajectory_kl(target_logits: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Per sample KL( softmax(target/tau) || softmax(logits/tau) ), in float32 at least; target is a constant."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(target_logits.detach().to(dtype) / tau, dim=-1)
    log_q = F.log_softmax(logits.to(dtype) / tau, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class SampleMemory:
    """Per training sample: its epoch (how many times it has been seen) and, with `slots` > 0, its outputs of the
    last `slots` epochs (a ring: epoch e in slot e % slots). Sized lazily from the sample indices it is shown."""

    def __init__(self, slots: int = 0):
        self.slots = slots
        self.epochs: Optional[torch.Tensor] = None    # (N,) int64
        self.outputs: Optional[torch.Tensor] = None   # (slots, N, C), float32 (float64 for a float64 model)

    def ensure(self, indices: torch.Tensor, num_classes: Optional[int] = None,
               dtype: torch.dtype = torch.float32) -> None:
        """Grow to hold sample `indices.max()` (one host sync); outputs of `num_classes` classes in `dtype`."""
        n = int(indices.max()) + 1
        old = 0 if self.epochs is None else len(self.epochs)
        if self.outputs is not None and num_classes is not None and self.outputs.shape[2] != num_classes:
            raise ValueError(f"the memory holds {self.outputs.shape[2]} classes, the logits have {num_classes}")
        if n <= old:
            return
        epochs = torch.zeros(n, dtype=torch.int64, device=indices.device)
        if self.epochs is not None:
            epochs[:old] = self.epochs
        self.epochs = epochs
        if self.slots:
            dtype = dtype if self.outputs is None else self.outputs.dtype
            outputs = torch.zeros(self.slots, n, num_classes, dtype=dtype, device=indices.device)
            if self.outputs is not None:
                outputs[:, :old] = self.outputs
            self.outputs = outputs

    def state(self) -> dict:
        return {k: v for k, v in (("epochs", self.epochs), ("outputs", self.outputs)) if v is not None}

    def load(self, state: dict, device: torch.device) -> None:
        self.epochs = state["epochs"].to(device) if "epochs" in state else None
        self.outputs = state["outputs"].to(device) if "outputs" in state else None


class TrajectoryLoss(PerturbationOptimizer):
    """One pass per step with the loss `closure(extra=self.extra(closure))`, the base step, then `after_step`.
    Subclasses define `extra` (the term's function, or None for a plain step)."""

    needs = "sample indices"

    def __init__(self, params, base, lam: float, tau: float, start_epoch: int, slots: int = 0, **kwargs):
        if lam < 0 or tau <= 0 or start_epoch < 0:
            raise ValueError(f"need lam >= 0, tau > 0, start_epoch >= 0; got {lam}, {tau}, {start_epoch}")
        super().__init__(params, base, {}, **kwargs)
        self.lam, self.tau, self.start_epoch = float(lam), float(tau), int(start_epoch)
        self.memory = SampleMemory(slots)
        self._warned = False

    def extra(self, closure) -> Optional[Callable]:
        """The trajectory term for this step's pass, `f(logits, y, indices)`, or None: SAF (stored outputs) and
        MESA (an EMA teacher) each define it."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after a base step that was taken."""

    def _plain(self, reason: str) -> None:
        if not self._warned:
            warnings.warn(f"{type(self).__name__}: {reason}, so its steps are the base optimizer's (no trajectory "
                          f"loss); the runner's loop provides {self.needs}", stacklevel=3)
            self._warned = True

    def step(self, closure=None):
        closure = self._checked(closure)
        extra = self.extra(closure)
        loss = closure() if extra is None else closure(extra=extra)
        self.after_pass()
        if self.commit():
            self.after_step()
        return loss

    def _weighted(self, kl: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """lam tau² (1/|B|) sum over the active samples of their KL."""
        return self.lam * self.tau ** 2 * torch.where(active, kl, torch.zeros_like(kl)).sum() / len(kl)

    def state_dict(self):
        return {**super().state_dict(), type(self).__name__.lower(): self.own_state()}

    def own_state(self) -> dict:
        return self.memory.state()

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop(type(self).__name__.lower(), None)
        super().load_state_dict(state_dict)
        if own is not None:
            self.load_own_state(own, self.param_groups[0]["params"][0].device)
        else:  # a checkpoint of another optimizer (SGD -> SAF): start afresh from the loaded weights
            self.reset_own_state()

    def load_own_state(self, state: dict, device: torch.device) -> None:
        self.memory.load(state, device)

    def reset_own_state(self) -> None:
        self.memory = SampleMemory(self.memory.slots)


class SAF(TrajectoryLoss):
    """`lam` (coefficient), `tau` (temperature), `epochs_ago` (E), `start_epoch` (first epoch, 0-based, with the
    trajectory loss)."""

    def __init__(self, params, base, lam: float = 0.3, tau: float = 5.0, epochs_ago: int = 3, start_epoch: int = 6,
                 **kwargs):
        if epochs_ago < 1:
            raise ValueError(f"epochs_ago must be >= 1, got {epochs_ago}")
        super().__init__(params, base, lam, tau, start_epoch, slots=epochs_ago + 1, **kwargs)
        self.epochs_ago = int(epochs_ago)

    def extra(self, closure):
        if getattr(closure, "indices", None) is None:
            self._plain("the closure carries no sample indices (a plain torch closure)")
            return None
        cluster = getattr(closure, "cluster", SINGLE)
        return lambda logits, y, indices: self._trajectory(logits, y, indices, cluster)

    def _trajectory(self, logits: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
                    cluster: Cluster = SINGLE) -> torch.Tensor:
        memory, slots = self.memory, self.memory.slots
        everyone = cluster.gather_rows(indices)  # the global batch's samples (this rank's own on one process)
        memory.ensure(everyone, logits.shape[-1], torch.promote_types(logits.dtype, torch.float32))
        epoch = memory.epochs[indices]
        past = memory.outputs[(epoch - self.epochs_ago) % slots, indices]          # the outputs E epochs ago
        active = (epoch >= self.epochs_ago) & (epoch >= self.start_epoch)
        loss = self._weighted(trajectory_kl(past, logits, self.tau), active)
        with torch.no_grad():
            outputs = cluster.gather_rows(logits.detach().to(memory.outputs.dtype))
            memory.outputs[memory.epochs[everyone] % slots, everyone] = outputs  # this epoch's, for every sample
            memory.epochs[everyone] += 1
        return loss


@dataclass
class SAFParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    lam: float = 0.3         # coefficient of the trajectory loss (the code's "reinforce")
    tau: float = 5.0         # temperature of both softmaxes (the loss is scaled by tau²)
    epochs_ago: int = 3      # E: the reference outputs are each sample's from E epochs earlier
    start_epoch: int = 6     # first (0-based) epoch with the trajectory loss
    lr: float = 0.05
    weight_decay: float = 5e-4

    def check(self):
        check(self.lam >= 0, "lam", self.lam, ">= 0")
        check(self.tau > 0, "tau", self.tau, "> 0")
        check(self.epochs_ago >= 1, "epochs_ago", self.epochs_ago, ">= 1")
        check(self.start_epoch >= 0, "start_epoch", self.start_epoch, ">= 0")


@OPTIMIZERS.register("saf", SAFParams, "SAF (Du et al. 2022): trajectory loss against each sample's past outputs",
                     passes_per_step=1, sample_indices=True)
def saf(params, lam, tau, epochs_ago, start_epoch, base, weight_decay_in_loss, skip_nonfinite, **shared):
    return SAF(params, lam=lam, tau=tau, epochs_ago=epochs_ago, start_epoch=start_epoch,
               **engine_kwargs(base, weight_decay_in_loss, skip_nonfinite))
