"""FAD (runner/optim/fad.py) against a hand-written float64 step from its equations (no reference code exists); its
special cases (SAM, the base optimizer); the finite-difference estimate of grad ||g||; its pass count; both bases;
BN statistics from the first pass only (its CLI runs on digits and the grokking task: tests/test_every_method.py)."""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.fad import FAD
from runner.optim.sam import SAM
from tiny import closure_for, tiny_problem

HP = dict(rho=0.2, alpha=0.7, beta=0.6)


def norm(v: dict) -> torch.Tensor:
    return torch.sqrt(sum((t ** 2).sum() for t in v.values()))


def along(w: dict, v: dict, r: float) -> dict:
    """w + r v / (||v|| + 1e-12)."""
    n = norm(v)
    return {k: w[k] + r * v[k] / (n + 1e-12) for k in w}


def fad_direction(g_fn, w, rho, alpha, beta):
    """grad of L + alpha R0 + beta R1, estimated as in fad.py's module docstring."""
    g0 = g_fn(w)
    g1 = g_fn(along(w, g0, rho))                           # R0's adversary: grad R0 ~ g1 - g0
    f = {k: g1[k] - g0[k] for k in w}                      # ~ rho grad ||g||(w)
    w1 = along(w, f, rho)                                  # R1's adversary
    g2 = g_fn(w1)
    g3 = g_fn(along(w1, g2, rho))                          # grad R1 ~ g3 - g2
    return {k: g0[k] + alpha * (g1[k] - g0[k]) + beta * (g3[k] - g2[k]) for k in w}


@pytest.mark.parametrize("wd_in_loss", [False, True])
def test_ten_steps_match_the_equations_in_float64(wd_in_loss):
    lr, momentum, wd = 0.1, 0.9, 1e-2
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    data_grad = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))
    # weight decay in the loss: every pass's gradient is g(v) + wd v at its own point v; else SGD's coupled L2
    g_fn = (lambda v: {k: t + wd * v[k] for k, t in data_grad(v).items()}) if wd_in_loss else data_grad
    buf, losses = {k: None for k in w}, []
    for _ in range(10):
        losses.append(nn.functional.cross_entropy(functional_call(model, w, (x,)), y).item())
        u = fad_direction(g_fn, w, **HP)
        for k in w:
            step = u[k] if wd_in_loss else u[k] + wd * w[k]
            buf[k] = step.clone() if buf[k] is None else momentum * buf[k] + step
            w[k] = w[k] - lr * buf[k]

    engine = dict(loss_weight_decay=wd, weight_decay=0.0) if wd_in_loss else dict(weight_decay=wd)
    optimizer = FAD(model.parameters(), torch.optim.SGD, **HP, lr=lr, momentum=momentum, **engine)
    for step in range(10):
        calls = []
        loss = optimizer.step(closure_for(model, optimizer, x, y, calls))
        assert len(calls) == 4                                          # 4 forward+backward passes a step
        assert loss.item() == pytest.approx(losses[step], abs=1e-12)    # the loss at w
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[k], atol=1e-10, rtol=0)


@pytest.mark.parametrize("alpha, beta, reference", [(1.0, 0.0, "sam"), (0.0, 0.0, "sgd")])
def test_special_cases_are_sam_and_the_base_optimizer(alpha, beta, reference):
    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()
    fad = FAD(model.parameters(), torch.optim.SGD, rho=0.1, alpha=alpha, beta=beta, lr=0.1, momentum=0.9)
    other = (SAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9) if reference == "sam"
             else torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9))
    for _ in range(3):
        fad.step(closure_for(model, fad, x, y, []))
        other.step(closure_for(twin, other, x, y, []))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)


def test_finite_difference_direction_tends_to_the_gradient_of_the_gradient_norm():
    """f / rho = (g(w + rho ĝ) - g(w)) / rho -> H ĝ = grad ||g|| (exact, by double backprop) as rho -> 0."""
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    g_fn = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))
    exact = grad(lambda p: norm(g_fn(p)))(w)
    errors = []
    for rho in (1e-1, 1e-2, 1e-3):
        g0, g1 = g_fn(w), g_fn(along(w, g_fn(w), rho))
        errors.append(norm({k: (g1[k] - g0[k]) / rho - exact[k] for k in w}) / norm(exact))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_builds_and_steps_over_both_bases(base):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "fad", "base": base, "lr": 1e-2})
    optimizer = build_optimizer(choice, model.parameters())
    assert capabilities(choice).passes_per_step == 4
    assert isinstance(optimizer.base_optimizer, torch.optim.AdamW if base == "adamw" else torch.optim.SGD)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    optimizer.step(closure_for(model, optimizer, x, y, calls))
    assert len(calls) == 4 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_training_loop_updates_bn_running_stats_in_the_first_pass_only():
    from runner.train import Progress, TrainerConfig, train

    try:
        from tests.test_loop import Collect, loop_experiment
    except ImportError:
        from test_loop import Collect, loop_experiment

    torch.manual_seed(0)
    x = torch.rand(32, 1, 2, 2)
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 3))  # BN input does not depend on w
    experiment = loop_experiment(model, x, torch.randint(0, 3, (32,)), {"name": "fad", "lr": 0.1},
                                 TrainerConfig(epochs=1, progress=False), batch_size=32)
    progress = Progress()
    assert train(experiment, progress, Collect()) == "completed" and progress.passes == 4
    flat = x.view(32, 4)
    torch.testing.assert_close(model[1].running_mean, 0.1 * flat.mean(0))   # one update, momentum 0.1
    assert model[1].num_batches_tracked.item() == 1
