"""The perturbation-step engine shared by every SAM-style method.

One step, with the loop's closure (runner/step.py) and a base optimizer that takes the actual step:
    g(w)        = closure()                       # first pass; BN running statistics are updated here only
    save w; w  <- w + e(w)                        # e(w) is the only thing a SAM-like method defines (`perturbation`)
    g(w + e(w)) = closure()                       # later passes leave BN running statistics alone
    w  <- saved w (by copy: exact, unlike subtracting e(w))
    w  <- base_step(w, g(w + e(w)))
Cost: 2 forward+backward passes per step. Methods with another shape (more passes, a skipped pass, a subset of
the batch, a combination of gradients) override `step` and build it from the same pieces: `grads`,
`loss_decay`, `perturb`, `restore`, `base_step`, `finite`, `commit`.

Options every method gets (`EngineParams`, one line each in the method's YAML):
- `weight_decay_in_loss` (default false). False: the base optimizer applies weight decay to g(w + e(w)) and the
  perturbation sees the data gradient only (davda54/sam, pytorch_optimizer, most PyTorch code). True: wd/2·||w||²
  is part of the loss, so g(w) + wd·w enters the ascent direction and g(w + e) + wd·(w + e) the descent, the base
  optimizer's own weight decay then being 0 (google-research/sam, the SAM paper's JAX code). The default is false
  because it is what the PyTorch references do (our SAM matches davda54 to 1e-12) and because with AdamW the
  decoupled decay is the point; set true to reproduce the paper's code.
- `skip_nonfinite` (default true): a step whose gradient is not finite in any pass does not update the weights
  (nor the base optimizer's state) and is counted in `skipped_steps` (summary.json), as GSAM's code does. The check
  costs one host sync per step (a GradScaler does the same); false removes it.
- `perturbation_sync` (default local; matters with `trainer.devices` > 1, runner/cluster.py). `local`, the SAM
  paper's definition ("we divide each data batch evenly among the accelerators, independently compute the SAM
  gradient on each accelerator, and average the resulting sub-batch SAM gradients", Foret et al. 2021, sec. 4.1):
  every pass of the step runs apart on each rank (DDP's `no_sync`, forward and backward), so each rank is the
  method on its own part of the batch, and the gradients are averaged over the ranks once, before the base step
  (in SAM's own step the descent pass is averaged by DDP during its backward instead). With N ranks this is the
  method with m-sharpness m = batch / N on one device. `global`: every pass is averaged over the ranks, so the
  ascent uses the global batch's gradient: the single-device method with the global batch, at the cost of one more
  all-reduce per step. With one process both are the same.
- SAM-like methods also take `m` (m-sharpness, Foret et al. Fig. 3, `MSharpness`): the batch is split into chunks of
  m samples; each chunk is perturbed with its own gradient, and the chunks' gradients at their own w + e_c are
  averaged (weighted by size): still 2 passes' worth of compute. With m-sharpness BN running statistics are updated
  by the first chunk's pass at w only.

`state_dict()` is the base optimizer's (momentum etc.) plus `skipped_steps`: the saved weights are scratch, never
checkpointed. The loss returned by `step` is the one at w, as torch's closure protocol expects. Parameter groups
are shared with the base, so lr schedules reach it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from runner import paramspace
from runner.config import Checked, Choice, check

Groups = list[tuple[list[torch.Tensor], dict]]


def together(closure):
    """Passes inside are averaged over the ranks even when the step runs its passes apart (a no-op on one process
or with a plain torch closure)."""
    return closure.together() if hasattr(closure, "together") else contextlib.nullcontext()


@dataclass
class EngineParams(Checked):
    """Schema mixin: the engine's options (see the module docstring)."""
    weight_decay_in_loss: bool = False
    skip_nonfinite: bool = True
    perturbation_sync: str = "local"

    def check(self):
        check(self.perturbation_sync in ("local", "global"), "perturbation_sync", self.perturbation_sync,
              "local (each device perturbs with its own sub-batch's gradient, the SAM paper's) or global (with the "
              "global batch's)")


@dataclass
class MSharpness(Checked):
    """Schema mixin of SAM-like methods: `m` = chunk size of m-sharpness (null: the whole batch)."""
    m: Optional[int] = None

    def check(self):
        check(self.m is None or self.m >= 1, "m", self.m, "null or >= 1")


def engine_kwargs(base: Choice, weight_decay_in_loss: bool, skip_nonfinite: bool, m: Optional[int] = None) -> dict:
    """The engine's constructor arguments from the validated options: with weight decay in the loss, the base
    optimizer is built without its own weight decay and the engine adds wd·w to every pass's gradient."""
    loss_wd = 0.0
    if weight_decay_in_loss and hasattr(base.params, "weight_decay"):
        loss_wd = base.params.weight_decay
        base = Choice(base.entry, dataclasses.replace(base.params, weight_decay=0.0))
    return {"base": base.build, "loss_weight_decay": loss_wd, "skip_nonfinite": skip_nonfinite, "m": m}


class PerturbationOptimizer(torch.optim.Optimizer):
    """Subclasses define `perturbation(groups)`: e(w) per group, from the gradients at w (or override `step`)."""

    def __init__(self, params, base: Callable | type[torch.optim.Optimizer], defaults: dict,
                 loss_weight_decay: float = 0.0, skip_nonfinite: bool = True, m: Optional[int] = None,
                 **base_kwargs):
        """`base`: a factory `base(param_groups) -> Optimizer`, or an optimizer class taking `**base_kwargs`."""
        super().__init__(params, dict(defaults, **base_kwargs))
        self._method_defaults = dict(defaults)  # e.g. rho, adaptive: kept in the shared param groups
        factory = (lambda groups: base(groups, **base_kwargs)) if isinstance(base, type) else base
        self.base_optimizer = factory(self.param_groups)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: lr schedules reach the base
        self.defaults.update(self.base_optimizer.defaults)
        self.loss_weight_decay, self.skip_nonfinite, self.m = loss_weight_decay, skip_nonfinite, m
        self.skipped_steps = 0
        self._saved_w: list[torch.Tensor] | None = None
        self._finite: torch.Tensor | None = None
        self.perturbation_sync = "local"  # set from the config by runner.optim.build_optimizer
        self._closure = None              # this step's loop closure (many devices: it averages the gradients)

    # ------------------------------------------------------------------------------------------- the pieces
    def perturbation(self, groups: Groups) -> list[list[torch.Tensor]]:
        """e(w) for each (params with a gradient, param group), in the same order; grads are g(w)."""
        raise NotImplementedError

    def _groups(self) -> Groups:
        return [([p for p in g["params"] if p.grad is not None], g) for g in self.param_groups]

    def params_with_grad(self) -> list[torch.Tensor]:
        return [p for ps, _ in self._groups() for p in ps]

    def grads(self) -> list[torch.Tensor]:
        """The current gradients (of the parameters that have one), in order."""
        return [p.grad for p in self.params_with_grad()]

    @torch.no_grad()
    def loss_decay(self) -> None:
        """With `weight_decay_in_loss`: grad += wd · w at the current weights (call after every pass)."""
        if self.loss_weight_decay:
            params = self.params_with_grad()
            torch._foreach_add_([p.grad for p in params], params, alpha=self.loss_weight_decay)

    @torch.no_grad()
    def finite(self) -> None:
        """Fold "this pass's gradient is finite" into the step's flag (a device tensor: no sync here)."""
        if self.skip_nonfinite:
            ok = torch.isfinite(paramspace.global_norm(self.grads()))
            self._finite = ok if self._finite is None else self._finite & ok

    def after_pass(self) -> None:
        """What every pass's gradient goes through: weight decay in the loss, then the finiteness check."""
        self.loss_decay()
        self.finite()

    def batch_mean(self, closure, value: torch.Tensor) -> torch.Tensor:
        """A statistic of the batch that is a mean over its samples (TRAM's d): on many devices with
        `perturbation_sync=global`, the global batch's (the ranks' means weighted by their shares); otherwise this
        rank's own."""
        cluster = getattr(closure, "cluster", None)
        if self.perturbation_sync == "global" and cluster is not None and cluster.distributed:
            return cluster.mean(value * closure.weight)
        return value

    @torch.no_grad()
    def perturb(self, e: list[list[torch.Tensor]]) -> None:
        """Save w (first call of a step only), then w <- w + e, e per group as `perturbation` returns it."""
        groups = self._groups()
        params = [p for ps, _ in groups for p in ps]
        if self._saved_w is None or len(self._saved_w) != len(params) or not self._holding:
            self._saved_w = paramspace.snapshot(params, into=self._saved_w if self._saved_w is not None
                                                and len(self._saved_w) == len(params) else None)
            self._holding = True
        for (ps, _), e_w in zip(groups, e):
            if ps:
                torch._foreach_add_(ps, e_w)

    @torch.no_grad()
    def restore(self) -> None:
        """Back to the saved w (exact copy)."""
        if getattr(self, "_holding", False):
            paramspace.restore(self.params_with_grad(), self._saved_w)
            self._holding = False

    @torch.no_grad()
    def ascend(self) -> None:
        """Save w, climb to w + e(w)."""
        self.perturb(self.perturbation(self._groups()))

    @torch.no_grad()
    def base_step(self) -> None:
        self.base_optimizer.step()

    @torch.no_grad()
    def commit(self) -> bool:
        """At the end of a step, with the weights back at w and the final gradient in p.grad: the base step, unless
        a pass was not finite (then nothing changes and the step is counted). One host sync when checking."""
        self.restore()
        finite, self._finite = self._finite, None
        closure, self._closure = self._closure, None
        if closure is not None and closure.cluster.distributed:  # the ranks' gradients averaged, one verdict
            closure.mean_grads()
            finite = None if finite is None else closure.cluster.all_true(finite)
        if finite is not None and not bool(finite):
            self.skipped_steps += 1
            self.base_optimizer.zero_grad(set_to_none=True)
            return False
        self.base_step()
        return True

    def descend(self) -> None:
        """Back to w; step with the current gradient (g(w + e(w)))."""
        self.commit()

    # ------------------------------------------------------------------------------------------- the step
    def step(self, closure=None):
        closure = self._checked(closure)
        if self.m is not None and self.m < len(getattr(closure, "y", ())):
            return self._m_sharpness_step(closure)
        loss = closure()        # g(w)                (perturbation_sync=local: this rank's own)
        self.after_pass()
        self.ascend()           # w + e(w)
        with together(closure):
            closure()           # g(w + e(w))         (averaged over the ranks during backward)
        self.after_pass()
        self.commit()           # w <- base_step(w, g(w + e(w)))
        return loss

    def _m_sharpness_step(self, closure):
        """Each chunk of m samples: its own g_c(w), e_c, g_c(w + e_c); the step uses the size-weighted mean."""
        total, losses, accumulated = len(closure.y), [], None
        for chunk in closure.split(self.m):
            weight = len(chunk.y) / total
            losses.append(chunk().detach() * weight)
            self.after_pass()
            self.ascend()
            chunk()
            self.after_pass()
            self.restore()
            with torch.no_grad():
                grads = [g * weight for g in self.grads()]
                accumulated = grads if accumulated is None else torch._foreach_add(accumulated, grads)
        with torch.no_grad():
            for p, g in zip(self.params_with_grad(), accumulated):
                p.grad.copy_(g)
        self.commit()
        return sum(losses)

    def _checked(self, closure):
        """The closure, able to compute gradients even if `step` is called under torch.no_grad()."""
        if closure is None:
            raise RuntimeError(f"{type(self).__name__} needs a closure: step(closure) where closure zeroes grads, "
                               "runs forward + backward and returns the loss (torch's closure protocol)")
        self._finite = None
        if hasattr(closure, "split"):  # the loop's StepClosure (runner/step.py) enables grad itself
            closure.apart = self.perturbation_sync == "local"
            self._closure = closure
            return closure
        return torch.enable_grad()(closure)

    # ------------------------------------------------------------------------------------------- state
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def state_dict(self):
        return {**self.base_optimizer.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict) -> None:
        """The base optimizer's state; a checkpoint of the plain base optimizer (SGD -> SAM) works too: the
        method's own hyperparameters (rho, ...) then come from this optimizer's config."""
        state_dict = dict(state_dict)
        self.skipped_steps = int(state_dict.pop("skipped_steps", 0))
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key, value in self._method_defaults.items():
                group.setdefault(key, value)
