"""SAM / ASAM against a hand-computed two-pass update in float64, and the BN running-stat convention."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.config import ConfigError
from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.bn import FrozenBNStats
from runner.optim.sam import SAM
from tiny import closure_for, tiny_problem


def loss_at(model, params, x, y):
    return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_two_steps_match_hand_computation(adaptive):
    rho, lr, momentum, wd = 0.3, 0.1, 0.9, 1e-2
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buf = {k: None for k in w}
    g_fn = grad(lambda p: loss_at(model, p, x, y))
    expected_losses = []
    for _ in range(2):  # two steps: the second exercises the momentum buffer
        expected_losses.append(loss_at(model, w, x, y).item())
        g = g_fn(w)                                                            # g(w)
        t = {k: (w[k].abs() if adaptive else torch.ones_like(w[k])) for k in w}   # T_w
        norm = torch.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in w))          # ||T g||
        e = {k: rho * t[k] ** 2 * g[k] / (norm + 1e-12) for k in w}           # e(w) = rho T² g / ||T g||
        g_sam = g_fn({k: w[k] + e[k] for k in w})                              # g(w + e(w))
        for k in w:                                                            # torch SGD, coupled L2
            d = g_sam[k] + wd * w[k]
            buf[k] = d.clone() if buf[k] is None else momentum * buf[k] + d
            w[k] = w[k] - lr * buf[k]

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr, momentum=momentum,
                    weight_decay=wd)
    for step in range(2):
        calls = []
        loss = optimizer.step(closure_for(model, optimizer, x, y, calls))
        assert len(calls) == 2                              # two forward+backward passes per step
        assert loss.item() == pytest.approx(expected_losses[step], abs=1e-12)  # the loss at w, not w + e(w)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[k], atol=1e-12, rtol=0)


def test_rho_zero_is_the_base_optimizer():
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        sam.step(closure_for(model, sam, x, y, []))
        sgd.step(closure_for(twin, sgd, x, y, []))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)


def test_state_dict_roundtrip_is_the_base_optimizers_state():
    model, x, y = tiny_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.step(closure_for(model, opt, x, y, []))
    state = copy.deepcopy(opt.state_dict())  # torch hands out live buffers; a checkpoint is a copy
    assert all("momentum_buffer" in s for s in state["state"].values())      # no scratch weights saved
    twin_model = copy.deepcopy(model)
    twin = SAM(twin_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    twin.load_state_dict(state)
    assert twin.param_groups is twin.base_optimizer.param_groups              # lr schedules still reach the base
    opt.step(closure_for(model, opt, x, y, []))
    twin.step(closure_for(twin_model, twin, x, y, []))
    for a, b in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_step_without_closure_is_a_clear_error():
    model, _, _ = tiny_problem()
    with pytest.raises(RuntimeError, match="closure"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1).step()


def test_sam_from_config_over_a_base_given_by_name_or_node():
    model, _, _ = tiny_problem()
    flat = OPTIMIZERS.validate({"name": "sam", "rho": 0.1, "base": "adamw", "lr": 1e-3})
    optimizer = build_optimizer(flat, model.parameters())
    assert isinstance(optimizer.base_optimizer, torch.optim.AdamW) and capabilities(flat).passes_per_step == 2
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["rho"]) == (1e-3, 5e-4, 0.1)  # flat values reach the base
    nested = OPTIMIZERS.validate({"name": "sam", "base": {"name": "adamw", "lr": 3e-4, "betas": [0.8, 0.9]}})
    group = build_optimizer(nested, model.parameters()).param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-4, (0.8, 0.9), 5e-4)  # node wins, rest flat


@pytest.mark.parametrize("node, key", [
    ({"name": "sam", "base": "nosuch"}, "optimizer.base.name"),
    ({"name": "sam", "base": {"name": "adamw", "momentum": 0.9}}, "optimizer.base.momentum"),
    ({"name": "sam", "base": {"name": "sgd", "lr": -1.0}}, "optimizer.base.lr"),
    ({"name": "sam", "rho": -0.1}, "optimizer.rho"),
    ({"name": "sam", "base": "sam"}, "optimizer.base.name"),   # SAM over SAM: the base must take plain steps
])
def test_base_optimizer_is_validated_recursively(node, key):
    with pytest.raises(ConfigError) as err:
        OPTIMIZERS.validate(node)
    assert key in str(err.value)


def test_frozen_bn_stats_leaves_running_statistics_alone():
    bn = nn.BatchNorm1d(3)
    bn.train()
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    x = torch.randn(8, 3) * 5 + 2
    with FrozenBNStats(bn):
        out = bn(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-5, rtol=0)  # still batch statistics
    for a, b in zip(before, (bn.running_mean, bn.running_var, bn.num_batches_tracked)):
        assert torch.equal(a, b)
    assert bn.momentum == 0.1
    bn(x)
    assert not torch.equal(before[0], bn.running_mean)                            # restored afterwards


def test_training_loop_updates_bn_running_stats_in_the_first_pass_only():
    """One SAM step through the runner's loop: BN sees the same batch twice, folds it in once (closed form)."""
    from runner.train import Progress, TrainerConfig, train

    try:
        from tests.test_loop import Collect, loop_experiment
    except ImportError:
        from test_loop import Collect, loop_experiment

    torch.manual_seed(0)
    x = torch.rand(32, 1, 2, 2)
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 3))  # BN input does not depend on w
    experiment = loop_experiment(model, x, torch.randint(0, 3, (32,)), {"name": "sam", "rho": 0.5, "lr": 0.1},
                                 TrainerConfig(epochs=1, progress=False), batch_size=32)
    progress = Progress()
    status = train(experiment, progress, Collect())
    bn, flat = model[1], x.view(32, 4)
    assert status == "completed" and progress.passes == 2
    torch.testing.assert_close(bn.running_mean, 0.1 * flat.mean(0))          # momentum 0.1, one update
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * flat.var(0))      # unbiased batch variance
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_match_pytorch_optimizer(adaptive):
    """pytorch_optimizer's SAM (a well-kept reference, tests only): 12 steps with momentum and weight decay.
    Its convention computes the first gradient before `first_step` and the second before `second_step`; it adds
    its epsilon (1e-12) to the norm like davda54 and ours. Its global norm is accumulated in float32."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    ours = SAM(model.parameters(), torch.optim.SGD, rho=0.2, adaptive=adaptive, **kwargs)
    theirs = pytorch_optimizer.SAM(twin.parameters(), torch.optim.SGD, rho=0.2, adaptive=adaptive, **kwargs)
    for step in range(12):
        xs, ys = x[(step % 2) * 8:(step % 2) * 8 + 8], y[(step % 2) * 8:(step % 2) * 8 + 8]
        ours.step(closure_for(model, ours, xs, ys, []))
        theirs.zero_grad()
        nn.functional.cross_entropy(twin(xs), ys).backward()
        theirs.first_step(zero_grad=True)
        nn.functional.cross_entropy(twin(xs), ys).backward()
        theirs.second_step(zero_grad=True)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_sam_on_a_quadratic_is_its_closed_form():
    """L = 1/2 w^T A w: g = A w, e = rho A w / ||A w||, g(w + e) = A (w + e); one SGD step w - lr A (w + e)."""
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.tensor([3.0, 1.0, 0.5, -0.2], dtype=torch.float64)) @ q.T
    w0 = torch.randn(4, dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    optimizer = SAM([w], torch.optim.SGD, rho=0.1, lr=0.05)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    optimizer.step(closure)
    e = 0.1 * (a @ w0) / ((a @ w0).norm() + 1e-12)
    torch.testing.assert_close(w.detach(), w0 - 0.05 * a @ (w0 + e), atol=1e-14, rtol=0)
