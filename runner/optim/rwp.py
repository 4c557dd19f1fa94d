"""RWP / m-RWP: random weight perturbation (Li, Tao, Yan, Lei, Wu, Fang, He, Huang, "Revisiting Random Weight
Perturbation for Efficiently Improving Generalization", TMLR 2024; filter-wise noise as in Bisla et al.,
"Low-Pass Filtering SGD for Recovering Flat Optima", AISTATS 2022), and average-direction SAM (Zhu, Wang, Yu,
Tang, Tao, "Decentralized SGD and Average-direction SAM are Asymptotically Equivalent", ICML 2023).

Both minimize a Gaussian-smoothed loss E_eps L(w + eps) instead of SAM's worst case; m-RWP mixes in the plain
loss: L_m(w) = lam L(w) + (1 - lam) E_eps L(w + eps). One step, with K = `draws` noise draws:
    g = lam * g(w) + (1 - lam) * (1/K) sum_k g(w + eps_k)     # g(w) only when lam > 0
    w <- base_step(w, g)
    eps_k ~ N(0, diag(s²)),  s = sigma * scale(tensor), per parameter tensor, from the weights w of the step:
      scale = "filter" (RWP):  ||W_i||  for each output filter i (row W_i = W[i] of a tensor with dim >= 2),
                               ||p|| + 1e-16 for tensors of dim <= 1 (biases, BN): the released code's rule;
              "tensor":        ||p|| + 1e-16 for every tensor;
              "none":          1 (isotropic, as in Zhu et al.'s average-direction SAM).
Cost: K forward+backward passes, plus 1 when lam > 0 (the default m-RWP, lam = 0.5, K = 1: 2 passes). With
lam = 0 the step has no pass at w: BN running statistics and the train metrics come from the first pass, at
w + eps_1 (the loop's convention: the step's first pass). The loss returned is that first pass's.

The noise is drawn from a torch.Generator on the parameters' device, reseeded every step from (seed, step
counter): the counter and the seed are in `state_dict`, so a resumed run draws the noise of the uninterrupted
one. The seed defaults to torch.initial_seed() at construction (the run's seed, set before the optimizer is built),
so runs with different seeds draw different noise. `step_seed` is the mixing function.

Conventions and how ours differs from the references:
- the m-RWP paper's objective uses one mini-batch for both terms; the released code (two GPUs in parallel)
  computes g(w) and g(w + eps) on different halves of the global batch, each scaled by 2 before DDP averages
  them, so its wall clock equals SGD's on two GPUs. We compute every term on the whole batch, in sequence
  (1 + K passes on one device), as the paper's equation reads;
- weight decay by the base optimizer (the released code: SGD's weight_decay); `weight_decay_in_loss=true` adds
  wd·(w + eps) to each perturbed pass's gradient (the engine's rule);
- the noise scale is computed once per step from w, and every draw starts from w (restored by copy, exactly),
  not by subtracting the noise again;
- sigma is per parameter group (it lives in the param groups), `draws`, `lam`, `scale` are global. A constant
  sigma (no growing schedule as in LPF-SGD).
Many devices (`trainer.devices`): the weight noise is the same on every rank (its generator is seeded from the run's
seed and the step number), so `global` is single-device RWP with the global batch (tests/test_distributed.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs

SCALES = ("filter", "tensor", "none")
_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed for step `step` of a run seeded `seed` (splitmix64 of the pair): distinct runs and
    distinct steps get unrelated streams, and step t's noise depends on (seed, t) only."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


@torch.no_grad()
def noise_scale(p: torch.Tensor, scale: str) -> torch.Tensor | float:
    """The standard deviation of p's noise per unit sigma, broadcastable to p (see the module docstring)."""
    if scale == "none":
        return 1.0
    if scale == "filter" and p.dim() > 1:
        return p.reshape(p.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (p.dim() - 1)))
    return p.norm() + 1e-16


class RWP(PerturbationOptimizer):
    """`sigma` (relative noise scale, per group), `draws` (K), `lam` (weight of the unperturbed gradient; 0 = RWP
    / average-direction SAM), `scale` (filter | tensor | none), `seed` (None: torch.initial_seed())."""

    def __init__(self, params, base, sigma: float = 0.01, draws: int = 1, lam: float = 0.5, scale: str = "filter",
                 seed: Optional[int] = None, **kwargs):
        if sigma < 0 or draws < 1 or not 0 <= lam < 1 or scale not in SCALES:
            raise ValueError(f"need sigma >= 0, draws >= 1, 0 <= lam < 1, scale in {SCALES}; "
                             f"got {sigma}, {draws}, {lam}, {scale!r}")
        super().__init__(params, base, dict(sigma=sigma), **kwargs)
        self.draws, self.lam, self.scale = int(draws), float(lam), scale
        self.seed = (torch.initial_seed() if seed is None else int(seed)) & ((1 << 63) - 1)
        self.noise_step = 0          # steps drawn so far: the generator's seed of the next step is step_seed(seed, it)
        self._generator: Optional[torch.Generator] = None
        self._w: Optional[list[torch.Tensor]] = None

    def _trainable(self) -> tuple[list[torch.Tensor], list[float]]:
        pairs = [(p, g["sigma"]) for g in self.param_groups for p in g["params"] if p.requires_grad]
        return [p for p, _ in pairs], [s for _, s in pairs]

    def _reseeded(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(step_seed(self.seed, self.noise_step))
        self.noise_step += 1
        return self._generator

    @staticmethod
    @torch.no_grad()
    def _accumulate(total: dict, params: list[torch.Tensor], weight: float) -> None:
        """total[i] += weight * grad of params[i] (the closure zeroes grads before every pass)."""
        for i, p in enumerate(params):
            if p.grad is not None:
                if i in total:
                    total[i].add_(p.grad, alpha=weight)
                else:
                    total[i] = p.grad * weight

    def step(self, closure=None):
        closure = self._checked(closure)
        params, sigmas = self._trainable()
        generator = self._reseeded(params[0].device)
        with torch.no_grad():
            stds = [sigma * noise_scale(p, self.scale) for p, sigma in zip(params, sigmas)]
            self._w = paramspace.snapshot(params, into=self._w if self._w is not None
                                          and len(self._w) == len(params) else None)
        total, loss = {}, None
        if self.lam > 0:
            loss = closure()                                        # g(w)
            self.after_pass()
            self._accumulate(total, params, self.lam)
        for k in range(self.draws):
            with torch.no_grad():
                if k > 0:
                    paramspace.restore(params, self._w)             # back to w, exactly
                for p, std in zip(params, stds):
                    noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
                    p.add_(noise.mul_(std))                         # w + eps_k
            pass_loss = closure()                                   # g(w + eps_k)
            self.after_pass()
            self._accumulate(total, params, (1 - self.lam) / self.draws)
            loss = pass_loss if loss is None else loss
        with torch.no_grad():
            paramspace.restore(params, self._w)
            for i, p in enumerate(params):
                p.grad = total.get(i)
        self.commit()                                               # w <- base_step(w, g)
        return loss

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self):
        return {**super().state_dict(),
                "rwp": {"seed": torch.tensor(self.seed), "noise_step": torch.tensor(self.noise_step)}}

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("rwp", None)
        super().load_state_dict(state_dict)
        if own is not None:  # a checkpoint of another optimizer (SGD -> RWP) starts a fresh noise stream
            self.seed, self.noise_step = int(own["seed"]), int(own["noise_step"])


@dataclass
class RWPParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    sigma: float = 0.01      # relative noise scale (the released m-RWP code's gamma)
    draws: int = 1           # K noise draws per step, one pass each
    lam: float = 0.5         # weight of the unperturbed gradient (m-RWP); 0 = RWP / average-direction SAM
    scale: str = "filter"    # filter | tensor | none
    lr: float = 0.05
    weight_decay: float = 5e-4

    def check(self):
        check(self.sigma >= 0, "sigma", self.sigma, ">= 0")
        check(self.draws >= 1, "draws", self.draws, ">= 1")
        check(0 <= self.lam < 1, "lam", self.lam, "[0, 1)")
        check(self.scale in SCALES, "scale", self.scale, " | ".join(SCALES))


@OPTIMIZERS.register("rwp", RWPParams, "RWP / m-RWP (Li et al. 2024), average-direction SAM (Zhu et al. 2023)",
                     passes_per_step=lambda p: p.draws + (1 if p.lam > 0 else 0))
def rwp(params, sigma, draws, lam, scale, base, weight_decay_in_loss, skip_nonfinite, **shared):
    return RWP(params, sigma=sigma, draws=draws, lam=lam, scale=scale,
               **engine_kwargs(base, weight_decay_in_loss, skip_nonfinite))
