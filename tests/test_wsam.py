"""WSAM (runner/optim/wsam.py) against pytorch_optimizer.WSAM and a hand-written float64 step, decoupled and coupled,
weight decay in the base or in the loss; gamma = 1/2 coupled is SAM; a skipped step skips the decoupled term too;
passes; both bases; BN statistics through the loop (its CLI runs on digits and the grokking task:
tests/test_every_method.py)."""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.wsam import WSAM
from tiny import tiny_problem


def closure_for(model, optimizer, x, y, calls=None, nan_on_call=None):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if calls is not None:
            calls.append(1)
            if nan_on_call == len(calls):
                loss = loss * float("nan")
        loss.backward()
        return loss
    return closure


def decay(steps):
    return lambda step: 1.0 - 0.5 * step / steps


@pytest.mark.parametrize("decouple, base", [(True, "sgd"), (False, "sgd"), (True, "adamw")])
def test_wsam_matches_pytorch_optimizer(decouple, base):
    """15 steps with a decaying lr (the decoupled term uses the scheduled lr); the reference takes its norm in
    float32, hence the tolerance."""
    from pytorch_optimizer import WSAM as Reference

    steps = 15
    base_class, base_kwargs = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
                               "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2))}[base]
    kwargs = dict(rho=0.1, gamma=0.8, decouple=decouple)
    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()
    ours = WSAM(model.parameters(), base_class, **kwargs, **base_kwargs)
    reference = Reference(twin, twin.parameters(), base_class, **kwargs, **base_kwargs)
    schedules = [torch.optim.lr_scheduler.LambdaLR(ours, decay(steps)),
                 torch.optim.lr_scheduler.LambdaLR(reference.base_optimizer, decay(steps))]
    for _ in range(steps):
        ours.step(closure_for(model, ours, x, y))
        reference.step(closure_for(twin, reference, x, y))
        for schedule in schedules:
            schedule.step()
    worst = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), tiny_problem()[0].parameters()))
    assert worst < 1e-6 and moved > 1e-2, (worst, moved)


@pytest.mark.parametrize("decouple, in_loss", [(True, False), (False, False), (True, True), (False, True)])
def test_wsam_matches_the_update_by_hand(decouple, in_loss):
    """alpha = gamma/(1-gamma), h = g(w + rho g/||g||) - g. Decoupled: SGD with momentum on g, then w -= lr alpha h.
    Coupled: the same SGD on g + alpha h. Weight decay by the base (coupled SGD decay on what the base sees) or in
    the loss (wd·w in g, wd·(w + e) in g(w + e), so wd·e in h). Built from the config."""
    rho, gamma, lr, momentum, wd, steps = 0.1, 0.8, 0.05, 0.9, 1e-2, 10
    alpha = gamma / (1 - gamma)
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buf = None
    data_grad = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))

    def g_fn(point):
        g = data_grad(point)
        return {k: g[k] + wd * point[k] for k in g} if in_loss else g

    for t in range(steps):
        lr_t = lr * decay(steps)(t)
        g = g_fn(w)
        norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        h = {k: v - g[k] for k, v in g_fn({k: w[k] + rho * g[k] / (norm + 1e-12) for k in w}).items()}
        d = {k: (g[k] if decouple else g[k] + alpha * h[k]) + (0 if in_loss else wd * w[k]) for k in w}
        buf = d if buf is None else {k: momentum * buf[k] + d[k] for k in w}
        w = {k: w[k] - lr_t * buf[k] - (lr_t * alpha * h[k] if decouple else 0) for k in w}

    ours = build_optimizer(OPTIMIZERS.validate({
        "name": "wsam", "rho": rho, "gamma": gamma, "decouple": decouple, "lr": lr, "momentum": momentum,
        "weight_decay": wd, "weight_decay_in_loss": in_loss}), model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(ours, decay(steps))
    for _ in range(steps):
        calls = []
        ours.step(closure_for(model, ours, x, y, calls))
        schedule.step()
        assert len(calls) == 2                       # two forward+backward passes a step
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[k], atol=1e-12, rtol=0)


def test_gamma_one_half_coupled_is_sam():
    from runner.optim.sam import SAM

    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()
    wsam = WSAM(model.parameters(), torch.optim.SGD, rho=0.2, gamma=0.5, decouple=False, lr=0.1, momentum=0.9)
    sam = SAM(twin.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    for _ in range(3):
        wsam.step(closure_for(model, wsam, x, y))
        sam.step(closure_for(twin, sam, x, y))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)


def test_a_skipped_step_skips_the_decoupled_term_too():
    model, x, y = tiny_problem()
    opt = WSAM(model.parameters(), torch.optim.SGD, rho=0.1, gamma=0.9, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(model, opt, x, y, calls=[], nan_on_call=2))
    assert opt.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.step(closure_for(model, opt, x, y, calls=[]))
    assert opt.skipped_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_wsam_from_config_over_both_bases_takes_two_passes_a_step(base):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "wsam", "base": base, "lr": 0.01})
    optimizer = build_optimizer(choice, model.parameters())
    assert capabilities(choice).passes_per_step == 2
    assert type(optimizer.base_optimizer).__name__.lower() == base
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        calls = []
        optimizer.step(closure_for(model, optimizer, x, y, calls))
        assert len(calls) == 2
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("node, key", [({"name": "wsam", "gamma": 1.0}, "optimizer.gamma"),
                                       ({"name": "wsam", "rho": -0.1}, "optimizer.rho"),
                                       ({"name": "wsam", "m": 4}, "optimizer.m")])
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
    experiment = loop_experiment(model, x, torch.randint(0, 3, (32,)), {"name": "wsam", "lr": 0.1},
                                 TrainerConfig(epochs=1, progress=False), batch_size=32)
    progress = Progress()
    status = train(experiment, progress, Collect())
    bn, flat = model[1], x.view(32, 4)
    assert status == "completed" and progress.passes == 2
    torch.testing.assert_close(bn.running_mean, 0.1 * flat.mean(0))          # momentum 0.1, one update
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * flat.var(0))
    assert bn.num_batches_tracked.item() == 1
