"""GAM: Gradient norm Aware Minimization (Xingxuan Zhang, Renzhe Xu, Han Yu, Hao Zou, Peng Cui, "Gradient Norm
Aware Minimization Seeks First-Order Flatness and Improves Generalization", CVPR 2023, arXiv:2303.03108).

GAM penalizes first-order flatness R1(w) = rho * max_{||e|| <= rho} ||g(w + e)||, the largest gradient norm in a
ball, next to the loss. The paper's Algorithm 1 needs two Hessian-vector products; its accelerated form (paper
Appendix D, the algorithm the released code xxgege/GAM implements) replaces each H v by a finite difference of
gradients, H(w) v ~ (g(w + rho' v) - g(w)) / rho', and adds SAM's zeroth-order perturbation. One step, with
u/||u|| written û (the norm over all parameters, 1e-12 added to it):
    g0 = g(w)                                              # pass 1; BN running statistics updated here only
    g1 = g(w + rho' ĝ0)                                    # pass 2: SAM's point (zeroth-order flatness)
    h  = g1 - g0                                           # ~ rho' H ĝ0 = rho' grad ||g||(w) (its direction)
    w2 = w + rho ĥ                                         # the point of largest gradient norm in the rho-ball
    g2 = g(w2)                                             # pass 3
    g3 = g(w2 + rho' ĝ2)                                   # pass 4: ~ g2 + rho' grad ||g||(w2), first-order flatness
    d  = alpha g1 + (1 - alpha) g3                         # the descent direction ("perturbed" gradients)
    s  = beta g0 + (1 - beta) g2                           # the "unperturbed" gradients    (beta_convention=paper)
    s  = g0 + (1 - beta) g2                                # the released code's             (beta_convention=code)
    s⊥ = s - cos(s, d) ||s|| d / (||d|| + 1e-12),  cos(s, d) = <s, d> / (||s|| ||d|| + 1e-12)
    w <- base_step(w, d - gamma s⊥)                        # GSAM-style: also descend the orthogonal component of s
Cost: 4 forward+backward passes per step (w, w + rho' ĝ0, w2, w2 + rho' ĝ2). Memory: w, g0, g1, g2 kept.

The two beta conventions (`beta_convention`), precisely:
- `paper` (default): s = beta g0 + (1 - beta) g2, a convex combination of the gradients at the two unperturbed
  points w and w2, mirroring d = alpha g1 + (1 - alpha) g3 at the two perturbed points;
- `code` (xxgege/GAM, gam/gam.py `gradient_decompose` with main_cifar.py's settings grad_beta_2 = 1 - grad_beta_0,
  grad_beta_3 = 1 - grad_beta_1): pro_m = g0 + |grad_beta_2| g2 = g0 + (1 - beta) g2. `grad_beta_0` (the README's
  beta) never multiplies g0, so g0 has weight 1 whatever beta is and s is not a convex combination; with the CIFAR
  settings (beta = 0.1) the code's s carries 10x the paper's weight on g0. d is the same in both
  (grad_beta_1 g1 + grad_beta_3 g3 = alpha g1 + (1 - alpha) g3).
Reading: the text of Appendix D's algorithm (an image, images/gam_algorithm.png, in the repository's README) was
not available to us; the `paper` reading is reconstructed from the README's naming of the symbols (rho_t =
grad_norm_rho, rho'_t = grad_rho, alpha = grad_beta_1, beta = grad_beta_0, gamma = grad_gamma) and the structure of
the code, taking beta as the weight of g0 in the convex combination that matches alpha's. Check against the paper
before relying on the difference.

Hyperparameters (names here -> paper -> code): rho -> rho_t -> grad_norm_rho (radius of the gradient-norm ascent);
rho_prime -> rho'_t -> grad_rho (finite-difference step, also SAM's radius); alpha -> alpha -> grad_beta_1;
beta -> beta -> grad_beta_0; gamma -> gamma -> grad_gamma. Defaults: main_cifar.py's CIFAR-10 ResNet settings
(rho 0.2, rho' 0.03, alpha 0.1, beta 0.1, gamma 0.05; SGD lr 0.1, momentum 0.9, weight decay 5e-4).

Conventions, as in the released code unless said: constant rho, rho' (its ProportionScheduler is built with
max = min); norms over all parameters, 1e-12 added to each norm (the code's perturb_eps) and to ||s|| ||d|| in the
cosine; weight decay by the base optimizer, applied to d - gamma s⊥ (`weight_decay_in_loss=true` adds wd·w to every
pass's gradient instead); BN running statistics from the first pass only (the code sets BN momentum to 0 in
passes 2-4: the same); the loss returned is the one at w. Ours differs from the code in: w restored by copy, not
by subtracting the perturbations (exact); no `adaptive` (ASAM-scaled) variant (the code's default is off); no
distributed gradient sync (the loop is single-process); label smoothing (0.1 in the code) is the loss's business
(`loss=` config), not the optimizer's.
"""
from dataclasses import dataclass

import torch

from runner import paramspace
from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs

BETA_CONVENTIONS = ("paper", "code")


class GAM(PerturbationOptimizer):
    """`rho`: gradient-norm ascent radius; `rho_prime`: finite-difference step (SAM radius); `alpha`, `beta`,
    `gamma`: the weights of the update (module docstring); `beta_convention`: "paper" or "code"."""

    def __init__(self, params, base, rho: float = 0.2, rho_prime: float = 0.03, alpha: float = 0.1,
                 beta: float = 0.1, gamma: float = 0.05, beta_convention: str = "paper", **kwargs):
        if rho < 0 or rho_prime <= 0:
            raise ValueError(f"rho must be >= 0 and rho_prime > 0, got {rho}, {rho_prime}")
        if beta_convention not in BETA_CONVENTIONS:
            raise ValueError(f"beta_convention must be one of {BETA_CONVENTIONS}, got {beta_convention!r}")
        super().__init__(params, base, dict(rho=rho, rho_prime=rho_prime, alpha=alpha, beta=beta, gamma=gamma),
                         **kwargs)
        self.beta_convention = beta_convention

    # ------------------------------------------------------------------------------------------- helpers
    def _coefficient(self, key: str) -> list[float]:
        """group[key] for each parameter with a gradient, in order (hyperparameters live in the param groups)."""
        return [group[key] for ps, group in self._groups() for _ in ps]

    def _along(self, v: list[torch.Tensor], key: str) -> list[list[torch.Tensor]]:
        """group[key] * v / (||v|| + 1e-12) per group, the norm over all parameters: a perturbation for `perturb`."""
        norm = paramspace.global_norm(v)
        e, start = [], 0
        for ps, group in self._groups():
            part = v[start:start + len(ps)]
            e.append(torch._foreach_mul(part, group[key] / (norm + 1e-12)) if ps else [])
            start += len(ps)
        return e

    def _grads(self) -> list[torch.Tensor]:
        return [g.clone() for g in self.grads()]

    # ------------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def direction(self, g0, g1, g2, g3) -> list[torch.Tensor]:
        """d - gamma s⊥ from the four passes' gradients (module docstring)."""
        alpha, beta, gamma = (self._coefficient(k) for k in ("alpha", "beta", "gamma"))
        d = [a * x + (1 - a) * z for a, x, z in zip(alpha, g1, g3)]
        if self.beta_convention == "paper":
            s = [b * x + (1 - b) * z for b, x, z in zip(beta, g0, g2)]
        else:
            s = [x + abs(1 - b) * z for b, x, z in zip(beta, g0, g2)]
        d_norm, s_norm = paramspace.global_norm(d), paramspace.global_norm(s)
        cosine = paramspace.dot(s, d) / (s_norm * d_norm + 1e-12)
        along = cosine * s_norm / (d_norm + 1e-12)               # s = along * d + s⊥
        return [di - c * (si - along * di) for c, di, si in zip(gamma, d, s)]

    def step(self, closure=None):
        closure = self._checked(closure)
        loss = closure()                                          # g0 = g(w)
        self.after_pass()
        g0 = self._grads()
        self.perturb(self._along(g0, "rho_prime"))                # w + rho' ĝ0
        closure()                                                 # g1
        self.after_pass()
        g1 = self._grads()
        self.restore()
        self.perturb(self._along(torch._foreach_sub(g1, g0), "rho"))   # w2 = w + rho ĥ, h = g1 - g0
        closure()                                                 # g2 = g(w2)
        self.after_pass()
        g2 = self._grads()
        self.perturb(self._along(g2, "rho_prime"))                # w2 + rho' ĝ2
        closure()                                                 # g3
        self.after_pass()
        with torch.no_grad():
            update = self.direction(g0, g1, g2, self.grads())
            for p, u in zip(self.params_with_grad(), update):
                p.grad.copy_(u)
        self.commit()                                             # w <- base_step(w, d - gamma s⊥)
        return loss


@dataclass
class GAMParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    rho: float = 0.2                # rho_t (code: grad_norm_rho): radius of the gradient-norm ascent
    rho_prime: float = 0.03         # rho'_t (code: grad_rho): finite-difference step, SAM's radius
    alpha: float = 0.1              # weight of g1 (SAM point) against g3 in the descent direction
    beta: float = 0.1               # weight of g0 against g2 in the decomposed direction (see beta_convention)
    gamma: float = 0.05             # weight of the orthogonal component subtracted (GSAM-style)
    beta_convention: str = "paper"  # paper: s = beta g0 + (1-beta) g2; code (xxgege/GAM): s = g0 + (1-beta) g2
    lr: float = 0.1
    weight_decay: float = 5e-4

    def check(self):
        check(self.rho >= 0, "rho", self.rho, ">= 0")
        check(self.rho_prime > 0, "rho_prime", self.rho_prime, "> 0")
        check(0 <= self.alpha <= 1, "alpha", self.alpha, "[0, 1]")
        check(0 <= self.beta <= 1, "beta", self.beta, "[0, 1]")
        check(self.gamma >= 0, "gamma", self.gamma, ">= 0")
        check(self.beta_convention in BETA_CONVENTIONS, "beta_convention", self.beta_convention,
              " | ".join(BETA_CONVENTIONS))


@OPTIMIZERS.register("gam", GAMParams, "GAM (Zhang et al. 2023): gradient-norm aware minimization, first-order "
                     "flatness by finite differences, 4 passes", passes_per_step=4)
def gam(params, rho, rho_prime, alpha, beta, gamma, beta_convention, base, weight_decay_in_loss, skip_nonfinite,
        **shared):
    """GAM over the validated base optimizer (`shared` were handed to it during validation)."""
    return GAM(params, rho=rho, rho_prime=rho_prime, alpha=alpha, beta=beta, gamma=gamma,
               beta_convention=beta_convention, **engine_kwargs(base, weight_decay_in_loss, skip_nonfinite))
