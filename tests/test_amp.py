"""AMP (adversarial model perturbation, Zheng et al. 2021; not mixed precision) against a hand-written float64 step
from the paper's Algorithm 1 / the released amp.py, its pass count, its bases, BN statistics and the CLI."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.amp import AMP
from runner.optim.bn import FrozenBNStats
from runner.step import StepClosure
from tiny import tiny_problem


def plain_closure(model, optimizer, x, y, calls):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        calls.append(1)
        return loss
    return closure


def reference_amp(model, x, y, steps, epsilon, inner_lr, inner_steps, lr, momentum, wd, wd_in_loss, clips):
    """The paper's Algorithm 1 as amp.py runs it, in float64, over torch's SGD (Nesterov, coupled L2).
    `clips` collects, per inner iteration and tensor, whether the ball's projection was active."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buf = {k: None for k in w}
    data_grad = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))

    def g_at(point):                                  # the gradient each pass sees
        g = data_grad(point)
        return {k: g[k] + wd * point[k] for k in g} if wd_in_loss else g

    for _ in range(steps):
        g = g_at(w)
        d = {k: torch.zeros_like(v) for k, v in w.items()}
        for _ in range(inner_steps):
            for k in w:
                d[k] = d[k] + inner_lr * g[k]                        # ascent on the deviation
                scale = epsilon / (torch.linalg.vector_norm(d[k]) + 1e-12)
                clips.append(bool(scale < 1))
                if scale < 1:
                    d[k] = d[k] * scale                              # back onto this tensor's ball
            g = g_at({k: w[k] + d[k] for k in w})                    # gradient at w + d
        for k in w:                                                  # SGD, Nesterov, L2 in the base
            step = g[k] + (0.0 if wd_in_loss else wd) * w[k]
            buf[k] = step.clone() if buf[k] is None else momentum * buf[k] + step
            w[k] = w[k] - lr * (step + momentum * buf[k])
    return w


@pytest.mark.parametrize("inner_steps, wd_in_loss", [(1, False), (3, False), (2, True)])
def test_ten_steps_match_the_papers_algorithm_in_float64(inner_steps, wd_in_loss):
    epsilon, inner_lr, lr, momentum, wd, steps = 0.08, 0.7, 0.1, 0.9, 1e-2, 10
    model, x, y = tiny_problem()
    clips = []
    expected = reference_amp(model, x, y, steps, epsilon, inner_lr, inner_steps, lr, momentum, wd, wd_in_loss, clips)
    assert any(clips) and not all(clips)     # the projection is active for some tensors and not for others
    base_wd = 0.0 if wd_in_loss else wd
    optimizer = AMP(model.parameters(), torch.optim.SGD, epsilon=epsilon, inner_lr=inner_lr, inner_steps=inner_steps,
                    loss_weight_decay=wd if wd_in_loss else 0.0, lr=lr, momentum=momentum, nesterov=True,
                    weight_decay=base_wd)
    for _ in range(steps):
        calls = []
        optimizer.step(plain_closure(model, optimizer, x, y, calls))
        assert len(calls) == 1 + inner_steps
    diff = max((p.detach() - expected[k]).abs().max().item() for k, p in model.named_parameters())
    assert diff < 1e-12, diff
    print(f"max |w - w_ref| after {steps} steps: {diff:.2e}")


def test_no_inner_steps_is_the_base_optimizer_at_one_pass():
    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()
    amp = AMP(model.parameters(), torch.optim.SGD, epsilon=0.5, inner_steps=0, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        calls = []
        amp.step(plain_closure(model, amp, x, y, calls))
        sgd.step(plain_closure(twin, sgd, x, y, []))
        assert len(calls) == 1
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_builds_over_both_bases_and_costs_one_plus_inner_steps_passes(base, inner_steps):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "amp", "base": base, "lr": 0.01, "inner_steps": inner_steps})
    optimizer = build_optimizer(choice, model.parameters())
    assert capabilities(choice).passes_per_step == 1 + inner_steps
    assert type(optimizer.base_optimizer).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[base]
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    loss = optimizer.step(plain_closure(model, optimizer, x, y, calls))
    assert len(calls) == 1 + inner_steps and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for p, b in zip(model.parameters(), before):   # restored exactly before the base step: the move is the step's
        assert (p.detach() - b).abs().max() < 0.1


def test_config_is_validated():
    from runner.config import ConfigError

    for node, key in [({"epsilon": -1.0}, "epsilon"), ({"inner_lr": -0.1}, "inner_lr"),
                      ({"inner_steps": -1}, "inner_steps")]:
        with pytest.raises(ConfigError) as err:
            OPTIMIZERS.validate({"name": "amp", **node})
        assert key in str(err.value)


def test_bn_running_statistics_come_from_the_first_pass_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    reference = copy.deepcopy(model)
    reference.train()
    with torch.no_grad():
        reference(x)                                       # one update, at w
    optimizer = AMP(model.parameters(), torch.optim.SGD, epsilon=0.5, inner_steps=3, lr=0.1)
    closure = StepClosure(model, nn.functional.cross_entropy, x, y, autocast=torch.autocast("cpu", enabled=False),
                          frozen_bn=FrozenBNStats(model), params=list(model.parameters()),
                          zero_grad=lambda: optimizer.zero_grad(set_to_none=True))
    optimizer.step(closure)
    assert closure.passes == 4
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert model[1].num_batches_tracked.item() == 1


def test_cli_run_reports_its_passes(run_cli, tmp_path):
    out = run_cli("optimizer=amp", "optimizer.inner_steps=2", "trainer.epochs=2")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["passes_per_step"] == 3 and summary["passes_per_step_measured"] == 3
