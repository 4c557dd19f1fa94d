"""FriendlySAM (runner/optim/friendly_sam.py) against pytorch_optimizer.FriendlySAM and a hand-written float64 step
(weight decay in the base or in the loss); its EMA through a checkpoint (weights_only); a non-finite pass does not
poison the EMA; passes; both bases; BN statistics through the loop (its CLI runs on digits and the grokking task:
tests/test_every_method.py)."""
import copy
import io

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.friendly_sam import EMA_KEY, FriendlySAM
from tiny import tiny_problem


def batches(x, y, steps, size=8, seed=1):
    """Different batches each step: with one fixed batch the EMA would track a single gradient field."""
    generator = torch.Generator().manual_seed(seed)
    return [(x[i], y[i]) for i in (torch.randperm(len(y), generator=generator)[:size] for _ in range(steps))]


def closure_for(model, optimizer, x, y, calls=None, scale=1.0):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * scale
        loss.backward()
        if calls is not None:
            calls.append(1)
        return loss
    return closure


def test_friendly_sam_matches_pytorch_optimizer():
    """15 steps over changing batches, SGD with momentum and weight decay; the reference wants the first gradient
    computed before `step` (its protocol), and takes its norm in float32, hence the tolerance."""
    from pytorch_optimizer import FriendlySAM as Reference

    kwargs = dict(rho=0.2, sigma=0.7, lmbda=0.8)
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()
    ours = FriendlySAM(model.parameters(), torch.optim.SGD, **kwargs, **sgd)
    reference = Reference(twin.parameters(), torch.optim.SGD, **kwargs, **sgd)
    for xb, yb in batches(x, y, 15):
        ours.step(closure_for(model, ours, xb, yb))
        closure = closure_for(twin, reference, xb, yb)
        closure()                            # the reference's first pass, before step
        reference.step(closure)
    worst = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), tiny_problem()[0].parameters()))
    assert worst < 1e-6 and moved > 1e-2, (worst, moved)


@pytest.mark.parametrize("in_loss", [False, True])
def test_friendly_sam_matches_the_update_by_hand(in_loss):
    """d_t = g_t - sigma m_{t-1} (d_1 = g_1), m_t = lmbda m_{t-1} + (1 - lmbda) g_t (m_1 = g_1), e = rho d/||d||,
    SGD with momentum on g(w + e). sigma != 1 tells m_{t-1} from m_t apart. Weight decay by the base (coupled SGD
    decay) or in the loss (wd·w in g, so in m and d; wd·(w + e) in g(w + e)). Built from the config."""
    rho, sigma, lmbda, lr, momentum, wd = 0.2, 0.7, 0.8, 0.1, 0.9, 1e-2
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    m, buf = None, None
    data = batches(x, y, 12)
    for xb, yb in data:
        data_grad = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb))

        def g_fn(point):
            g = data_grad(point)
            return {k: g[k] + wd * point[k] for k in g} if in_loss else g

        g = g_fn(w)
        if m is None:
            d, m = g, {k: v.clone() for k, v in g.items()}
        else:
            d = {k: g[k] - sigma * m[k] for k in w}
            m = {k: lmbda * m[k] + (1 - lmbda) * g[k] for k in w}
        norm = torch.sqrt(sum((v ** 2).sum() for v in d.values()))
        g_sam = g_fn({k: w[k] + rho * d[k] / (norm + 1e-12) for k in w})
        step = {k: g_sam[k] + (0 if in_loss else wd * w[k]) for k in w}
        buf = step if buf is None else {k: momentum * buf[k] + step[k] for k in w}
        w = {k: w[k] - lr * buf[k] for k in w}

    ours = build_optimizer(OPTIMIZERS.validate({
        "name": "friendly_sam", "rho": rho, "sigma": sigma, "lmbda": lmbda, "lr": lr, "momentum": momentum,
        "weight_decay": wd, "weight_decay_in_loss": in_loss}), model.parameters())
    for xb, yb in data:
        calls = []
        ours.step(closure_for(model, ours, xb, yb, calls))
        assert len(calls) == 2                       # two forward+backward passes a step
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[k], atol=1e-12, rtol=0)
    names = dict(model.named_parameters())
    for k in w:
        torch.testing.assert_close(ours.state[names[k]]["ema"], m[k], atol=1e-12, rtol=0)


def test_the_ema_survives_a_checkpoint():
    """Resume from a weights_only checkpoint equals not stopping; dropping the EMA from it does not."""
    model, x, y = tiny_problem()
    data = batches(x, y, 6)
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.2, sigma=1.0, lmbda=0.9, lr=0.1, momentum=0.9)
    for xb, yb in data[:3]:
        opt.step(closure_for(model, opt, xb, yb))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert len(saved["optimizer"][EMA_KEY]) == len(list(model.parameters()))

    def resumed(state):
        twin = copy.deepcopy(model)
        twin.load_state_dict(saved["model"])
        twin_opt = FriendlySAM(twin.parameters(), torch.optim.SGD, rho=0.2, sigma=1.0, lmbda=0.9, lr=0.1,
                               momentum=0.9)
        twin_opt.load_state_dict(state)
        for xb, yb in data[3:]:
            twin_opt.step(closure_for(twin, twin_opt, xb, yb))
        return twin

    full = resumed(saved["optimizer"])
    without = resumed({k: v for k, v in saved["optimizer"].items() if k != EMA_KEY})
    for xb, yb in data[3:]:
        opt.step(closure_for(model, opt, xb, yb))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), full.parameters()))
    assert not all(torch.allclose(a, b, atol=1e-8) for a, b in zip(model.parameters(), without.parameters()))


def test_a_non_finite_first_pass_leaves_the_ema_alone():
    model, x, y = tiny_problem()
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    opt.step(closure_for(model, opt, x, y))
    ema = [opt.state[p]["ema"].clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(model, opt, x, y, scale=float("nan")))
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, opt.state[p]["ema"]) for a, p in zip(ema, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    opt.step(closure_for(model, opt, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters()) and opt.skipped_steps == 1


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_friendly_sam_from_config_over_both_bases_takes_two_passes_a_step(base):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "friendly_sam", "base": base, "lr": 0.01})
    optimizer = build_optimizer(choice, model.parameters())
    assert capabilities(choice).passes_per_step == 2
    assert type(optimizer.base_optimizer).__name__.lower() == base
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        calls = []
        optimizer.step(closure_for(model, optimizer, x, y, calls))
        assert len(calls) == 2
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("node, key", [({"name": "friendly_sam", "lmbda": 1.0}, "optimizer.lmbda"),
                                       ({"name": "friendly_sam", "sigma": -1.0}, "optimizer.sigma"),
                                       ({"name": "friendly_sam", "m": 4}, "optimizer.m")])
def test_bad_values_are_refused(node, key):
    from runner.config import ConfigError

    with pytest.raises(ConfigError) as err:
        OPTIMIZERS.validate(node)
    assert key in str(err.value)


def test_the_loop_updates_bn_running_stats_in_the_first_pass_only():
    """One step through the runner's loop: BN sees the batch twice, folds it into its statistics once."""
    from runner.train import Progress, TrainerConfig, train

    try:
        from tests.test_loop import Collect, loop_experiment
    except ImportError:
        from test_loop import Collect, loop_experiment

    torch.manual_seed(0)
    x = torch.rand(32, 1, 2, 2)
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 3))  # BN input does not depend on w
    experiment = loop_experiment(model, x, torch.randint(0, 3, (32,)), {"name": "friendly_sam", "lr": 0.1},
                                 TrainerConfig(epochs=1, progress=False), batch_size=32)
    progress = Progress()
    status = train(experiment, progress, Collect())
    bn, flat = model[1], x.view(32, 4)
    assert status == "completed" and progress.passes == 2
    torch.testing.assert_close(bn.running_mean, 0.1 * flat.mean(0))          # momentum 0.1, one update
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * flat.var(0))
    assert bn.num_batches_tracked.item() == 1
