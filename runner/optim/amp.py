"""AMP, adversarial model perturbation (Zheng, Zhang, Mao, "Regularizing Neural Networks via Adversarial Model
Perturbation", CVPR 2021). Not automatic mixed precision: that is `trainer.precision`.

AMP minimizes the loss at the worst point of a norm ball around w, found by N steps of gradient ascent with an
inner learning rate zeta, each projected back onto the ball (the paper's Algorithm 1, the released code
hiyouga/AMP-Regularizer, amp.py):
    g_0 = g(w)                                                  # first pass; BN running statistics updated here only
    for n = 1..N:
        d_n = d_{n-1} + zeta * g_{n-1},  d_0 = 0                # per tensor
        d_n <- d_n * min(1, epsilon / (||d_n|| + 1e-12))        # per-tensor L2 ball of radius epsilon
        g_n = g(w + d_n)                                        # pass n + 1
    w <- base_step(w, g_N)
Cost: 1 + N forward+backward passes per step (`inner_steps` = N; the paper's CIFAR setting N = 1 makes 2).
N = 0 is the base optimizer at 1 pass.

Conventions, all as in the released code:
- the ball is per tensor (each parameter tensor's deviation clipped to ||d|| <= epsilon on its own), not one
  ball over all parameters: this is what amp.py does and what we follow (we could not re-check offline whether
  the paper's text means one ball over the whole model; the code is what produced its numbers);
- epsilon placement: the scale is epsilon / (||d|| + 1e-12), applied only when it is < 1 (amp.py's clip);
- the inner step adds zeta * g to the deviation (plain gradient ascent, not normalized as in SAM); with N = 1 and
  zeta * ||g_t|| <= epsilon for every tensor, AMP is SAM's step without normalization (w + zeta g);
- weight decay by the base optimizer (amp.py wraps SGD with weight_decay; the deviation sees the data gradient
  only); `weight_decay_in_loss=true` puts wd·w into every pass's gradient, so also into the ascent;
- BN running statistics from the first pass only (the loop's convention; amp.py updates them in every pass);
- the loss returned is the one at w (amp.py returns it too); gradient clipping (`trainer.grad_clip`) applies to
  every pass, as amp.py's training script clips inside its closure.
Ours differs from amp.py in one way beyond BN: w is restored by copy, not by subtracting d (exact).
"""
from dataclasses import dataclass

import torch

from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs


class AMP(PerturbationOptimizer):
    """Adversarial model perturbation: `epsilon` (ball radius per tensor), `inner_lr` (zeta), `inner_steps` (N)."""

    def __init__(self, params, base, epsilon: float = 0.5, inner_lr: float = 1.0, inner_steps: int = 1, **kwargs):
        if epsilon < 0 or inner_lr < 0 or inner_steps < 0:
            raise ValueError(f"epsilon, inner_lr, inner_steps must be >= 0, got {epsilon}, {inner_lr}, {inner_steps}")
        super().__init__(params, base, dict(epsilon=epsilon, inner_lr=inner_lr), **kwargs)
        self.inner_steps = int(inner_steps)

    @torch.no_grad()
    def _deviation(self, previous):
        """d_n from d_{n-1} (None: 0) and the current gradients, per group, each tensor clipped to its ball."""
        deviation = []
        for i, (ps, group) in enumerate(self._groups()):
            if not ps:
                deviation.append([])
                continue
            grads = [p.grad for p in ps]
            d = (torch._foreach_mul(grads, group["inner_lr"]) if previous is None
                 else torch._foreach_add(previous[i], grads, alpha=group["inner_lr"]))
            norms = torch._foreach_norm(d)
            scales = [torch.clamp(group["epsilon"] / (n + 1e-12), max=1.0) for n in norms]
            torch._foreach_mul_(d, scales)
            deviation.append(d)
        return deviation

    def step(self, closure=None):
        closure = self._checked(closure)
        loss = closure()                 # g(w)
        self.after_pass()
        deviation = None
        for _ in range(self.inner_steps):
            deviation = self._deviation(deviation)
            self.restore()               # back to w exactly, then to w + d_n
            self.perturb(deviation)
            closure()                    # g(w + d_n)
            self.after_pass()
        self.commit()                    # w <- base_step(w, g(w + d_N))
        return loss


@dataclass
class AMPParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    epsilon: float = 0.5      # radius of each tensor's L2 ball
    inner_lr: float = 1.0     # zeta: step size of the inner gradient ascent on the deviation
    inner_steps: int = 1      # N: inner ascent iterations (1 + N passes a step)
    lr: float = 0.1
    nesterov: bool = True
    weight_decay: float = 1e-4

    def check(self):
        check(self.epsilon >= 0, "epsilon", self.epsilon, ">= 0")
        check(self.inner_lr >= 0, "inner_lr", self.inner_lr, ">= 0")
        check(isinstance(self.inner_steps, int) and self.inner_steps >= 0, "inner_steps", self.inner_steps,
              "an integer >= 0")


@OPTIMIZERS.register("amp", AMPParams, "AMP, adversarial model perturbation (Zheng et al. 2021; not mixed precision): "
                     "per-tensor L2 ball, inner gradient-ascent steps", passes_per_step=lambda p: 1 + p.inner_steps)
def amp(params, epsilon, inner_lr, inner_steps, base, weight_decay_in_loss, skip_nonfinite, **shared):
    """Adversarial model perturbation over the validated base optimizer (`shared` were handed to it)."""
    return AMP(params, epsilon=epsilon, inner_lr=inner_lr, inner_steps=inner_steps,
               **engine_kwargs(base, weight_decay_in_loss, skip_nonfinite))
