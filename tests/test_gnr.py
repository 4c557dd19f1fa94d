"""Gradient-norm regularization (Karakida et al. 2023): exact double backprop against a dense Hessian
(torch.func.hessian) in float64, the forward and backward differences against hand-written steps and converging
to the exact gradient as O(h), pass counts, bases, BN statistics and the CLI."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, hessian

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.bn import FrozenBNStats
from runner.optim.gnr import GNR
from runner.step import StepClosure
from tiny import tiny_problem


def closure_for(model, optimizer, x, y, calls):
    """torch's closure protocol, plus `create_graph` (what the loop's closure offers for double backprop)."""
    def closure(create_graph=False):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=create_graph)
        calls.append(create_graph)
        return loss
    return closure


class Flat:
    """The model's loss as a function of one flat float64 vector, for dense Hessians."""

    def __init__(self, model, x, y, wd=0.0):
        self.model, self.x, self.y, self.wd = model, x, y, wd
        self.names = [k for k, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.sizes = [p.numel() for p in model.parameters()]

    def unflat(self, theta):
        return {k: t.view(s) for k, t, s in zip(self.names, theta.split(self.sizes), self.shapes)}

    def flat(self, tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    def loss(self, theta):
        out = functional_call(self.model, self.unflat(theta), (self.x,))
        return nn.functional.cross_entropy(out, self.y) + 0.5 * self.wd * (theta ** 2).sum()

    def regularized_gradient(self, theta, gamma):
        """g + gamma H g from the dense Hessian (the definition, no double backprop)."""
        g = grad(self.loss)(theta)
        return g + gamma * hessian(self.loss)(theta) @ g


def captured_direction(model, x, y, **kwargs):
    """The gradient one GNR step hands to its base optimizer (the base step is intercepted)."""
    optimizer = GNR(model.parameters(), torch.optim.SGD, lr=1.0, **kwargs)
    seen = []
    optimizer.base_step = lambda: seen.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
    calls = []
    optimizer.step(closure_for(model, optimizer, x, y, calls))
    return seen[0], calls


@pytest.mark.parametrize("wd_in_loss", [False, True])
def test_exact_is_the_dense_hessian_product(wd_in_loss):
    """One step's gradient is g + gamma H g (H of L, or of L + wd/2 ||w||² with weight decay in the loss);
    then 10 steps of SGD with momentum against the same computation."""
    gamma, lr, momentum, wd = 0.3, 0.1, 0.9, 1e-2
    model, x, y = tiny_problem()
    flat = Flat(model, x, y, wd if wd_in_loss else 0.0)
    theta = flat.flat([p.detach() for p in model.parameters()])
    d, calls = captured_direction(copy.deepcopy(model), x, y, gamma=gamma, method="exact",
                                  loss_weight_decay=wd if wd_in_loss else 0.0)
    assert calls == [True]                                   # one call of the closure, keeping the graph
    expected = flat.regularized_gradient(theta, gamma)
    assert (expected - grad(flat.loss)(theta)).abs().max() > 1e-3  # the penalty term matters here
    torch.testing.assert_close(d, expected, atol=1e-13, rtol=0)

    buf = None
    for _ in range(10):
        step = flat.regularized_gradient(theta, gamma) + (0.0 if wd_in_loss else wd) * theta
        buf = step.clone() if buf is None else momentum * buf + step
        theta = theta - lr * buf
    optimizer = GNR(model.parameters(), torch.optim.SGD, gamma=gamma, method="exact", lr=lr, momentum=momentum,
                    weight_decay=0.0 if wd_in_loss else wd, loss_weight_decay=wd if wd_in_loss else 0.0)
    for _ in range(10):
        optimizer.step(closure_for(model, optimizer, x, y, []))
    diff = (flat.flat([p.detach() for p in model.parameters()]) - theta).abs().max().item()
    assert diff < 1e-12, diff
    assert all(p.grad is None or p.grad.grad_fn is None for p in model.parameters())   # no graph kept


@pytest.mark.parametrize("method", ["forward", "backward"])
def test_finite_differences_match_the_papers_formula_over_ten_steps(method):
    """F-GR: d = g + gamma/h (g(w + h g) - g); B-GR: d = g + gamma/h (g - g(w - h g)); SGD with momentum."""
    gamma, h, lr, momentum, wd = 0.05, 0.2, 0.1, 0.9, 1e-2
    model, x, y = tiny_problem()
    flat = Flat(model, x, y)
    theta = flat.flat([p.detach() for p in model.parameters()])
    g_fn = grad(flat.loss)
    buf = None
    for _ in range(10):
        g = g_fn(theta)
        if method == "forward":
            d = g + gamma / h * (g_fn(theta + h * g) - g)
        else:
            d = g + gamma / h * (g - g_fn(theta - h * g))
        step = d + wd * theta
        buf = step.clone() if buf is None else momentum * buf + step
        theta = theta - lr * buf
    optimizer = GNR(model.parameters(), torch.optim.SGD, gamma=gamma, h=h, method=method, lr=lr,
                    momentum=momentum, weight_decay=wd)
    for _ in range(10):
        calls = []
        optimizer.step(closure_for(model, optimizer, x, y, calls))
        assert calls == [False, False]                       # two plain forward+backward passes
    diff = (flat.flat([p.detach() for p in model.parameters()]) - theta).abs().max().item()
    assert diff < 1e-12, diff


def test_finite_differences_converge_to_the_exact_gradient_as_h_shrinks():
    """Error O(h): 10x smaller h, about 10x smaller error; forward and backward err on opposite sides, so their
    mean is O(h²)."""
    gamma = 0.5
    model, x, y = tiny_problem()
    exact, _ = captured_direction(copy.deepcopy(model), x, y, gamma=gamma, method="exact")
    errors = {}
    for method in ("forward", "backward"):
        for h in (1e-2, 1e-3, 1e-4):
            d, _ = captured_direction(copy.deepcopy(model), x, y, gamma=gamma, h=h, method=method)
            errors[method, h] = d - exact
    for method in ("forward", "backward"):
        norms = [errors[method, h].norm().item() for h in (1e-2, 1e-3, 1e-4)]
        print(method, " ".join(f"h={h:g}: {e:.3e}" for h, e in zip((1e-2, 1e-3, 1e-4), norms)))
        assert 8 < norms[0] / norms[1] < 12 and 8 < norms[1] / norms[2] < 12, norms
    mean = (errors["forward", 1e-2] + errors["backward", 1e-2]) / 2
    assert mean.norm() < 0.05 * errors["forward", 1e-2].norm()


def test_exact_needs_a_closure_that_keeps_the_graph():
    model, x, y = tiny_problem()
    optimizer = GNR(model.parameters(), torch.optim.SGD, method="exact", lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="create_graph"):
        optimizer.step(closure)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("method, passes", [("forward", 2), ("backward", 2), ("exact", 1)])
def test_builds_over_both_bases_and_counts_its_closure_calls(base, method, passes):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "gnr", "base": base, "lr": 0.01, "method": method})
    optimizer = build_optimizer(choice, model.parameters())
    assert capabilities(choice).passes_per_step == passes
    assert type(optimizer.base_optimizer).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[base]
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    loss = optimizer.step(closure_for(model, optimizer, x, y, calls))
    assert len(calls) == passes and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_config_is_validated():
    from runner.config import ConfigError

    for node, key in [({"gamma": -1.0}, "gamma"), ({"h": 0.0}, "h"), ({"method": "central"}, "method")]:
        with pytest.raises(ConfigError) as err:
            OPTIMIZERS.validate({"name": "gnr", **node})
        assert key in str(err.value)


@pytest.mark.parametrize("method, passes", [("forward", 2), ("exact", 1)])
def test_bn_running_statistics_come_from_the_first_pass_only(method, passes):
    """Through the loop's closure (double backward through BN included)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)                                          # one update, at w
    optimizer = GNR(model.parameters(), torch.optim.SGD, gamma=0.1, h=0.1, method=method, lr=0.1)
    closure = StepClosure(model, nn.functional.cross_entropy, x, y, autocast=torch.autocast("cpu", enabled=False),
                          frozen_bn=FrozenBNStats(model), params=list(model.parameters()),
                          zero_grad=lambda: optimizer.zero_grad(set_to_none=True))
    optimizer.step(closure)
    assert closure.passes == passes
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert model[1].num_batches_tracked.item() == 1


def test_cli_runs_report_their_passes(run_cli, tmp_path):
    """Both shapes in one sweep (one process): F-GR 2 passes a step, double backprop 1 call."""
    sweep = tmp_path / "sweep"
    out = run_cli("-m", "optimizer=gnr", "optimizer.method=forward,exact", "trainer.epochs=2",
                  f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr
    summaries = [json.loads(f.read_text()) for f in sorted(sweep.rglob("summary.json"))]
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries)
    assert sorted((s["passes_per_step"], s["passes_per_step_measured"]) for s in summaries) == [(1, 1), (2, 2)]
