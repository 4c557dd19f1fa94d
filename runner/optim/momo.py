"""MoMo and MoMo-Adam: Momentum Models for Adaptive Learning Rates (Schaipp, Ohana, Eickenberg, Defazio, Gower,
ICML 2024). Reference implementation followed: the authors' code, fabian-sp/MoMo (momo/momo.py, momo/momo_adam.py,
the release whose step takes `closure` or `loss`), checked against the paper's algorithms.

Both need the value of the batch loss: `step(closure)` calls the loop's closure once (1 forward+backward pass) and
uses the loss it returns, f_k, and the gradients it leaves, g_k. Written for step k = 1, 2, ... at weights x_k:

MoMo (SGD with momentum, `optimizer=momo`), beta = momentum of the model:
    d_k  = beta d_{k-1}  + (1 - beta) g_k            (averaged gradient: the step direction)
    fb_k = beta fb_{k-1} + (1 - beta) f_k            (averaged loss)
    gm_k = beta gm_{k-1} + (1 - beta) <g_k, x_k>     (averaged <g, x>, one per parameter tensor, summed)
    h_k  = fb_k + <d_k, x_k> - gm_k                  (the averaged linearizations of the past losses, at x_k)
    tau_k = min( lr / rho_k,  [(1 + lr wd)(fb_k - rho_k lb) + <d_k, x_k> - (1 + lr wd) gm_k]_+ / ||d_k||^2 )
    x_{k+1} = (x_k - tau_k d_k) / (1 + lr wd)
  that is x_{k+1} = argmin_y max(model_k(y), lb) + wd/2 ||y||^2 + 1/(2 lr) ||y - x_k||^2, the model being the
  average of the linearizations f_j + <g_j, y - x_j>. Without weight decay tau_k = min(lr, (h_k - lb)_+/||d_k||^2):
  a Polyak step on the momentum model, capped by lr (the paper's alpha_k; schedules scale it).
  Averages, `bias_correction` false (the code's default): d, fb, gm start at the first step's values
  (d_1 = g_1, ...) and rho_k = 1. True: they start at 0 and rho_k = 1 - beta^k.

MoMo-Adam (`optimizer=momo_adam`), betas = (beta1, beta2):
    d_k, fb_k, gm_k as above with beta1, starting at 0;  v_k = beta2 v_{k-1} + (1 - beta2) g_k^2
    D_k = sqrt(v_k / (1 - beta2^k)) + eps            (Adam's preconditioner, eps outside the square root)
    tau_k = min( lr / rho_k,  [(1 + lr wd)(fb_k - rho_k lb) + <d_k, x_k> - (1 + lr wd) gm_k]_+ / ||d_k||^2_{D_k^-1} ),
            rho_k = 1 - beta1^k
    x_{k+1} = (x_k - tau_k D_k^-1 d_k) / (1 + lr wd)           (`divide` true: the proximal step, the default)
    x_{k+1} = (1 - lr wd) x_k - tau_k D_k^-1 d_k                (`divide` false: the code's AdamW-style option)

Weight decay (both, as the paper and code): wd/2 ||x||^2 is part of the model's proximal step, hence the division
by (1 + lr wd) and the (1 + lr wd) factors in tau; it is neither torch's coupled L2 nor AdamW's decoupled decay.
The objective (not the decay) must be bounded below by `lb` (default 0: the paper's choice for every experiment,
right for cross-entropy and any non-negative objective; it is the objective the closure returns, e.g. a smoothed
or otherwise modified loss, not the reported cross-entropy). `use_fstar` estimates lb online (the paper's MoMo*),
never below the configured lb, exactly as the code does.

Defaults (the code's and the README's recommendations): MoMo lr 1.0, beta 0.9, wd 0; MoMo-Adam lr 1e-2,
betas (0.9, 0.999), eps 1e-8, wd 0; lb 0.

Differences from the reference code (none changes the update when every parameter has a gradient every step):
- everything stays on the device (no `.item()`, so no host sync per step); the code's `max(., 0)` / `min(., .)` on
  host floats become clamp / minimum; a zero ||d_k|| gives tau = lr / rho_k (what the code's `min` returns for a
  nan or inf quotient), the step then moves only by the decay;
- parameters without a gradient are skipped (not decayed, not in the sums); their averages start at their first
  gradient (the code's MoMo indexes every parameter at step 1; MoMo-Adam uses each tensor's own step count for
  D_k in the sums but the global one in the update: here each tensor's own count in both);
- the <g, x> averages are kept in the parameter's dtype (the code keeps MoMo-Adam's in float32);
- the averaged loss, the lower bound and the step count are in `state_dict()` (the code keeps them as attributes,
  so a resumed run restarts them).
With several parameter groups the sums run over all groups and each group steps with its own lr and wd (as the
code); MoMo's beta is one for the optimizer, MoMo-Adam's loss average uses the last group's beta1 (as the code).

Not a base for the SAM-family wrappers (nor for any wrapper that steps its base as `base.step()`, with neither
closure nor loss): MoMo raises a RuntimeError on the wrapper's first step (see `_loss`); validation cannot refuse
it yet, for the registry has no capability saying "needs the loss". (MoMo of the SAM objective would be
coherent, f = L(w + e) with gradient g(w + e), but needs the engine to hand the base the last pass's loss:
`step(loss=...)` is accepted for that, as in the code.)

`summary_stats()` (summary.json's `optimizer_stats`): the mean step size tau over the run, the fraction of steps at
the lr / rho cap, the last tau (and the last lb with `use_fstar`), for the first parameter group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from runner.config import check
from runner.optim import ADAPTIVE, OPTIMIZERS, no_threshold
from runner.optim.params import LR, Betas, Eps, WeightDecay


def _loss(optimizer: torch.optim.Optimizer, closure, loss) -> torch.Tensor:
    """The batch loss of this step: `closure()` (gradients enabled) or the given `loss` tensor, exactly one."""
    name = type(optimizer).__name__
    if closure is None and loss is None:
        raise RuntimeError(
            f"{name} needs the loss value: step(closure) with a closure that zeroes grads, runs forward + backward "
            "and returns the loss (the loop does this), or step(loss=loss) after backward. A wrapper that steps "
            f"its base as base.step() (the SAM family) gives neither, so {name} cannot be a wrapper's base optimizer")
    if closure is not None and loss is not None:
        raise RuntimeError(f"{name}.step: pass the closure or the loss, not both")
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if not isinstance(loss, torch.Tensor):
        loss = torch.tensor(float(loss))
    return loss.detach()


class _ModelBased(torch.optim.Optimizer):
    """What MoMo and MoMo-Adam share: the global state (step count, averaged loss, lower bound, step-size stats),
    kept in `state_dict()`."""

    def __init__(self, params, defaults: dict, lb: float, use_fstar: bool):
        if not math.isfinite(lb):
            raise ValueError(f"lb must be finite, got {lb}")
        super().__init__(params, defaults)
        self.initial_lb, self.use_fstar = float(lb), use_fstar
        self.steps = 0
        self.loss_avg: Optional[torch.Tensor] = None
        self.lb: float | torch.Tensor = float(lb)
        self.last_step_size: Optional[torch.Tensor] = None  # tau of the last step (first group), on the device
        self._tau_sum: Optional[torch.Tensor] = None
        self._capped: Optional[torch.Tensor] = None

    def _params(self, group: dict) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    def _step_size(self, nom: torch.Tensor, norm: torch.Tensor, cap: float) -> torch.Tensor:
        """tau = min(cap, nom_+ / norm); cap when norm is 0."""
        quotient = torch.clamp(nom, min=0) / norm
        return torch.where(norm > 0, torch.clamp(quotient, max=cap), torch.full_like(quotient, cap))

    def _fstar_reset(self, scale: float, loss_avg, dot, gamma, rho: float) -> None:
        """MoMo*: if the model's value is below the current lb, lower lb to half of it (not below the initial lb)."""
        level = scale * loss_avg + dot - scale * gamma
        lb = torch.as_tensor(self.lb, dtype=level.dtype, device=level.device)
        lb = torch.where(level < scale * rho * lb, level / (2 * scale * rho), lb)
        self.lb = torch.clamp(lb, min=self.initial_lb)

    def _fstar_update(self, loss_avg, dot, gamma, tau, norm, rho: float) -> None:
        """MoMo*: lb <- (h_k - tau ||d||^2 / 2) / rho, not below the initial lb."""
        h = loss_avg + dot - gamma
        self.lb = torch.clamp((h - 0.5 * tau * norm) / rho, min=self.initial_lb)

    def _record(self, tau: torch.Tensor, cap: float) -> None:
        tau = tau.detach()
        self.last_step_size = tau
        capped = (tau >= cap).to(tau.dtype)
        self._tau_sum = tau.clone() if self._tau_sum is None else self._tau_sum + tau
        self._capped = capped if self._capped is None else self._capped + capped

    def summary_stats(self) -> dict:
        """Over the run so far (first parameter group): mean step size, fraction of steps at the lr cap, last tau."""
        if not self.steps or self._tau_sum is None:
            return {}
        stats = {"step_size_mean": float(self._tau_sum) / self.steps,
                 "step_size_capped_fraction": float(self._capped) / self.steps,
                 "step_size_last": float(self.last_step_size)}
        if self.use_fstar:
            stats["lb"] = float(self.lb)
        return stats

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self):
        state = super().state_dict()
        state["model_based"] = {"steps": self.steps, "loss_avg": self.loss_avg, "lb": self.lb,
                                "tau_sum": self._tau_sum, "capped": self._capped, "last": self.last_step_size}
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("model_based", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        to = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
        self.steps = int(extra["steps"])
        self.loss_avg, self.lb = to(extra["loss_avg"]), to(extra["lb"])
        self._tau_sum, self._capped, self.last_step_size = to(extra["tau_sum"]), to(extra["capped"]), to(extra["last"])


class Momo(_ModelBased):
    def __init__(self, params, lr: float = 1.0, weight_decay: float = 0.0, beta: float = 0.9, lb: float = 0.0,
                 bias_correction: bool = False, use_fstar: bool = False):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), lb, use_fstar)
        self.beta, self.bias_correction = beta, bias_correction

    @torch.no_grad()
    def step(self, closure=None, loss=None):
        loss = _loss(self, closure, loss)
        self.steps += 1
        beta = self.beta
        if self.loss_avg is None:
            self.loss_avg = torch.zeros_like(loss) if self.bias_correction else loss.clone()
        self.loss_avg = beta * self.loss_avg + (1 - beta) * loss
        rho = 1 - beta ** self.steps if self.bias_correction else 1.0

        dot = gamma = norm = 0.0                                   # <d, x>, gm, ||d||^2 over every tensor
        for group in self.param_groups:
            for p in self._params(group):
                grad, state = p.grad, self.state[p]
                if not state:
                    if self.bias_correction:
                        state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["grad_dot_w"] = torch.zeros((), dtype=p.dtype, device=p.device)
                    else:
                        state["grad_avg"] = grad.clone(memory_format=torch.preserve_format)
                        state["grad_dot_w"] = torch.sum(p * grad)
                grad_avg, grad_dot_w = state["grad_avg"], state["grad_dot_w"]
                grad_avg.mul_(beta).add_(grad, alpha=1 - beta)
                grad_dot_w.mul_(beta).add_(torch.sum(p * grad), alpha=1 - beta)
                dot = dot + torch.sum(p * grad_avg)
                gamma = gamma + grad_dot_w
                norm = norm + torch.sum(grad_avg * grad_avg)
        if isinstance(norm, float):                                # no parameter has a gradient
            return loss

        for index, group in enumerate(self.param_groups):
            lr, wd = group["lr"], group["weight_decay"]
            scale = 1 + lr * wd
            if self.use_fstar:
                self._fstar_reset(scale, self.loss_avg, dot, gamma, rho)
            nom = scale * (self.loss_avg - rho * self.lb) + dot - scale * gamma
            tau = self._step_size(nom, norm, lr / rho)
            if self.use_fstar:
                self._fstar_update(self.loss_avg, dot, gamma, tau, norm, rho)
            if index == 0:
                self._record(tau, lr / rho)
            for p in self._params(group):
                p.sub_(tau * self.state[p]["grad_avg"])
                if wd > 0:
                    p.div_(scale)
        return loss


class MomoAdam(_ModelBased):
    def __init__(self, params, lr: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 lb: float = 0.0, divide: bool = True, use_fstar: bool = False):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), lb, use_fstar)
        self.divide = divide

    @staticmethod
    def _preconditioner(state: dict, beta2: float, eps: float) -> torch.Tensor:
        """D = sqrt(v / (1 - beta2^t)) + eps, t the tensor's own step count."""
        return (state["grad_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(eps)

    @torch.no_grad()
    def step(self, closure=None, loss=None):
        loss = _loss(self, closure, loss)
        self.steps += 1
        dot = gamma = norm = 0.0                                   # <d, x>, gm, ||d||^2_{D^-1}
        beta1 = None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in self._params(group):
                grad, state = p.grad, self.state[p]
                if not state:
                    state["step"] = 0
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["grad_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["grad_dot_w"] = torch.zeros((), dtype=p.dtype, device=p.device)
                state["step"] += 1
                grad_avg, grad_dot_w = state["grad_avg"], state["grad_dot_w"]
                grad_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                state["grad_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                grad_dot_w.mul_(beta1).add_(torch.sum(p * grad), alpha=1 - beta1)
                d = self._preconditioner(state, beta2, group["eps"])
                dot = dot + torch.sum(p * grad_avg)
                gamma = gamma + grad_dot_w
                norm = norm + torch.sum(grad_avg * grad_avg / d)
        if self.loss_avg is None:
            self.loss_avg = torch.zeros_like(loss)
        self.loss_avg = (1 - beta1) * loss + beta1 * self.loss_avg   # the last group's beta1, as the code
        if isinstance(norm, float):                                # no parameter has a gradient
            return loss

        for index, group in enumerate(self.param_groups):
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            rho = 1 - beta1 ** self.steps
            scale = 1 + lr * wd
            if self.use_fstar:
                self._fstar_reset(scale, self.loss_avg, dot, gamma, rho)
            nom = scale * (self.loss_avg - rho * self.lb) + dot - scale * gamma
            tau = self._step_size(nom, norm, lr / rho)
            if self.use_fstar:
                self._fstar_update(self.loss_avg, dot, gamma, tau, norm, rho)
            if index == 0:
                self._record(tau, lr / rho)
            for p in self._params(group):
                state = self.state[p]
                if wd > 0 and not self.divide:
                    p.mul_(1 - lr * wd)
                p.sub_(tau * state["grad_avg"] / self._preconditioner(state, beta2, eps))
                if wd > 0 and self.divide:
                    p.div_(scale)
        return loss


def _check_lb(self):
    check(math.isfinite(self.lb), "lb", self.lb, "a finite lower bound of the training objective")


@dataclass
class MomoParams(WeightDecay, LR):
    lr: float = 1.0                # the step-size cap alpha_k (schedules scale it); the code's recommendation
    beta: float = 0.9              # momentum of the averaged model (d, f, <g, x>)
    lb: float = 0.0                # lower bound of the training objective
    bias_correction: bool = False  # averages start at 0 with 1 - beta^k corrections (false: at the first values)
    use_fstar: bool = False        # estimate the lower bound online (MoMo*), never below lb

    def check(self):
        check(0 <= self.beta < 1, "beta", self.beta, "[0, 1)")
        _check_lb(self)


@dataclass
class MomoAdamParams(Eps, Betas, WeightDecay, LR):
    lr: float = 1e-2               # the step-size cap alpha_k (schedules scale it); the code's recommendation
    lb: float = 0.0                # lower bound of the training objective
    divide: bool = True            # weight decay as the proximal step (false: the code's AdamW-style (1 - lr wd))
    use_fstar: bool = False        # estimate the lower bound online (MoMo*), never below lb

    def check(self):
        _check_lb(self)


@OPTIMIZERS.register("momo", MomoParams, "MoMo (Schaipp et al. 2024): SGD-momentum with a model-based adaptive "
                     "step size (needs the loss value)", passes_per_step=1, needs_loss=True,
                     stability=no_threshold("its Polyak-type step size tau_k <= lr adapts to the loss, so lr is "
                                            "only a cap on the step"))
def momo(params, lr, weight_decay, beta, lb, bias_correction, use_fstar) -> torch.optim.Optimizer:
    return Momo(params, lr=lr, weight_decay=weight_decay, beta=beta, lb=lb, bias_correction=bias_correction,
                use_fstar=use_fstar)


@OPTIMIZERS.register("momo_adam", MomoAdamParams, "MoMo-Adam (Schaipp et al. 2024): Adam with a model-based "
                     "adaptive step size (needs the loss value)", passes_per_step=1, needs_loss=True,
                     stability=no_threshold(ADAPTIVE))
def momo_adam(params, lr, weight_decay, betas, eps, lb, divide, use_fstar) -> torch.optim.Optimizer:
    return MomoAdam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lb=lb, divide=divide,
                    use_fstar=use_fstar)
