"""⊥Grad / OrthoGrad: against pytorch_optimizer.OrthoGrad (the paper's rule, float64) and a hand-written step;
the SGD update is orthogonal to w; both config spellings (the CLI runs: tests/test_every_method.py)."""
import copy

import pytest
import torch
import torch.nn as nn

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.orthograd import OrthoGrad, orthogonalize_
from tiny import closure_for, tiny_problem


def adamw(groups, **kw):
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, **kw)


def test_matches_pytorch_optimizer_orthograd_over_adamw():
    """12 steps of ⊥AdamW (with weight decay, so the base's own terms are exercised) against pytorch_optimizer."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    ours = OrthoGrad(model.parameters(), base=adamw)
    ref = pytorch_optimizer.OrthoGrad(adamw(twin.parameters()))
    worst = 0.0
    for _ in range(12):
        loss = ours.step(closure_for(model, ours, x, y))
        ref_loss = ref.step(closure_for(twin, ref, x, y))
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12)
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters())))
    assert worst < 1e-13


def test_hand_step_and_sgd_update_is_orthogonal_to_w():
    """g_perp = g - (w·g)/(w·w) w, rescaled to ||g||, per tensor; plain SGD then moves each tensor orthogonally to
    itself, by lr·||g||."""
    lr = 0.1
    model, x, y = tiny_problem()
    w0 = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = [p.grad.detach().clone() for p in model.parameters()]
    expected = []
    for w, gi in zip(w0, g):
        wf, gf = w.flatten(), gi.flatten()
        perp = gf - (wf @ gf) / (wf @ wf) * wf
        expected.append(w - lr * (perp * gf.norm() / perp.norm()).view_as(w))

    optimizer = OrthoGrad(model.parameters(), base=lambda groups: torch.optim.SGD(groups, lr=lr))
    optimizer.step(closure_for(model, optimizer, x, y))
    for p, w, e, gi in zip(model.parameters(), w0, expected, g):
        torch.testing.assert_close(p.detach(), e, atol=1e-14, rtol=0)
        update = (p.detach() - w).flatten()
        assert abs(update @ w.flatten()) < 1e-14 * update.norm() * w.norm()       # orthogonal to w
        assert update.norm().item() == pytest.approx(lr * gi.norm().item(), rel=1e-12)  # norm of g kept


def test_zero_weight_tensor_keeps_its_gradient():
    """w = 0 (e.g. a zero-initialized bias) has no direction to remove: the gradient passes unchanged."""
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p.grad = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    g = p.grad.clone()
    orthogonalize_([p])
    torch.testing.assert_close(p.grad, g, atol=1e-15, rtol=0)


def test_state_dict_is_the_base_optimizers_and_a_plain_checkpoint_loads():
    model, x, y = tiny_problem()
    plain = adamw(model.parameters())
    plain.step(closure_for(model, plain, x, y))
    wrapped = OrthoGrad(model.parameters(), base=adamw)
    wrapped.load_state_dict(plain.state_dict())
    assert wrapped.state_dict()["state"][0]["step"] == plain.state_dict()["state"][0]["step"]
    wrapped.param_groups[0]["lr"] = 0.5  # a scheduler writes the shared groups: the base sees it
    assert wrapped.base_optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("spelling", [{"base": "adamw", "lr": 0.02, "betas": [0.9, 0.95]},
                                      {"base": {"name": "adamw", "lr": 0.02, "betas": [0.9, 0.95]}},
                                      {"base": {"name": "adamw"}, "lr": 0.02, "betas": [0.9, 0.95]}])
def test_flat_and_nested_spellings_configure_the_base(spelling):
    choice = OPTIMIZERS.validate({"name": "orthograd", **spelling})
    assert capabilities(choice).passes_per_step == 1
    model, x, y = tiny_problem()
    optimizer = build_optimizer(choice, model.parameters())
    assert isinstance(optimizer.base_optimizer, torch.optim.AdamW)
    group = optimizer.base_optimizer.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (0.02, (0.9, 0.95), 0.0)
    calls = []
    optimizer.step(closure_for(model, optimizer, x, y, calls))
    assert len(calls) == 1  # one forward+backward pass


def test_sgd_base_from_the_flat_spelling():
    choice = OPTIMIZERS.validate({"name": "orthograd", "base": "sgd", "lr": 0.3, "momentum": 0.0})
    model, _, _ = tiny_problem()
    group = build_optimizer(choice, model.parameters()).base_optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.0, 0.0)
