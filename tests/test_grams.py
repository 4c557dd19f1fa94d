"""Grams against a hand-written float64 step with the official release's epsilon placement (grams-pytorch 0.0.2: eps
added to sqrt(v) of the uncorrected v, bias corrections in the step size), and pytorch_optimizer's Grams shown to
differ from it only by where eps goes; as the base of SAM (its CLI runs on digits and the grokking task:
tests/test_every_method.py)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.grams import Grams
from runner.optim.sam import SAM
from tiny import closure_for, tiny_problem

LR, BETAS, WD = 1e-2, (0.9, 0.999), 0.1


def run(model, optimizer, x, y, steps, before_step=None):
    for t in range(1, steps + 1):
        if before_step is not None:
            before_step(optimizer, t)
        optimizer.step(closure_for(model, optimizer, x, y))
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def hand_grams(model, x, y, steps, eps, lr=LR, betas=BETAS, wd=WD):
    """The official release's step, written out."""
    (b1, b2), w = betas, {k: v.detach().clone() for k, v in model.named_parameters()}
    m = {k: torch.zeros_like(v) for k, v in w.items()}
    v = {k: torch.zeros_like(u) for k, u in w.items()}
    g_fn = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))
    for t in range(1, steps + 1):
        g = g_fn(w)
        step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for k in w:
            w[k] = w[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            w[k] = w[k] - step_size * torch.sign(g[k]) * m[k].abs() / (v[k].sqrt() + eps)
    return w


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_grams_matches_the_hand_written_official_step(eps):
    model, x, y = tiny_problem()
    expected = hand_grams(copy.deepcopy(model), x, y, steps=12, eps=eps)
    got = run(model, Grams(model.parameters(), lr=LR, betas=BETAS, eps=eps, weight_decay=WD), x, y, steps=12)
    assert max_diff(got, expected) < 1e-13


def test_pytorch_optimizer_differs_only_by_the_eps_placement():
    """pytorch_optimizer adds eps to sqrt(v_hat): with eps = 0 it is the same rule, and with its eps set at step t
    to eps / sqrt(1 - beta2^t) (the official eps moved inside the bias correction) the same trajectory; with
    the same eps it is not."""
    from pytorch_optimizer import Grams as ReferenceGrams  # oracle only; the project never imports it

    eps = 1e-3  # large enough that the placement shows in float64
    model, x, y = tiny_problem()

    def ours(e):
        twin = copy.deepcopy(model)
        return run(twin, Grams(twin.parameters(), lr=LR, betas=BETAS, eps=e, weight_decay=WD), x, y, steps=12)

    def reference(e, before_step=None):
        twin = copy.deepcopy(model)
        optimizer = ReferenceGrams(twin.parameters(), lr=LR, betas=BETAS, eps=e, weight_decay=WD)
        return run(twin, optimizer, x, y, steps=12, before_step=before_step)

    def moved_eps(optimizer, t):
        for group in optimizer.param_groups:
            group["eps"] = eps / math.sqrt(1 - BETAS[1] ** t)

    assert max_diff(ours(0.0), reference(0.0)) < 1e-13
    assert max_diff(ours(eps), reference(eps, moved_eps)) < 1e-13
    assert max_diff(ours(eps), reference(eps)) > 1e-5   # the same eps in both places: different trajectories


def test_gradient_is_left_alone_and_steps_count_per_parameter():
    model, x, y = tiny_problem()
    first, second = model[0].weight, model[2].weight
    optimizer = Grams([first, second], lr=LR, weight_decay=WD)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    second.grad = None                                    # the second parameter has no gradient at step 1
    g = first.grad.clone()
    optimizer.step()
    assert torch.equal(first.grad, g)                     # the official release overwrites it; we do not
    assert optimizer.state[first]["step"] == 1 and second not in optimizer.state
    lone = copy.deepcopy(second)                          # the second parameter's first step is its t = 1
    lone_optimizer = Grams([lone], lr=LR, weight_decay=WD)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    lone.grad = second.grad.clone()
    optimizer.step()
    lone_optimizer.step()
    assert optimizer.state[first]["step"] == 2 and optimizer.state[second]["step"] == 1
    torch.testing.assert_close(second.detach(), lone.detach(), atol=0, rtol=0)


def test_config_defaults_are_the_official_ones():
    choice = OPTIMIZERS.validate({"name": "grams"})
    group = build_optimizer(choice, tiny_problem()[0].parameters()).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-6, 0.0)
    assert capabilities(choice).passes_per_step == 1


def test_sam_over_grams_from_config_and_rho_zero_is_grams():
    model, x, y = tiny_problem()
    optimizer = build_optimizer(OPTIMIZERS.validate({"name": "sam", "base": "grams", "lr": 1e-3}),
                                model.parameters())
    assert isinstance(optimizer.base_optimizer, Grams) and optimizer.param_groups[0]["eps"] == 1e-6
    before = [p.detach().clone() for p in model.parameters()]
    run(model, optimizer, x, y, steps=2)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    a = run(model, SAM(model.parameters(), Grams, rho=0.0, lr=LR, weight_decay=WD), x, y, steps=4)
    b = run(twin, Grams(twin.parameters(), lr=LR, weight_decay=WD), x, y, steps=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
