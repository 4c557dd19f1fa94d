"""Gradient-norm regularization (GR) by finite differences (Karakida, Takase, Hayase, Osawa, "Understanding Gradient
Regularization in Deep Learning: Efficient Finite-Difference Computation and Implicit Bias", ICML 2023).

Objective and its gradient, with g = grad L(w) and H = Hessian of L at w:
    L~(w) = L(w) + gamma/2 ||g||²          grad L~(w) = g + gamma H g
H g is never formed; three ways to get the step's gradient (`method`):
- forward (the paper's F-GR, ascent step h > 0):
      H g ~ (g(w + h g) - g) / h           ->  d = (1 - gamma/h) g + (gamma/h) g(w + h g)
- backward (B-GR, the same difference taken with a descent step, i.e. the forward formula with -h):
      H g ~ (g - g(w - h g)) / h           ->  d = (1 + gamma/h) g - (gamma/h) g(w - h g)
- exact (double backpropagation, "DB" in the paper): one forward+backward with create_graph, then the gradient
  of gamma/2 ||g||² by a second backward through that graph: d = g + gamma H g, exact up to rounding.
Then w <- base_step(w, d). Both differences are O(h) from the exact value (with opposite signs at first order);
the paper finds F-GR generalizes better than B-GR and DB, especially with large h. F-GR with h = gamma is
d = g(w + gamma g), SAM's step without normalization. `h` is a fixed step along the unnormalized gradient, as in
the formulas above (we could not re-check offline whether the paper's experiments scale h by 1/||g||).

Cost per step: forward and backward are 2 forward+backward passes (at w, then at w +- h g). Exact is 1 call of
the closure, which the loop counts as 1 pass, but it is not the cost of a pass: the double backward through the
gradient's graph costs about two more backward passes (by the paper's count for an L-layer net, as summarized
where we could read it: about 9L matrix products for DB, 6L for F-GR, 3L for a plain step, so 3 passes' worth),
and it keeps the gradient's graph in memory. On a CPU, a small conv net with BN (batch 64, 16x16), we measured
an exact step at 4.5x a plain SGD step and 2.4x an F-GR step. Compare methods on wall time, not on `passes`,
when `exact` is among them.

Conventions:
- weight decay by the base optimizer by default (the paper trains with SGD, weight decay 1e-4 outside GR);
  `weight_decay_in_loss=true` regularizes the gradient of L + wd/2 ||w||² (every pass's gradient gets wd·w; in
  exact, the penalty is on ||g + wd w||², so H + wd·I multiplies it);
- BN running statistics are updated by the first pass only (the loop's convention); the pass at w +- h g uses its
  own batch statistics;
- gradient clipping (`trainer.grad_clip`) clips each pass's gradient before the difference is taken (as for
  every multi-pass method), which changes the difference when it bites; with exact it scales g in place after
  the graph was built, so d becomes c·(g + gamma H g) with c the clip factor of g;
- `exact` needs a closure that takes `create_graph` (the loop's does; runner/step.py);
- no reference code to compare with: the paper's repository (ryokarakida/gradient_regularization) holds a
  README saying "to appear" only, so this follows the paper's equations.
"""
import inspect
import warnings
from dataclasses import dataclass

import torch

from runner.config import check
from runner.optim import OPTIMIZERS, Wraps
from runner.optim.params import LR, Betas, Momentum, Nesterov, WeightDecay
from runner.optim.perturbation import EngineParams, PerturbationOptimizer, engine_kwargs

METHODS = ("forward", "backward", "exact")


class GNR(PerturbationOptimizer):
    """Gradient-norm regularization: `gamma` (penalty coefficient), `h` (finite-difference step), `method`."""

    def __init__(self, params, base, gamma: float = 0.1, h: float = 0.1, method: str = "forward", **kwargs):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if gamma < 0 or h <= 0:
            raise ValueError(f"need gamma >= 0 and h > 0, got gamma={gamma}, h={h}")
        super().__init__(params, base, dict(gamma=gamma, h=h), **kwargs)
        self.method = method

    def step(self, closure=None):
        closure = self._checked(closure)
        if self.method == "exact":
            return self._exact_step(closure)
        sign = 1.0 if self.method == "forward" else -1.0
        loss = closure()                                                  # g(w)
        self.after_pass()
        groups = self._groups()
        g0 = [torch._foreach_mul([p.grad for p in ps], 1.0) for ps, _ in groups]        # a copy of g(w)
        self.perturb([torch._foreach_mul(g, sign * group["h"]) if g else [] for g, (_, group) in zip(g0, groups)])
        closure()                                                         # g(w +- h g)
        self.after_pass()
        with torch.no_grad():
            for (ps, group), g in zip(groups, g0):                        # d = g + sign gamma/h (g(w +- h g) - g)
                if ps:
                    grads = [p.grad for p in ps]
                    torch._foreach_sub_(grads, g)
                    torch._foreach_mul_(grads, sign * group["gamma"] / group["h"])
                    torch._foreach_add_(grads, g)
        self.commit()
        return loss

    def _exact_step(self, closure):
        """One forward+backward keeping the graph, then the gradient of gamma/2 ||g||² through it."""
        if not _takes_create_graph(closure):
            raise RuntimeError("GNR method=exact needs a closure taking create_graph=True (double backprop), as the "
                               "training loop's closure does (runner/step.py); this one takes no such argument")
        with warnings.catch_warnings():   # torch warns of the p <-> p.grad cycle: broken below (fresh p.grad)
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loss = closure(create_graph=True)
        groups = self._groups()
        params = [p for ps, _ in groups for p in ps]
        grads = [p.grad for p in params]                                  # g, with its graph
        if self.loss_weight_decay:                                        # gradient of L + wd/2 ||w||²
            grads = [g + self.loss_weight_decay * p for g, p in zip(grads, params)]
        penalty, i = 0.0, 0
        for ps, group in groups:
            if ps:
                penalty = penalty + 0.5 * group["gamma"] * sum((g * g).sum() for g in grads[i:i + len(ps)])
            i += len(ps)
        if torch.is_tensor(penalty) and penalty.requires_grad:
            hg = torch.autograd.grad(penalty, params, allow_unused=True)   # gamma H g
        else:                                                             # gamma = 0, or g constant in w
            hg = [None] * len(params)
        with torch.no_grad():
            for p, g, extra in zip(params, grads, hg):                    # a fresh tensor: no graph is kept
                p.grad = g.detach() + extra if extra is not None else g.detach().clone()
        self.finite()
        self.commit()
        return loss.detach()


def _takes_create_graph(closure) -> bool:
    try:
        parameters = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "create_graph" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@dataclass
class GNRParams(Wraps, EngineParams, Betas, Nesterov, Momentum, WeightDecay, LR):
    gamma: float = 0.1        # penalty coefficient: L + gamma/2 ||grad L||²
    h: float = 0.1            # finite-difference step along the gradient (the paper's epsilon)
    method: str = "forward"   # forward (F-GR) | backward (B-GR) | exact (double backprop)
    lr: float = 0.1
    weight_decay: float = 1e-4

    def check(self):
        check(self.gamma >= 0, "gamma", self.gamma, ">= 0")
        check(self.h > 0, "h", self.h, "> 0")
        check(self.method in METHODS, "method", self.method, " | ".join(METHODS))


@OPTIMIZERS.register("gnr", GNRParams, "gradient-norm regularization (Karakida et al. 2023): L + gamma/2 ||g||² by "
                     "forward or backward finite differences (2 passes) or double backprop (1 call costing 3+ passes)",
                     passes_per_step=lambda p: 1 if p.method == "exact" else 2)
def gnr(params, gamma, h, method, base, weight_decay_in_loss, skip_nonfinite, **shared):
    """Gradient-norm regularization over the validated base optimizer (`shared` were handed to it)."""
    return GNR(params, gamma=gamma, h=h, method=method, **engine_kwargs(base, weight_decay_in_loss, skip_nonfinite))
