"""FriendlySAM (F-SAM): Friendly Sharpness-Aware Minimization (Li, Zhou, He, Cheng, Huang; CVPR 2024).

SAM's perturbation direction, the batch gradient g_t, is split into a full-gradient component, estimated by an
exponential moving average m of past batch gradients, and the batch-specific noise g_t - m. The full-gradient part
is the "unfriendly" one (it hurts generalization), so F-SAM perturbs along the rest:
    d_t = g_t - sigma m_{t-1}                     (d_1 = g_1: the first step is SAM's)
    m_t = lmbda m_{t-1} + (1 - lmbda) g_t         (m_1 = g_1)
    e   = rho d_t / (||d_t|| + 1e-12)
    w  <- base_step(w, g(w + e))
Cost: 2 forward+backward passes per step, plus one parameter-sized buffer (m). No m-sharpness: m is an estimate of
the full gradient across steps, and per-chunk perturbations would fold m chunks into it per step.

Conventions: as the official code (nblt/F-SAM, utils.py) and pytorch_optimizer.FriendlySAM: d uses the EMA before it
absorbs g_t (m_{t-1}), and the EMA starts at the first gradient. Subtracting the updated m_t instead gives the same
direction when sigma = 1 (g - m_t = lmbda (g - m_{t-1})), the setting the paper uses. The norm is over all
parameters of all groups (the reference's); sigma and lmbda may differ per group. m follows the gradient the
perturbation sees: the data gradient with weight decay in the base optimizer (the default, the official code's),
g + wd·w with `weight_decay_in_loss=true`. A non-finite first-pass gradient does not enter m (the step is skipped
and counted by the engine; m keeps its value, a device-side select, no extra host sync); a step skipped for its
second pass still folds its finite g_t into m. The EMA is checkpointed: `state_dict()["friendly_sam_ema"]` maps each
parameter's index (in param_groups order) to its m; a checkpoint without it (SGD, SAM) starts m afresh.
The update is the references' (pytorch_optimizer matches to float32 norm precision); ours adds the non-finite
handling, the checkpointed EMA (the official code saves the model only) and leaves out `adaptive`.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs

EMA_KEY = "friendly_sam_ema"


class FriendlySAM(PerturbationOptimizer):
    def __init__(self, params, base, rho: float = 0.1, sigma: float = 1.0, lmbda: float = 0.95, **kwargs):
        if rho < 0 or sigma < 0 or not 0 <= lmbda < 1:
            raise ValueError(f"need rho >= 0, sigma >= 0, 0 <= lmbda < 1; got {rho}, {sigma}, {lmbda}")
        if kwargs.get("m") is not None:
            raise ValueError("FriendlySAM has no m-sharpness (its EMA estimates the full gradient across steps)")
        super().__init__(params, base, dict(rho=rho, sigma=sigma, lmbda=lmbda), **kwargs)

    @torch.no_grad()
    def perturbation(self, groups):
        finite: Optional[torch.Tensor] = self._finite    # this step's first-pass flag (None: not checking)
        start_ok: Optional[bool] = None                   # may a new EMA start from this g? (one sync, first step)
        directions = []
        for ps, group in groups:
            d_group = []
            for p in ps:
                g, state = p.grad, self.state[p]
                ema = state.get("ema")
                if ema is None:
                    if start_ok is None:
                        start_ok = finite is None or bool(finite)
                    if start_ok:
                        state["ema"] = g.clone()                                   # m_1 = g_1
                    d_group.append(g)                                              # d_1 = g_1
                    continue
                d_group.append(g - group["sigma"] * ema)                           # d = g - sigma m_{t-1}
                folded = torch.lerp(ema, g, 1.0 - group["lmbda"])                  # lmbda m + (1 - lmbda) g
                ema.copy_(folded if finite is None else torch.where(finite, folded, ema))
            directions.append(d_group)
        norm = paramspace.global_norm([d for d_group in directions for d in d_group])      # ||d||
        return [torch._foreach_mul(d_group, group["rho"] / (norm + 1e-12)) if d_group else []
                for d_group, (_, group) in zip(directions, groups)]                        # rho d / ||d||

    # ------------------------------------------------------------------------------------ the EMA in checkpoints
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self):
        ema = {i: self.state[p]["ema"] for i, p in enumerate(self._params()) if "ema" in self.state.get(p, {})}
        return {**super().state_dict(), EMA_KEY: ema}

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        ema = state_dict.pop(EMA_KEY, {})
        super().load_state_dict(state_dict)
        for i, p in enumerate(self._params()):
            self.state[p].pop("ema", None)
            if i in ema:
                self.state[p]["ema"] = ema[i].detach().to(device=p.device, dtype=p.dtype).clone()


@dataclass
class FriendlySAMParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    rho: float = 0.1         # radius of the perturbation ball
    sigma: float = 1.0       # how much of the EMA (the full-gradient estimate) is taken out of g
    lmbda: float = 0.95      # EMA decay
    lr: float = 0.05
    weight_decay: float = 5e-4

    def check(self):
        check(self.rho >= 0, "rho", self.rho, ">= 0")
        check(self.sigma >= 0, "sigma", self.sigma, ">= 0")
        check(0 <= self.lmbda < 1, "lmbda", self.lmbda, "[0, 1)")


@OPTIMIZERS.register("friendly_sam", FriendlySAMParams, "FriendlySAM (Li et al. 2024): SAM perturbing along the batch "
                     "gradient minus its EMA", passes_per_step=2)
def friendly_sam(params, rho, sigma, lmbda, base, weight_decay_in_loss, skip_nonfinite, **shared):
    return FriendlySAM(params, rho=rho, sigma=sigma, lmbda=lmbda,
                       **engine_kwargs(base, weight_decay_in_loss, skip_nonfinite))
