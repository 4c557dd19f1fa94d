"""SAM: Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021); ASAM (Kwon et al., ICML 2021).

Update, per step with gradient g(w) of the batch loss L (runner/optim/perturbation.py does the rest):
    e(w) = rho * T² g / ||T g||,  T = I (SAM) or diag(|w| + eta) (ASAM)
    w   <- base_step(w, g(w + e(w)))
Cost: 2 forward+backward passes per step (also with m-sharpness: m chunks of the batch, 2 passes each).

Two ASAM conventions, both here:
- `optimizer=sam optimizer.adaptive=true` (davda54/sam): every parameter, biases and BN included, with T = |w|
  (eta = 0); rho as given (davda54 suggests 2.0 for ASAM);
- `optimizer=asam` (the ASAM paper's code, SamsungLabs/ASAM): T = |w| + eta for parameters whose name contains
  "weight" (linear and conv weights, and BN scales), T = 1 for the others (biases, BN shifts); rho 0.5, eta 0.01
  (the paper's CIFAR settings). The norm ||T g|| is over all parameters in both.
SAM conventions (davda54/sam, the reference PyTorch port): the gradient norm is over all parameters of all groups;
epsilon 1e-12 is added to the norm, not inside it; weight decay by the base optimizer unless
`weight_decay_in_loss=true` (google-research/sam); BN running statistics from the first pass only (runner/step.py).
"""
from dataclasses import dataclass

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, MSharpness, PerturbationOptimizer, engine_kwargs


class SAM(PerturbationOptimizer):
    """`adaptive`: ASAM; `eta`: ASAM's T = |w| + eta; `weights_only`: T only for parameters named "*weight*"
    (needs `set_parameter_names`), T = 1 for the others."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, eta: float = 0.0,
                 weights_only: bool = False, **kwargs):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive, eta=eta), **kwargs)
        self.weights_only = weights_only
        self._scaled: set[int] | None = None  # ids of the parameters ASAM scales (None: all)

    def set_parameter_names(self, names: dict[int, str]) -> None:
        """id(parameter) -> its name in the model (called by the experiment's build); used by `weights_only`."""
        if self.weights_only:
            self._scaled = {pid for pid, name in names.items() if "weight" in name}

    def _t(self, ps: list[torch.Tensor], group: dict) -> list[torch.Tensor] | None:
        """T per tensor (None: identity), for the parameters `ps` of one group."""
        if not group["adaptive"] or not ps:
            return None
        t = torch._foreach_add(torch._foreach_abs(ps), group["eta"]) if group["eta"] else torch._foreach_abs(ps)
        if self._scaled is not None:
            t = [ti if id(p) in self._scaled else torch.ones_like(p) for ti, p in zip(t, ps)]
        return t

    def perturbation(self, groups):
        scales = [self._t(ps, g) for ps, g in groups]
        scaled = []                                                             # T g
        for (ps, _), t in zip(groups, scales):
            grads = [p.grad for p in ps]
            scaled += torch._foreach_mul(t, grads) if t is not None else grads
        norm = paramspace.global_norm(scaled)                                   # ||T g||
        e = []
        for (ps, g), t in zip(groups, scales):
            if not ps:
                e.append([])
                continue
            grads = [p.grad for p in ps]
            e_w = torch._foreach_mul(torch._foreach_mul(t, t), grads) if t is not None else grads  # T² g
            e.append(torch._foreach_mul(e_w, g["rho"] / (norm + 1e-12)))       # rho T² g / ||T g||
        return e


@dataclass
class SAMParams(Wraps, EngineParams, MSharpness, Betas, Nesterov, Momentum, WeightDecay, LR):
    rho: float = 0.05        # radius of the perturbation ball
    adaptive: bool = False   # ASAM, davda54's convention: T = |w| for every parameter
    lr: float = 0.05
    weight_decay: float = 5e-4

    def check(self):
        check(self.rho >= 0, "rho", self.rho, ">= 0")


@OPTIMIZERS.register("sam", SAMParams, "SAM (Foret et al. 2021) / ASAM over any base optimizer", passes_per_step=2)
def sam(params, rho, adaptive, base, weight_decay_in_loss, skip_nonfinite, m, **shared) -> torch.optim.Optimizer:
    """`base` is the validated base optimizer (a Choice); `shared` were handed to it during validation."""
    return SAM(params, rho=rho, adaptive=adaptive, **_engine(base, weight_decay_in_loss, skip_nonfinite, m))


def _engine(base, weight_decay_in_loss, skip_nonfinite, m) -> dict:
    kwargs = engine_kwargs(base, weight_decay_in_loss, skip_nonfinite, m)
    kwargs["base_optimizer"] = kwargs.pop("base")
    return kwargs


@dataclass
class ASAMParams(SAMParams):
    rho: float = 0.5         # the ASAM paper's CIFAR radius
    eta: float = 0.01        # T = |w| + eta

    def check(self):
        check(self.eta >= 0, "eta", self.eta, ">= 0")


@OPTIMIZERS.register("asam", ASAMParams, "ASAM (Kwon et al. 2021) as in the paper's code: weights only, T = |w| + eta",
                     passes_per_step=2)
def asam(params, rho, adaptive, eta, base, weight_decay_in_loss, skip_nonfinite, m, **shared):
    return SAM(params, rho=rho, adaptive=True, eta=eta, weights_only=True,
               **_engine(base, weight_decay_in_loss, skip_nonfinite, m))
