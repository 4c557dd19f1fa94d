"""The perturbation engine's options, against hand computations in float64 (runner/optim/perturbation.py):
m-sharpness, weight decay in the loss or in the base optimizer, non-finite steps, ASAM's two conventions,
gradient clipping of every pass, BN statistics and train metrics under m-sharpness, pass counting."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer
from runner.optim.bn import FrozenBNStats
from runner.optim.sam import SAM
from runner.step import StepClosure


def tiny_problem(n=8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    return model, x, y


def g_fn(model, x, y):
    return grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))


def step_closure(model, optimizer, x, y, **kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    return StepClosure(model, nn.functional.cross_entropy, x, y, autocast=torch.autocast("cpu", enabled=False),
                       frozen_bn=FrozenBNStats(model), params=params,
                       zero_grad=lambda: optimizer.zero_grad(set_to_none=True), **kwargs)


def sam_direction(g: dict, rho: float) -> dict:
    norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
    return {k: rho * v / (norm + 1e-12) for k, v in g.items()}


def sgd(w: dict, d: dict, lr: float) -> dict:
    return {k: w[k] - lr * d[k] for k in w}


@pytest.mark.parametrize("m", [8, 3, 1])
def test_m_sharpness_is_the_size_weighted_mean_of_each_chunks_sam_gradient(m):
    """m = batch size is plain SAM; m = 1 the average of per-sample SAM gradients; a last short chunk counts by
    its size. Two passes' worth of samples either way."""
    rho, lr = 0.2, 0.1
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(2):
        total = {k: torch.zeros_like(v) for k, v in w.items()}
        for start in range(0, len(y), m):
            xc, yc = x[start:start + m], y[start:start + m]
            gc = g_fn(model, xc, yc)(w)
            e = sam_direction(gc, rho)
            g_sam = g_fn(model, xc, yc)({k: w[k] + e[k] for k in w})
            total = {k: total[k] + g_sam[k] * len(yc) / len(y) for k in w}
        w = sgd(w, total, lr)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, m=m)
    for _ in range(2):
        closure = step_closure(model, optimizer, x, y)
        optimizer.step(closure)
        assert closure.passes == 2
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[k], atol=1e-12, rtol=0)


@pytest.mark.parametrize("in_loss", [False, True])
def test_weight_decay_in_the_loss_or_in_the_base_optimizer(in_loss):
    """In the base (davda54): e from g(w), step with g(w + e) + wd w. In the loss (google-research/sam): e from
    g(w) + wd w, step with g(w + e) + wd (w + e), the base's own decay 0. Built from the config, as a user does."""
    rho, lr, wd = 0.3, 0.1, 0.05
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(3):
        g = g_fn(model, x, y)(w)
        ascent = {k: g[k] + wd * w[k] for k in w} if in_loss else g
        e = sam_direction(ascent, rho)
        point = {k: w[k] + e[k] for k in w}
        g_sam = g_fn(model, x, y)(point)
        descent = {k: g_sam[k] + wd * (point[k] if in_loss else w[k]) for k in w}
        w = sgd(w, descent, lr)
    choice = OPTIMIZERS.validate({"name": "sam", "rho": rho, "lr": lr, "momentum": 0.0, "weight_decay": wd,
                                  "weight_decay_in_loss": in_loss})
    optimizer = build_optimizer(choice, model.parameters())
    assert optimizer.param_groups[0]["weight_decay"] == (0.0 if in_loss else wd)
    for _ in range(3):
        optimizer.step(step_closure(model, optimizer, x, y))
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[k], atol=1e-12, rtol=0)


def test_the_two_conventions_differ_as_their_closed_forms_say():
    """One step from the same point: the difference of the two updates is lr * wd * e plus the change of e."""
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    a = build_optimizer(OPTIMIZERS.validate({"name": "sam", "momentum": 0.0, "weight_decay": 0.1}), model.parameters())
    b = build_optimizer(OPTIMIZERS.validate({"name": "sam", "momentum": 0.0, "weight_decay": 0.1,
                                             "weight_decay_in_loss": True}), twin.parameters())
    a.step(step_closure(model, a, x, y))
    b.step(step_closure(twin, b, x, y))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_a_non_finite_gradient_in_any_pass_skips_the_step_and_is_counted(bad_pass):
    model, x, y = tiny_problem()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    optimizer.step(step_closure(model, optimizer, x, y))  # a good step: momentum state exists
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    calls = []

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        calls.append(1)
        (loss * (float("nan") if len(calls) == bad_pass else 1.0)).backward()
        return loss

    optimizer.step(closure)
    assert optimizer.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    after = optimizer.state_dict()
    assert after["skipped_steps"] == 1
    for pid, s in state["state"].items():
        assert torch.equal(after["state"][pid]["momentum_buffer"], s["momentum_buffer"])
    fresh = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    fresh.load_state_dict(after)  # the count survives a checkpoint
    assert fresh.skipped_steps == 1


def test_asam_in_the_papers_convention_scales_weights_only_with_eta():
    """optimizer=asam: T = |w| + eta for parameters named *weight*, T = 1 for biases (SamsungLabs/ASAM)."""
    rho, eta, lr = 0.5, 0.01, 0.1
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = g_fn(model, x, y)(w)
    t = {k: (w[k].abs() + eta) if "weight" in k else torch.ones_like(w[k]) for k in w}
    norm = torch.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in w))
    e = {k: rho * t[k] ** 2 * g[k] / (norm + 1e-12) for k in w}
    g_sam = g_fn(model, x, y)({k: w[k] + e[k] for k in w})
    expected = sgd(w, g_sam, lr)
    optimizer = build_optimizer(OPTIMIZERS.validate({"name": "asam", "lr": lr, "momentum": 0.0, "weight_decay": 0.0}),
                                model.parameters())
    optimizer.set_parameter_names({id(p): n for n, p in model.named_parameters()})  # as experiment.build does
    optimizer.step(step_closure(model, optimizer, x, y))
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], atol=1e-12, rtol=0)


def test_gradient_clipping_applies_to_every_pass_so_to_the_second_pass_gradient():
    """trainer.grad_clip clips each pass's gradient; SAM's e(w) is invariant to scaling g, so this is the google
    code's clipping of the second-pass gradient."""
    rho, lr, clip = 0.2, 0.1, 0.05
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = g_fn(model, x, y)(w)
    e = sam_direction(g, rho)
    g_sam = g_fn(model, x, y)({k: w[k] + e[k] for k in w})
    norm = torch.sqrt(sum((v ** 2).sum() for v in g_sam.values()))
    assert norm > clip
    expected = sgd(w, {k: v * clip / (norm + 1e-6) for k, v in g_sam.items()}, lr)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    optimizer.step(step_closure(model, optimizer, x, y, grad_clip=clip))
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], atol=1e-12, rtol=0)


def test_m_sharpness_updates_bn_once_and_reports_train_metrics_of_every_chunk():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    bn = model[1]
    reference = copy.deepcopy(model)
    reference.train()
    with torch.no_grad():
        reference(x[:4])  # the first chunk at w: the only update of the running statistics
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, m=4)
    seen = []
    optimizer.step(step_closure(model, optimizer, x, y, on_first_pass=lambda logits, yy, objective: seen.append(len(yy))))
    torch.testing.assert_close(bn.running_mean, reference[1].running_mean)
    torch.testing.assert_close(bn.running_var, reference[1].running_var)
    assert bn.num_batches_tracked.item() == 1
    assert seen == [4, 4, 4]  # every sample's metrics, at w


def test_passes_and_skipped_steps_are_in_the_summary(run_cli, tmp_path):
    out = run_cli("optimizer=sam", "trainer.epochs=1")
    assert out.returncode == 0, out.stderr
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["passes_per_step"] == 2 and summary["passes_per_step_measured"] == 2
    assert summary["skipped_steps"] == 0
    out = run_cli("trainer.precision=fp16")
    assert out.returncode == 2 and "GradScaler" in out.stderr and len(out.stderr.strip().splitlines()) == 1
