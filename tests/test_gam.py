"""GAM (runner/optim/gam.py) against a hand-written float64 step from the accelerated algorithm's equations, in both
beta conventions; its pass count; both bases; BN statistics from the first pass only (its CLI runs on digits and
the grokking task: tests/test_every_method.py)."""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.config import ConfigError
from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.gam import GAM
from runner.optim.sam import SAM
from tiny import closure_for, tiny_problem

HP = dict(rho=0.3, rho_prime=0.05, alpha=0.3, beta=0.4, gamma=0.5)


def norm(v: dict) -> torch.Tensor:
    return torch.sqrt(sum((t ** 2).sum() for t in v.values()))


def along(w: dict, v: dict, r: float) -> dict:
    """w + r v / (||v|| + 1e-12)."""
    n = norm(v)
    return {k: w[k] + r * v[k] / (n + 1e-12) for k in w}


def gam_direction(g_fn, w, rho, rho_prime, alpha, beta, gamma, convention):
    """The accelerated GAM step's direction, written from its equations (module docstring of gam.py)."""
    g0 = g_fn(w)
    g1 = g_fn(along(w, g0, rho_prime))                                  # SAM point
    h = {k: g1[k] - g0[k] for k in w}                                   # ~ rho' grad ||g||(w)
    w2 = along(w, h, rho)                                               # largest gradient norm in the ball
    g2 = g_fn(w2)
    g3 = g_fn(along(w2, g2, rho_prime))
    d = {k: alpha * g1[k] + (1 - alpha) * g3[k] for k in w}
    b0 = beta if convention == "paper" else 1.0                         # the code's g0 weight is 1
    s = {k: b0 * g0[k] + (1 - beta) * g2[k] for k in w}
    cosine = sum((s[k] * d[k]).sum() for k in w) / (norm(s) * norm(d) + 1e-12)
    s_perp = {k: s[k] - cosine * norm(s) * d[k] / (norm(d) + 1e-12) for k in w}
    return {k: d[k] - gamma * s_perp[k] for k in w}


@pytest.mark.parametrize("convention", ["paper", "code"])
def test_ten_steps_match_the_equations_in_float64(convention):
    lr, momentum, wd = 0.1, 0.9, 1e-2
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    g_fn = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))
    buf, losses = {k: None for k in w}, []
    for _ in range(10):
        losses.append(nn.functional.cross_entropy(functional_call(model, w, (x,)), y).item())
        u = gam_direction(g_fn, w, **HP, convention=convention)
        for k in w:                                                     # torch SGD: coupled L2, momentum
            step = u[k] + wd * w[k]
            buf[k] = step.clone() if buf[k] is None else momentum * buf[k] + step
            w[k] = w[k] - lr * buf[k]

    optimizer = GAM(model.parameters(), torch.optim.SGD, **HP, beta_convention=convention, lr=lr,
                    momentum=momentum, weight_decay=wd)
    for step in range(10):
        calls = []
        loss = optimizer.step(closure_for(model, optimizer, x, y, calls))
        assert len(calls) == 4                                          # 4 forward+backward passes a step
        assert loss.item() == pytest.approx(losses[step], abs=1e-12)    # the loss at w
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[k], atol=1e-10, rtol=0)


def test_the_two_beta_conventions_differ_and_agree_at_beta_one():
    """The code's s = g0 + (1 - beta) g2 and the paper's beta g0 + (1 - beta) g2 coincide only at beta = 1."""
    finals = {}
    for convention in ("paper", "code"):
        for beta in (0.4, 1.0):
            model, x, y = tiny_problem()
            opt = GAM(model.parameters(), torch.optim.SGD, **dict(HP, beta=beta), beta_convention=convention, lr=0.1)
            for _ in range(3):
                opt.step(closure_for(model, opt, x, y, []))
            finals[convention, beta] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (finals["paper", 0.4] - finals["code", 0.4]).abs().max() > 1e-4
    torch.testing.assert_close(finals["paper", 1.0], finals["code", 1.0], atol=1e-14, rtol=0)


def test_alpha_one_gamma_zero_is_sam_with_radius_rho_prime():
    """d = g1 = g(w + rho' ĝ0): SAM's gradient, whatever the first-order passes found."""
    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()
    gam = GAM(model.parameters(), torch.optim.SGD, rho=0.3, rho_prime=0.07, alpha=1.0, gamma=0.0, lr=0.1,
              momentum=0.9)
    sam = SAM(twin.parameters(), torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.9)
    for _ in range(3):
        gam.step(closure_for(model, gam, x, y, []))
        sam.step(closure_for(twin, sam, x, y, []))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_builds_and_steps_over_both_bases(base):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "gam", "base": base, "lr": 1e-2, "beta_convention": "code"})
    optimizer = build_optimizer(choice, model.parameters())
    assert capabilities(choice).passes_per_step == 4
    assert isinstance(optimizer.base_optimizer, torch.optim.AdamW if base == "adamw" else torch.optim.SGD)
    assert optimizer.beta_convention == "code" and optimizer.param_groups[0]["rho"] == 0.2
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    optimizer.step(closure_for(model, optimizer, x, y, calls))
    assert len(calls) == 4 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("node, key", [
    ({"name": "gam", "beta_convention": "both"}, "optimizer.beta_convention"),
    ({"name": "gam", "alpha": 1.5}, "optimizer.alpha"),
    ({"name": "gam", "rho_prime": 0.0}, "optimizer.rho_prime"),
])
def test_bad_values_are_one_clear_config_error(node, key):
    with pytest.raises(ConfigError) as err:
        OPTIMIZERS.validate(node)
    assert key in str(err.value)


def test_training_loop_updates_bn_running_stats_in_the_first_pass_only():
    from runner.train import Progress, TrainerConfig, train

    try:
        from tests.test_loop import Collect, loop_experiment
    except ImportError:
        from test_loop import Collect, loop_experiment

    torch.manual_seed(0)
    x = torch.rand(32, 1, 2, 2)
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 3))  # BN input does not depend on w
    experiment = loop_experiment(model, x, torch.randint(0, 3, (32,)), {"name": "gam", "lr": 0.1},
                                 TrainerConfig(epochs=1, progress=False), batch_size=32)
    progress = Progress()
    assert train(experiment, progress, Collect()) == "completed" and progress.passes == 4
    flat = x.view(32, 4)
    torch.testing.assert_close(model[1].running_mean, 0.1 * flat.mean(0))   # one update, momentum 0.1
    assert model[1].num_batches_tracked.item() == 1
