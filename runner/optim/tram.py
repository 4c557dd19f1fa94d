"""TRAM: Trust Region Aware Minimization (Sherborne, Saphra, Dasigi, Peng, ICLR 2024, arXiv 2310.03646).

ASAM whose radius is not a hyperparameter but a trust-region distance in function space, measured on every batch
(the paper's Algorithm 1, App. B.6, with Eqs. 2, 4, 5, 7):
    g        = ∇L_B(w_t)                                     pass 1, forward+backward: also the logits f(x; w_t)
    d        = mean_x KL( p(.|x; ref) || p(.|x; w_t) )       1 forward, no backward: the reference logits
    e        = d · T² g / (||T g|| + 1e-12),   T = diag(|w_t|) (ASAM, the paper's choice; adaptive=false: T = I)
    w_{t+1}  = base_step(w_t, ∇L_B(w_t + e))                 pass 2, forward+backward
p = softmax(logits); the KL is "forward" (target = reference, estimate = current, App. C.5), summed over classes
and averaged over the batch (and over positions, for sequence logits). The reference (`reference`):
- previous (TRAM-θ_{t-1}, Eq. 4; the paper's best variant, default): this batch under the previous step's weights.
  The first step has no previous weights: the reference is w_1 itself, d = 0, a plain base step (the released
  code likewise starts its reference copy at the initial model);
- initial (TRAM-θ_0): this batch under the weights this optimizer started from (the pre-trained model);
- noise (TRAM-x, Eq. 5, R3F's d_x): this batch with z ~ N(0, sigma²) added to the inputs, at w_t. The paper adds z
  to token embeddings; here it is added to the model's input, so floating-point inputs only.
Cost: 2 forward+backward passes + 1 forward-only pass a step (the paper's "3 forward, 2 backward"). The loop's
counter counts forward+backward passes, so summary.json reports 2 passes a step; the extra forward (about a third
of a forward+backward) shows in the wall time only. With `previous`/`initial` a full copy of the parameters is
kept (in `state_dict()` as "tram_reference", so a resumed run measures the same d).

Conventions, and how this differs from the released code (tomsherborne/tram_optimizer):
- The released `TRAM.first_step` sets e = θ² · d/||θ g|| (adaptive) or 1 · d/||g||: the gradient never
  multiplies e, so its "ascent" is a shift along θ² (or a constant shift), not along the gradient. That is a bug;
  we implement the paper's Eq. 7, e = d θ² g/||θ g||.
- Its `KLDivergence` uses `F.kl_div(reduction="mean")` (a mean over batch × classes) and divides by the batch size
  again, so its d is the batch-mean KL / (K · B), times a `logit_scale`. We use Eq. 4's expectation (the batch-mean
  KL); `scale` multiplies d like `logit_scale` (1 = the paper).
- Its reference is a model copy in eval mode (BN running statistics, no dropout) while its current logits come
  from train mode. Ours runs the reference forward in the training passes' mode (train mode, BN with this batch's
  statistics, running statistics left alone as in every pass after the first); only parameters are swapped.
- The paper notes d could be bounded by ASAM's rho (d in (0, rho]) but does not do it; `rho_max` offers it.
- Weight decay: in the base optimizer by default (the engine's default; the released code hands it to the HF
  optimizer); `weight_decay_in_loss=true` puts wd·w into g as in the paper's Eq. 1.
- T = |w| on every parameter, no eta (the paper's Eq. 2; davda54's ASAM convention). No m-sharpness: d is a
  statistic of the whole batch (the released code ignores m-sharpness too).
- A skipped (non-finite) step leaves the weights unchanged, so with `previous` the next step's d is 0.
Many devices (`trainer.devices`): under `perturbation_sync=global` d is the global batch's (the ranks' batch means
of the KL, weighted by their shares: `batch_mean`), so the step is single-device TRAM with the global batch; under
`local` each device uses its own d. `reference=noise` has no global form (each device draws the noise for its own
samples): refused in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Inputs, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs

REFERENCES = ("previous", "initial", "noise")

#: reference=noise adds N(0, sigma²) to the inputs: floating-point ones only (not token ids).
NOISE_INPUTS = Inputs(("image", "features"), "reference", "it adds Gaussian noise to the inputs, so they must be "
                      "floating point; use optimizer.reference=previous or initial")


def forward_kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """mean over samples of KL(softmax(target) || softmax(logits)), in float32 (float64 stays float64)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_p = target_logits.to(dtype).flatten(0, -2).log_softmax(-1)
    log_q = logits.to(dtype).flatten(0, -2).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class TRAM(PerturbationOptimizer):
    """Needs the loop's closure (runner/step.py): `closure.logits` after a pass, and `closure.model`, `closure.x`,
    `closure.frozen_bn`, `closure.autocast` for the reference forward. `radius` is the last step's d (a tensor)."""

    def __init__(self, params, base_optimizer, reference: str = "previous", adaptive: bool = True,
                 scale: float = 1.0, rho_max: Optional[float] = None, sigma: float = 0.1, **kwargs):
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        if scale < 0 or sigma < 0 or (rho_max is not None and rho_max < 0):
            raise ValueError(f"scale, sigma and rho_max must be >= 0, got {scale}, {sigma}, {rho_max}")
        super().__init__(params, base_optimizer, dict(adaptive=adaptive), **kwargs)
        self.reference, self.scale, self.rho_max, self.sigma = reference, scale, rho_max, sigma
        self._reference_w: list[torch.Tensor] | None = None  # previous / initial weights, all parameters in order
        self.radius: torch.Tensor | None = None

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def reference_logits(self, closure) -> torch.Tensor:
        """The forward (no backward) that gives the reference distribution; BN running statistics untouched."""
        x = closure.x
        # forward-only passes through `closure.forward`: BN statistics untouched, counted apart
        if self.reference == "noise":
            if not x.is_floating_point():
                raise RuntimeError(f"TRAM reference=noise adds Gaussian noise to the inputs, which are {x.dtype} "
                                   "here; use reference=previous or initial")
            return closure.forward(x=x + self.sigma * torch.randn_like(x))
        params = self._all_params()
        if self._reference_w is None:              # first step: the reference is the current weights
            self._reference_w = paramspace.snapshot(params)
        for p, r in zip(params, self._reference_w):   # swap: p <- reference, r <- current
            current = p.detach().clone()
            p.copy_(r)
            r.copy_(current)
        try:
            return closure.forward()
        finally:
            if self.reference == "previous":       # p <- current; r keeps it: the next step's previous weights
                torch._foreach_copy_(params, self._reference_w)
            else:                                  # swap back: the initial weights stay the reference
                for p, r in zip(params, self._reference_w):
                    current = r.clone()
                    r.copy_(p)
                    p.copy_(current)

    def perturbation(self, groups):
        """e = d · T² g / (||T g|| + 1e-12), the norm over all parameters of all groups (Eq. 7)."""
        scales = [torch._foreach_abs(ps) if g["adaptive"] and ps else None for ps, g in groups]
        scaled = []
        for (ps, _), t in zip(groups, scales):
            grads = [p.grad for p in ps]
            scaled += torch._foreach_mul(t, grads) if t is not None else grads
        factor = self.radius / (paramspace.global_norm(scaled) + 1e-12)
        e = []
        for (ps, _), t in zip(groups, scales):
            grads = [p.grad for p in ps]
            e_w = torch._foreach_mul(torch._foreach_mul(t, t), grads) if t is not None else grads
            e.append(torch._foreach_mul(e_w, factor) if ps else [])
        return e

    def step(self, closure=None):
        if getattr(closure, "model", None) is None or not hasattr(closure, "logits"):
            raise RuntimeError("TRAM needs the training loop's closure (runner/step.py StepClosure): the current "
                               "logits (closure.logits) and a forward of the batch at the reference")
        closure = self._checked(closure)
        loss = closure()                    # g(w_t) and the logits at w_t; BN running statistics updated here only
        self.after_pass()
        d = forward_kl(self.reference_logits(closure), closure.logits) * self.scale
        d = self.batch_mean(closure, d)     # many devices, perturbation_sync=global: the global batch's d
        self.radius = d if self.rho_max is None else d.clamp(max=self.rho_max)
        self.ascend()                       # w_t + e
        closure()                           # g(w_t + e)
        self.after_pass()
        self.commit()                       # w_{t+1} = base_step(w_t, g(w_t + e))
        return loss

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self):
        state = super().state_dict()
        if self._reference_w is not None:
            state["tram_reference"] = list(self._reference_w)
        return state

    def load_state_dict(self, state_dict) -> None:
        """A checkpoint without "tram_reference" (e.g. of plain SGD) starts the reference at the next step."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("tram_reference", None)
        super().load_state_dict(state_dict)
        if saved is None or self.reference == "noise":
            return
        params = self._all_params()
        if len(saved) != len(params) or any(s.shape != p.shape for s, p in zip(saved, params)):
            raise ValueError("tram_reference does not match this optimizer's parameters")
        self._reference_w = [p.detach().clone() for p in params]
        for r, s in zip(self._reference_w, saved):
            r.copy_(s)


@dataclass
class TRAMParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    reference: str = "previous"      # previous (TRAM-θ_{t-1}) | initial (TRAM-θ_0) | noise (TRAM-x)
    adaptive: bool = True            # T = |w| (ASAM, the paper); false: T = I (SAM)
    scale: float = 1.0               # d multiplier (the released code's logit_scale); 1 = the paper
    rho_max: Optional[float] = None  # cap on d (the paper's optional d <= rho); null = none
    sigma: float = 0.1               # std of the input noise, reference=noise only
    lr: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])  # the paper's Adam betas (App. B.1)
    weight_decay: float = 5e-4

    def check(self):
        check(self.reference in REFERENCES, "reference", self.reference, " | ".join(REFERENCES))
        check(self.scale >= 0, "scale", self.scale, ">= 0")
        check(self.rho_max is None or self.rho_max >= 0, "rho_max", self.rho_max, "null or >= 0")
        check(self.sigma >= 0, "sigma", self.sigma, ">= 0")


@OPTIMIZERS.register("tram", TRAMParams, "TRAM (Sherborne et al. 2024): ASAM with a trust-region (KL) radius",
                     passes_per_step=2, inputs=lambda p: NOISE_INPUTS if p.reference == "noise" else None,
                     per_device=lambda p: "reference=noise draws the input noise on each device for its own samples"
                     if p.reference == "noise" else None)
def tram(params, reference, adaptive, scale, rho_max, sigma, base, weight_decay_in_loss, skip_nonfinite, **shared):
    """`base` is the validated base optimizer (a Choice); `shared` were handed to it during validation."""
    kwargs = engine_kwargs(base, weight_decay_in_loss, skip_nonfinite)
    return TRAM(params, kwargs.pop("base"), reference=reference, adaptive=adaptive, scale=scale, rho_max=rho_max,
                sigma=sigma, **kwargs)
