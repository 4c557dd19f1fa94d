"""Adam without weight decay against torch's Adam formula written out in float64 (eps added to sqrt(v_hat)); no
weight_decay field; as the base of SAM (its CLI runs on digits and the grokking task: tests/test_every_method.py)."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.config import ConfigError
from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from tiny import tiny_problem

LR, BETAS, EPS = 1e-2, (0.8, 0.99), 1e-3  # eps large enough that its placement matters in float64


def run(model, optimizer, x, y, steps):
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def hand_adam(model, x, y, steps, lr=LR, betas=BETAS, eps=EPS):
    (b1, b2), w = betas, {k: v.detach().clone() for k, v in model.named_parameters()}
    m = {k: torch.zeros_like(v) for k, v in w.items()}
    v = {k: torch.zeros_like(u) for k, u in w.items()}
    g_fn = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))
    for t in range(1, steps + 1):
        g = g_fn(w)
        for k in w:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            w[k] = w[k] - lr * m_hat / (v_hat.sqrt() + eps)
    return w


def test_adam_matches_the_hand_written_formula():
    model, x, y = tiny_problem()
    expected = hand_adam(copy.deepcopy(model), x, y, steps=6)
    choice = OPTIMIZERS.validate({"name": "adam", "lr": LR, "betas": list(BETAS), "eps": EPS})
    got = run(model, build_optimizer(choice, model.parameters()), x, y, steps=6)
    assert max((got[k] - expected[k]).abs().max().item() for k in got) < 1e-13


def test_no_weight_decay_field_and_torch_defaults():
    choice = OPTIMIZERS.validate({"name": "adam"})
    optimizer = build_optimizer(choice, tiny_problem()[0].parameters())
    assert isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert capabilities(choice).passes_per_step == 1
    with pytest.raises(ConfigError, match="weight_decay"):
        OPTIMIZERS.validate({"name": "adam", "weight_decay": 0.1})


def test_sam_over_adam_does_not_hand_it_weight_decay():
    model, x, y = tiny_problem()
    optimizer = build_optimizer(OPTIMIZERS.validate({"name": "sam", "base": "adam", "lr": 1e-3,
                                                     "weight_decay": 0.1}), model.parameters())
    assert type(optimizer.base_optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["weight_decay"] == 0.0  # the wrapper's flat weight_decay is not adam's
    before = [p.detach().clone() for p in model.parameters()]
    run(model, optimizer, x, y, steps=2)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
