"""ESAM: Efficient Sharpness-aware Minimization (Du, Yan, Feng, Zhou, Zhen, Goh, Tan, ICLR 2022).

Update, per step with batch B of n samples, per-sample losses l_i and g = grad L_B(w):
    SWP  (stochastic weight perturbation):  m_j ~ Bernoulli(beta) i.i.d. per coordinate,
         e = rho / beta * (m ⊙ g) / ||g||                    (1/beta: E[e] is SAM's rho g / ||g||)
    SDS  (sharpness-sensitive data selection):  s_i = l_i(w + e) - l_i(w);
         B+ = the k = max(1, floor(gamma n)) samples with the largest s_i
    w <- base_step(w, grad L_{B+}(w + e))                    (mean over B+ only; B- is not used)
Cost per step, as the loop counts it (forward+backward passes, in samples): 1 + k/n ≈ 1 + gamma (the first pass
on B, the second on B+ only); `passes_per_step_measured` in summary.json is this number. Not in it: one
FORWARD-ONLY pass over the whole batch at w + e (no graph, no backward), which ranks the samples. With a backward
costing about two forwards it is worth about 1/3 of a pass, so ESAM's compute is ≈ 4/3 + gamma passes a step
(gamma = 1 skips it: then ESAM is 2 passes). The loop counts that forward apart (`closure.forward`):
summary.json's `forward_only_passes`. The optimizer exposes, for the step just taken:
    `second_pass_fraction`  k/n, the fraction of the batch in the second forward+backward pass;
    `forward_only_passes`   1.0 when the ranking forward ran (gamma < 1), else 0.0;
and over the whole run `summary_stats()` -> {"second_pass_fraction": selected / seen samples} (summary.json's
`optimizer_stats`, kept across a resume).
SWP saves nothing here: the first pass computes every gradient (the masks only shape e); see below.

Conventions, paper vs the released code (dydjw9/Efficient_SAM, utils/Esam.py), and which we follow:
- SWP granularity. Paper: a Bernoulli mask per coordinate, e = rho/beta · m⊙g/||g|| with the norm of the full g
  (ours, the default). Code: one coin per parameter TENSOR, drawn at the end of the previous step; an unselected
  tensor gets requires_grad=False for the next first pass, so its gradient is neither computed (that is where
  the code's saving comes from) nor in the norm: e = rho/beta · g_S/||g_S|| on the selected tensors S (the very
  first step perturbs every tensor). `swp_per_tensor=true` gives the code's granularity and norm, drawn at the
  step itself; the first backward still computes every gradient (toggling requires_grad per step would recompile
  torch.compile'd models and is not the engine's business).
- SDS selection. Paper: |B+| = gamma |B|. Code: `instance_sharpness > cutoff` with cutoff the k-th largest,
  which keeps k - 1 samples (ties aside), and every sample when gamma >= 0.99. Ours: exactly k (torch.topk).
- The code's ranking forward runs in train mode (BN folds w + e into its running statistics) and the norm's
  epsilon is 1e-7. Ours: every pass after the first leaves BN running statistics alone (runner/step.py), and
  the epsilon is 1e-12, added to the norm, as in our SAM.
- Randomness. The code uses Python's `random`. Ours: a torch.Generator on each parameter's device, reseeded
  every step with `swp_seed(seed, step)` (seed = torch.initial_seed() when built, i.e. the run's seed); the
  step count and seed are in `state_dict()`, so a resumed run draws the masks the uninterrupted run draws.
  Coordinate masks are `torch.rand(p.shape, generator, dtype=float32) < beta`, tensors in parameter order;
  tensor masks are `torch.rand(#tensors, generator=<cpu>) < beta`.
- Weight decay: the engine's flag (in the base optimizer by default, as the code's SGD(weight_decay=...)).
  With `weight_decay_in_loss`, g and the second-pass gradient include wd·w; the ranking is unaffected.
ESAM needs the loop's closure (per-sample losses, `select=`); a plain torch closure is refused with a message.
Many devices (`trainer.devices`): `perturbation_sync=local` is ESAM on each device's own samples (its own top-k);
with gamma < 1 there is no `global` form (the single-device selection is a top-k over the global batch, which
would gather every per-sample loss and weight each device's selected gradient by its count): refused in one line.
SWP's masks are drawn from a seed and the step number, the same on every rank.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs


def swp_seed(seed: int, step: int) -> int:
    """The SWP generator's seed at `step` (0-based): a function of the run's seed and the step count only."""
    digest = hashlib.blake2b(f"esam-swp:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def selected_count(gamma: float, n: int) -> int:
    """|B+| for a batch of n: floor(gamma n) (robust to float error), at least 1."""
    return min(n, max(1, int(gamma * n + 1e-9)))


class ESAM(PerturbationOptimizer):
    def __init__(self, params, base_optimizer, rho: float = 0.05, beta: float = 0.6, gamma: float = 0.5,
                 swp_per_tensor: bool = False, seed: Optional[int] = None, **kwargs):
        if rho < 0 or not 0 < beta <= 1 or not 0 < gamma <= 1:
            raise ValueError(f"need rho >= 0, 0 < beta <= 1, 0 < gamma <= 1; got {rho}, {beta}, {gamma}")
        super().__init__(params, base_optimizer, dict(rho=rho, beta=beta, gamma=gamma), **kwargs)
        self.swp_per_tensor = swp_per_tensor
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self.steps = 0                      # steps taken (skipped ones included): the masks' clock
        self.second_pass_fraction = 1.0     # |B+| / |B| of the last step
        self.forward_only_passes = 0.0      # forward-only passes over the batch in the last step
        self.selected_samples = self.seen_samples = 0   # over the run: second-pass samples, batch samples
        self._generators: dict[torch.device, torch.Generator] = {}

    # ------------------------------------------------------------------------------------------- SWP
    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device].manual_seed(seed)

    def swp_masks(self, params: list[torch.Tensor], step: int) -> list[torch.Tensor] | list[bool]:
        """The masks of `step`: per coordinate (bool tensors), or per tensor (bools) with `swp_per_tensor`."""
        beta, seed = self.param_groups[0]["beta"], swp_seed(self.seed, step)
        if self.swp_per_tensor:
            return (torch.rand(len(params), generator=self._generator(torch.device("cpu"), seed)) < beta).tolist()
        for device in {p.device for p in params}:
            self._generator(device, seed)
        return [torch.rand(p.shape, generator=self._generators[p.device], device=p.device) < beta for p in params]

    @torch.no_grad()
    def perturbation(self, groups):
        params = [p for ps, _ in groups for p in ps]
        beta = self.param_groups[0]["beta"]
        masks = self.swp_masks(params, self.steps) if beta < 1 else None
        if masks is not None and self.swp_per_tensor:    # the code: selected tensors only, their norm
            kept = [p.grad for p, keep in zip(params, masks) if keep]
            norm = paramspace.global_norm(kept) if kept else params[0].grad.new_zeros(())
        else:                                            # the paper: ||g|| over every coordinate
            norm = paramspace.global_norm([p.grad for p in params])
        e, i = [], 0
        for ps, group in groups:
            scale = group["rho"] / (beta * (norm + 1e-12))
            e_group = list(torch._foreach_mul([p.grad for p in ps], scale)) if ps else []
            if masks is not None:
                for j, keep in enumerate(masks[i:i + len(ps)]):
                    if isinstance(keep, torch.Tensor):
                        e_group[j].mul_(keep)              # m ⊙ e, per coordinate
                    elif not keep:
                        e_group[j].zero_()                 # an unselected tensor is not perturbed
            e.append(e_group)
            i += len(ps)
        return e

    # ------------------------------------------------------------------------------------------- SDS
    @staticmethod
    @torch.no_grad()
    def _losses_here(closure) -> torch.Tensor:
        """Per-sample objective at the current weights: one forward-only pass (`closure.forward`: no graph, BN
        statistics untouched, counted in forward_only_passes)."""
        return closure.objective(closure.forward(), closure.y, reduction="none").detach()

    def step(self, closure=None):
        closure = self._checked(closure)
        if not hasattr(closure, "per_sample"):
            raise RuntimeError("ESAM needs the loop's StepClosure (runner/step.py): per-sample losses and "
                               "closure(select=...); a plain torch closure cannot select samples")
        loss = closure()                                   # g(w) on B; l_i(w)
        before = closure.per_sample_loss
        if before is None:
            raise RuntimeError("ESAM needs per-sample losses: register it with per_sample_loss=True")
        self.after_pass()
        self.ascend()                                      # w + e, e masked by SWP
        n = len(closure.y)
        k = selected_count(self.param_groups[0]["gamma"], n)
        if k < n:
            sharpness = self._losses_here(closure) - before          # s_i = l_i(w + e) - l_i(w)
            chosen = torch.topk(sharpness, k, sorted=False).indices.sort().values
            closure(select=chosen)                         # g_{B+}(w + e)
        else:
            closure()
        self.after_pass()
        self.commit()
        self.steps += 1
        self.second_pass_fraction, self.forward_only_passes = k / n, float(k < n)
        self.selected_samples += k
        self.seen_samples += n
        return loss

    def summary_stats(self) -> dict:
        """Over the run so far: the fraction of the samples that went into the second pass."""
        return {"second_pass_fraction": self.selected_samples / self.seen_samples if self.seen_samples else None}

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self):
        return {**super().state_dict(), "esam_steps": self.steps, "esam_seed": self.seed,
                "esam_samples": [self.selected_samples, self.seen_samples]}

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        self.steps = int(state_dict.pop("esam_steps", 0))
        self.seed = int(state_dict.pop("esam_seed", self.seed))
        self.selected_samples, self.seen_samples = (int(v) for v in state_dict.pop("esam_samples", (0, 0)))
        super().load_state_dict(state_dict)


@dataclass
class ESAMParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    rho: float = 0.05             # radius of the perturbation ball
    beta: float = 0.6             # SWP: fraction of the weights perturbed (scaled by 1/beta)
    gamma: float = 0.5            # SDS: fraction of the batch in the second pass
    swp_per_tensor: bool = False  # the released code's SWP: one coin per tensor, norm over the selected tensors
    lr: float = 0.05
    weight_decay: float = 1e-3

    def check(self):
        check(self.rho >= 0, "rho", self.rho, ">= 0")
        check(0 < self.beta <= 1, "beta", self.beta, "(0, 1]")
        check(0 < self.gamma <= 1, "gamma", self.gamma, "(0, 1]")


@OPTIMIZERS.register("esam", ESAMParams, "ESAM (Du et al. 2022): stochastic weight perturbation and "
                     "sharpness-sensitive data selection", passes_per_step=lambda p: 1 + p.gamma,
                     per_sample_loss=True,
                     per_device=lambda p: "with gamma < 1 it selects the sharpest samples among each device's own "
                     "(a global top-k would gather every per-sample loss)" if p.gamma < 1 else None)
def esam(params, rho, beta, gamma, swp_per_tensor, base, weight_decay_in_loss, skip_nonfinite, **shared):
    kwargs = engine_kwargs(base, weight_decay_in_loss, skip_nonfinite)
    kwargs["base_optimizer"] = kwargs.pop("base")
    kwargs.pop("m")
    return ESAM(params, rho=rho, beta=beta, gamma=gamma, swp_per_tensor=swp_per_tensor, **kwargs)
