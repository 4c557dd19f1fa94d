"""SAM: Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021); ASAM (Kwon et al. 2021).

Update, per step with gradient g(w) of the batch loss L:
    e(w) = rho * T² g / ||T g||,  T = I (SAM) or diag(|w|) (ASAM, `adaptive=True`)
    w   <- base_step(w, g(w + e(w)))
Cost: 2 forward+backward passes per step (the closure is called twice).

Conventions (davda54/sam, the reference PyTorch port):
- the gradient norm is over all parameters of all groups; epsilon 1e-12 is added to the norm, not inside it;
- weight decay is applied by the base optimizer to g(w + e(w)) (coupled L2 for SGD), not in the perturbation;
- after the second pass the weights are restored by copy, not by subtracting e(w);
- BN running statistics: left to the caller's closure; the runner's loop freezes them in the second pass
  (`runner.optim.bn.FrozenBNStats`), so they are updated by the first pass only;
- the loss returned by `step` is the one at w (first pass), as the closure protocol expects.
`state_dict()` is the base optimizer's (momentum etc.); the saved weights are scratch, never checkpointed.
"""
import torch

from runner import paramspace


class SAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, **base_kwargs):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: lr schedules reach the base
        self.defaults.update(self.base_optimizer.defaults)
        self._saved_w: list[torch.Tensor] | None = None

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self) -> None:
        """Climb to w + e(w). Foreach ops: a few kernels for all tensors, not a few per tensor."""
        params = self._params()
        self._saved_w = paramspace.snapshot(params, into=self._saved_w if self._saved_w is not None
                                            and len(self._saved_w) == len(params) else None)
        groups = [([p for p in g["params"] if p.grad is not None], g) for g in self.param_groups]
        scaled = []                                                             # T g, per group
        for ps, g in groups:
            grads = [p.grad for p in ps]
            scaled += torch._foreach_mul(torch._foreach_abs(ps), grads) if g["adaptive"] and ps else grads
        norm = paramspace.global_norm(scaled)                                   # ||T g||
        for ps, g in groups:
            if not ps:
                continue
            grads = [p.grad for p in ps]
            e_w = torch._foreach_mul(torch._foreach_mul(ps, ps), grads) if g["adaptive"] else grads  # T² g
            e_w = torch._foreach_mul(e_w, g["rho"] / (norm + 1e-12))            # rho T² g / ||T g||
            torch._foreach_add_(ps, e_w)

    @torch.no_grad()
    def second_step(self) -> None:
        """Back to w; step with g(w + e(w))."""
        paramspace.restore(self._params(), self._saved_w)
        self.base_optimizer.step()

    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("SAM needs a closure: step(closure) where closure zeroes grads, runs forward + "
                               "backward and returns the loss (torch's closure protocol)")
        closure = torch.enable_grad()(closure)
        loss = closure()        # g(w)
        self.first_step()       # w + e(w)
        closure()               # g(w + e(w))
        self.second_step()      # w <- base_step(w, g(w + e(w)))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
