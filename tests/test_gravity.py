"""Gravity (runner/optim/gravity.py) in float64 against pytorch_optimizer's Gravity (same initial velocity: the same
seeded draws), against a hand-written step from the paper's algorithm, the velocity's initialization, a zero
gradient, a checkpoint resume, SAM over Gravity (its CLI runs on digits and the grokking task:
tests/test_every_method.py)."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.gravity import Gravity
from tiny import tiny_problem


def closure_for(model, optimizer, x, y):
    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("lr, alpha, beta", [(0.1, 0.01, 0.9), (0.05, 0.1, 0.5), (0.2, 0.0, 0.0)])
def test_matches_pytorch_optimizer(foreach, lr, alpha, beta):
    from pytorch_optimizer import Gravity as Reference

    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    torch.manual_seed(123)
    ours = Gravity(model.parameters(), lr=lr, alpha=alpha, beta=beta)   # draws V_0 now, in parameter order
    torch.manual_seed(123)
    ref = Reference(twin.parameters(), lr=lr, alpha=alpha, beta=beta, foreach=foreach)  # at its first step
    worst = 0.0
    for _ in range(12):
        ours.step(closure_for(model, ours, x, y))
        ref.step(closure_for(twin, ref, x, y))
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters())))
    assert worst < 1e-12, worst
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(ours.state[p]["v"], ref.state[q]["v"], rtol=0, atol=1e-12)


def test_matches_the_papers_algorithm_written_out():
    lr, alpha, beta, steps = 0.1, 0.01, 0.9, 8
    model, x, y = tiny_problem()
    optimizer = Gravity(model.parameters(), lr=lr, alpha=alpha, beta=beta)
    names = [k for k, _ in model.named_parameters()]
    w = {k: p.detach().clone() for k, p in model.named_parameters()}
    V = {k: optimizer.state[p]["v"].clone() for k, p in model.named_parameters()}   # V_0
    g_fn = grad(lambda params: nn.functional.cross_entropy(functional_call(model, params, (x,)), y))
    for t in range(1, steps + 1):
        g = g_fn(w)
        beta_hat = (beta * t + 1) / (t + 2)
        for k in names:
            m = 1.0 / g[k].abs().max()                                   # per tensor ("layer")
            zeta = g[k] / (1 + (g[k] / m) ** 2)
            V[k] = beta_hat * V[k] + (1 - beta_hat) * zeta
            w[k] = w[k] - lr * V[k]
        optimizer.step(closure_for(model, optimizer, x, y))
    worst = max((p.detach() - w[k]).abs().max().item() for k, p in model.named_parameters())
    assert worst < 1e-13, worst
    assert optimizer.param_groups[0]["t"] == steps


def test_initial_velocity_is_normal_with_std_alpha_over_lr():
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(200_000, dtype=torch.float64))
    optimizer = Gravity([p], lr=0.05, alpha=0.02)
    v = optimizer.state[p]["v"]
    assert v.mean().item() == pytest.approx(0.0, abs=0.005)
    assert v.std().item() == pytest.approx(0.02 / 0.05, rel=0.01)
    q = nn.Parameter(torch.ones(3))
    assert torch.equal(Gravity([q], lr=0.1, alpha=0.0).state[q]["v"], torch.zeros(3))   # alpha 0: V_0 = 0


def test_zero_gradient_only_decays_the_velocity():
    torch.manual_seed(0)
    p = nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = Gravity([p], lr=0.1, alpha=0.01, beta=0.9)
    v0 = optimizer.state[p]["v"].clone()
    p.grad = torch.zeros_like(p)
    optimizer.step()
    beta_1 = (0.9 * 1 + 1) / 3
    assert torch.isfinite(p).all()
    assert torch.allclose(optimizer.state[p]["v"], beta_1 * v0, rtol=0, atol=1e-16)
    assert torch.allclose(p.detach(), 1 - 0.1 * beta_1 * v0, rtol=0, atol=1e-16)


def test_a_resumed_optimizer_continues_exactly():
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    torch.manual_seed(1)
    whole = Gravity(model.parameters())
    for _ in range(6):
        whole.step(closure_for(model, whole, x, y))
    torch.manual_seed(1)
    first = Gravity(twin.parameters())
    for _ in range(3):
        first.step(closure_for(twin, first, x, y))
    state = copy.deepcopy(first.state_dict())
    torch.manual_seed(999)                                              # another V_0: replaced by the checkpoint's
    second = Gravity(twin.parameters())
    second.load_state_dict(state)
    for _ in range(3):
        second.step(closure_for(twin, second, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_as_the_base_of_sam():
    """SAM over Gravity: Gravity's step taken with g(w + e(w)), e = rho g / ||g||."""
    rho, lr = 0.05, 0.1
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "sam", "base": "gravity", "rho": rho, "lr": lr, "weight_decay": 0.0})
    assert capabilities(choice).passes_per_step == 2
    torch.manual_seed(5)
    sam = build_optimizer(choice, model.parameters())
    assert isinstance(sam.base_optimizer, Gravity) and sam.param_groups[0]["lr"] == lr
    names = [k for k, _ in model.named_parameters()]
    w = {k: p.detach().clone() for k, p in model.named_parameters()}
    V = {k: sam.base_optimizer.state[p]["v"].clone() for k, p in model.named_parameters()}
    g_fn = grad(lambda params: nn.functional.cross_entropy(functional_call(model, params, (x,)), y))
    for t in range(1, 4):
        g = g_fn(w)
        norm = torch.sqrt(sum((g[k] ** 2).sum() for k in names))
        g_sam = g_fn({k: w[k] + rho * g[k] / (norm + 1e-12) for k in names})
        beta_hat = (0.9 * t + 1) / (t + 2)
        for k in names:
            gk = g_sam[k]
            zeta = gk / (1 + (gk * gk.abs().max()) ** 2)
            V[k] = beta_hat * V[k] + (1 - beta_hat) * zeta
            w[k] = w[k] - lr * V[k]
        sam.step(closure_for(model, sam, x, y))
    worst = max((p.detach() - w[k]).abs().max().item() for k, p in model.named_parameters())
    assert worst < 1e-12, worst


def test_schema_defaults_and_ranges():
    from runner.config import ConfigError

    assert OPTIMIZERS.validate({"name": "gravity"}).kwargs == {"lr": 0.1, "alpha": 0.01, "beta": 0.9}
    assert capabilities(OPTIMIZERS.validate({"name": "gravity"})).passes_per_step == 1
    for bad in ({"beta": 1.0}, {"alpha": -0.1}, {"lr": 0.0}):
        with pytest.raises(ConfigError):
            OPTIMIZERS.validate({"name": "gravity", **bad})
