"""The perturbation-step engine shared by every SAM-style method.

One step, with the loop's closure (runner/step.py) and a base optimizer that takes the actual step:
    g(w)        = closure()                       # first pass; BN running statistics are updated here only
    save w; w  <- w + e(w)                        # e(w) is the only thing a method defines (`perturbation`)
    g(w + e(w)) = closure()                       # later passes leave BN running statistics alone
    w  <- saved w (by copy: exact, unlike subtracting e(w))
    w  <- base_step(w, g(w + e(w)))
Cost: 2 forward+backward passes per step. `state_dict()` is the base optimizer's (momentum etc.): the saved
weights are scratch, never checkpointed. The loss returned by `step` is the one at w, as torch's closure
protocol expects. Parameter groups are shared with the base, so lr schedules reach it.
"""
from __future__ import annotations

from typing import Callable

import torch

from runner import paramspace


class PerturbationOptimizer(torch.optim.Optimizer):
    """Subclasses define `perturbation(groups)`: e(w) per group, from the gradients at w."""

    def __init__(self, params, base: Callable | type[torch.optim.Optimizer], defaults: dict, **base_kwargs):
        """`base`: a factory `base(param_groups) -> Optimizer`, or an optimizer class taking `**base_kwargs`."""
        super().__init__(params, dict(defaults, **base_kwargs))
        self._method_defaults = dict(defaults)  # e.g. rho, adaptive: kept in the shared param groups
        factory = (lambda groups: base(groups, **base_kwargs)) if isinstance(base, type) else base
        self.base_optimizer = factory(self.param_groups)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: lr schedules reach the base
        self.defaults.update(self.base_optimizer.defaults)
        self._saved_w: list[torch.Tensor] | None = None

    def perturbation(self, groups: list[tuple[list[torch.Tensor], dict]]) -> list[list[torch.Tensor]]:
        """e(w) for each (params with a gradient, param group), in the same order; grads are g(w)."""
        raise NotImplementedError

    def _groups(self) -> list[tuple[list[torch.Tensor], dict]]:
        return [([p for p in g["params"] if p.grad is not None], g) for g in self.param_groups]

    @torch.no_grad()
    def ascend(self) -> None:
        """Save w, climb to w + e(w). Foreach ops: a few kernels for all tensors, not a few per tensor."""
        groups = self._groups()
        params = [p for ps, _ in groups for p in ps]
        reuse = self._saved_w is not None and len(self._saved_w) == len(params)
        self._saved_w = paramspace.snapshot(params, into=self._saved_w if reuse else None)
        for (ps, _), e_w in zip(groups, self.perturbation(groups)):
            if ps:
                torch._foreach_add_(ps, e_w)                                    # w + e(w)

    @torch.no_grad()
    def descend(self) -> None:
        """Back to w; step with g(w + e(w))."""
        paramspace.restore([p for ps, _ in self._groups() for p in ps], self._saved_w)
        self.base_optimizer.step()

    def step(self, closure=None):
        if closure is None:
            raise RuntimeError(f"{type(self).__name__} needs a closure: step(closure) where closure zeroes grads, "
                               "runs forward + backward and returns the loss (torch's closure protocol)")
        closure = torch.enable_grad()(closure)
        loss = closure()        # g(w)
        self.ascend()           # w + e(w)
        closure()               # g(w + e(w))
        self.descend()          # w <- base_step(w, g(w + e(w)))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        """The base optimizer's state; a checkpoint of the plain base optimizer (SGD -> SAM) works too: the
        method's own hyperparameters (rho, ...) then come from this optimizer's config."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key, value in self._method_defaults.items():
                group.setdefault(key, value)
