"""Lion against a hand-written float64 step of the official rule (google/automl lion_pytorch.py) and against
pytorch_optimizer's Lion (identical to it: decoupled weight decay scaled by lr); as the base of SAM (its CLI runs
on digits and the grokking task: tests/test_every_method.py)."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.lion import Lion
from runner.optim.sam import SAM
from tiny import closure_for, tiny_problem

LR, BETAS, WD = 1e-2, (0.9, 0.99), 0.3


def run(model, optimizer, x, y, steps):
    for _ in range(steps):
        optimizer.step(closure_for(model, optimizer, x, y))
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def hand_lion(model, x, y, steps, lr=LR, betas=BETAS, wd=WD):
    """The official rule, written out: decay, sign of the interpolation, then the momentum."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    m = {k: torch.zeros_like(v) for k, v in w.items()}
    g_fn = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))
    for _ in range(steps):
        g = g_fn(w)
        for k in w:
            w[k] = w[k] * (1 - lr * wd)
            w[k] = w[k] - lr * torch.sign(betas[0] * m[k] + (1 - betas[0]) * g[k])
            m[k] = betas[1] * m[k] + (1 - betas[1]) * g[k]
    return w


def test_lion_matches_the_hand_written_official_step():
    model, x, y = tiny_problem()
    expected = hand_lion(copy.deepcopy(model), x, y, steps=12)
    got = run(model, Lion(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD), x, y, steps=12)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-14, rtol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_lion_matches_pytorch_optimizer(foreach):
    from pytorch_optimizer import Lion as ReferenceLion  # oracle only; the project never imports it

    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    got = run(model, Lion(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD), x, y, steps=12)
    reference = ReferenceLion(twin.parameters(), lr=LR, betas=BETAS, weight_decay=WD, foreach=foreach)
    expected = run(twin, reference, x, y, steps=12)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-12, rtol=0)  # lerp vs mul+add: rounding only


def test_every_coordinate_moves_by_lr_without_weight_decay():
    model, x, y = tiny_problem()
    optimizer = Lion(model.parameters(), lr=LR)
    for _ in range(3):
        start = [p.detach().clone() for p in model.parameters()]
        optimizer.step(closure_for(model, optimizer, x, y))
        for a, b in zip(start, model.parameters()):
            torch.testing.assert_close((b - a).abs(), torch.full_like(a, LR), atol=1e-15, rtol=0)


def test_config_defaults_are_the_official_ones():
    choice = OPTIMIZERS.validate({"name": "lion"})
    group = build_optimizer(choice, tiny_problem()[0].parameters()).param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.9, 0.99), 0.0)
    assert capabilities(choice).passes_per_step == 1


def test_state_dict_roundtrip():
    model, x, y = tiny_problem()
    optimizer = Lion(model.parameters(), lr=LR, weight_decay=WD)
    run(model, optimizer, x, y, steps=2)
    twin_model = copy.deepcopy(model)
    twin = Lion(twin_model.parameters(), lr=LR, weight_decay=WD)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    a, b = run(model, optimizer, x, y, steps=2), run(twin_model, twin, x, y, steps=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sam_over_lion_from_config_and_rho_zero_is_lion():
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "sam", "base": {"name": "lion", "betas": [0.9, 0.99]}, "lr": 1e-4,
                                  "weight_decay": 0.1})
    optimizer = build_optimizer(choice, model.parameters())
    assert isinstance(optimizer.base_optimizer, Lion)
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]) == (1e-4, 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    run(model, optimizer, x, y, steps=2)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # SAM with rho = 0 takes Lion's step exactly (the base reads its hyperparameters from the shared groups)
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    a = run(model, SAM(model.parameters(), Lion, rho=0.0, lr=LR, betas=BETAS, weight_decay=WD), x, y, steps=4)
    b = run(twin, Lion(twin.parameters(), lr=LR, betas=BETAS, weight_decay=WD), x, y, steps=4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_runs_under_sam(run_cli, tmp_path):
    """Lion alone on digits and on the grokking task: tests/test_every_method.py."""
    result = run_cli("optimizer=sam", "optimizer.base=lion", "optimizer.lr=1e-4", "trainer.epochs=1",
                     f"hydra.run.dir={tmp_path / 'sam'}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "sam" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["passes_per_step_measured"] == 2
