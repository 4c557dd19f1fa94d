"""GSAM (runner/optim/gsam.py) against pytorch_optimizer.GSAM with its ProportionScheduler, a hand-written float64
step from the paper's equations (weight decay in the base or in the loss), and a closed form on a quadratic; rho
following the lr; a non-finite pass; passes; both bases; BN statistics through the loop (its CLI runs on digits
and the grokking task: tests/test_every_method.py)."""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.gsam import GSAM
from tiny import tiny_problem


def closure_for(model, optimizer, x, y, calls=None):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if calls is not None:
            calls.append(1)
        return loss
    return closure


def linear_decay(steps):
    return lambda step: 1.0 - 0.8 * step / steps       # lr from lr_max down to 0.2 lr_max: inside [lr_min, lr_max]


def dot(a: dict, b: dict):
    return sum((a[k] * b[k]).sum() for k in a)


def test_gsam_matches_pytorch_optimizer_with_its_proportion_scheduler():
    """15 steps, SGD with momentum and weight decay, lr decaying linearly, rho_t from the lr. pytorch_optimizer takes
    its norms in float32, hence the tolerance."""
    from pytorch_optimizer import GSAM as ReferenceGSAM
    from pytorch_optimizer.lr_scheduler.proportion import ProportionScheduler

    steps, lr, lr_min, rho_max, rho_min, alpha = 15, 0.2, 0.01, 0.3, 0.1, 0.4
    sgd = dict(lr=lr, momentum=0.9, weight_decay=1e-2)
    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()

    base = torch.optim.SGD(twin.parameters(), **sgd)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(base, linear_decay(steps))
    rho_schedule = ProportionScheduler(lr_schedule, max_lr=lr, min_lr=lr_min, max_value=rho_max, min_value=rho_min)
    reference = ReferenceGSAM(twin.parameters(), base, twin, rho_schedule, alpha=alpha)

    @torch.enable_grad()             # its step runs under no_grad; its set_closure does the same
    def reference_closure():
        base.zero_grad()
        outputs = twin(x)
        loss = nn.functional.cross_entropy(outputs, y)
        loss.backward()
        return outputs, loss.detach()

    ours = GSAM(model.parameters(), torch.optim.SGD, rho_max=rho_max, rho_min=rho_min, alpha=alpha, lr_min=lr_min,
                **sgd)
    schedule = torch.optim.lr_scheduler.LambdaLR(ours, linear_decay(steps))
    for _ in range(steps):
        reference.step(reference_closure)
        lr_schedule.step()
        reference.update_rho_t()             # the reference's protocol: rho after the lr scheduler
        ours.step(closure_for(model, ours, x, y))
        schedule.step()                      # ours reads the scheduled lr itself
    worst = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), tiny_problem()[0].parameters()))
    assert worst < 1e-6 and moved > 1e-2, (worst, moved)


@pytest.mark.parametrize("in_loss", [False, True])
def test_gsam_matches_the_papers_equations_by_hand(in_loss):
    """Algorithm 1 in float64 with torch.func: rho_t from the scheduled lr, e = rho_t g/||g||, g_sam = g(w + e),
    g_orth = g - (<g, g_sam>/||g_sam||²) g_sam, SGD with momentum on g_sam - alpha g_orth. Weight decay by the base
    (coupled SGD decay on the final gradient) or in the loss (wd·w in g, wd·(w + e) in g_sam, before decomposing).
    Built from the config, as a user does."""
    steps, lr, lr_min, rho_max, rho_min, alpha, momentum, wd = 12, 0.2, 0.0, 0.3, 0.05, 0.3, 0.9, 1e-2
    model, x, y = tiny_problem()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buf = {k: torch.zeros_like(v) for k, v in w.items()}
    data_grad = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))

    def g_fn(point):
        g = data_grad(point)
        return {k: g[k] + wd * point[k] for k in g} if in_loss else g

    for t in range(steps):
        lr_t = lr * linear_decay(steps)(t)
        rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr - lr_min)
        g = g_fn(w)
        norm = torch.sqrt(dot(g, g))
        g_sam = g_fn({k: w[k] + rho_t * g[k] / (norm + 1e-12) for k in w})
        n_g, n_sam = torch.sqrt(dot(g, g)), torch.sqrt(dot(g_sam, g_sam))   # <g, g_sam>/||g_sam||², with the
        along = dot(g, g_sam) / (n_g * n_sam + 1e-12) * n_g / (n_sam + 1e-12)  # references' 1e-12 guards
        d = {k: g_sam[k] - alpha * (g[k] - along * g_sam[k]) + (0 if in_loss else wd * w[k]) for k in w}
        buf = {k: momentum * buf[k] + d[k] if t else d[k] for k in w}
        w = {k: w[k] - lr_t * buf[k] for k in w}

    ours = build_optimizer(OPTIMIZERS.validate({
        "name": "gsam", "rho_max": rho_max, "rho_min": rho_min, "alpha": alpha, "lr_min": lr_min, "lr": lr,
        "momentum": momentum, "weight_decay": wd, "weight_decay_in_loss": in_loss}), model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(ours, linear_decay(steps))
    for _ in range(steps):
        ours.step(closure_for(model, ours, x, y))
        schedule.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[k], atol=1e-12, rtol=0)


@pytest.mark.parametrize("lr_now", [0.1, 0.04])
def test_one_step_on_a_quadratic_is_the_closed_form(lr_now):
    """L = ½ wᵀAw: g = Aw, g_sam = A(w + rho_t Aw/||Aw||); plain SGD: w1 = w - lr (g_sam - alpha g_orth). The lr is
    set below its peak (as a scheduler would) to exercise rho_t = rho_min + (rho_max - rho_min)(lr - lr_min)/(...)."""
    lr_max, lr_min, rho_max, rho_min, alpha = 0.1, 0.02, 0.5, 0.1, 0.7
    a = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    rho = rho_min + (rho_max - rho_min) * (lr_now - lr_min) / (lr_max - lr_min)
    g = a @ w0
    g_sam = a @ (w0 + rho * g / g.norm())
    g_orth = g - (g @ g_sam) / (g_sam @ g_sam) * g_sam
    expected = w0 - lr_now * (g_sam - alpha * g_orth)
    assert (g_orth @ g_sam).abs() < 1e-12 and g_orth.norm() > 1e-3   # a real decomposition, not a degenerate case

    w = nn.Parameter(w0.clone())
    optimizer = GSAM([w], torch.optim.SGD, rho_max=rho_max, rho_min=rho_min, alpha=alpha, lr_min=lr_min, lr=lr_max)
    optimizer.param_groups[0]["lr"] = lr_now

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(w.detach(), expected, atol=1e-12, rtol=0)


def test_rho_follows_the_lr_between_its_bounds():
    model, _, _ = tiny_problem()
    optimizer = GSAM(model.parameters(), torch.optim.SGD, rho_max=0.4, rho_min=0.1, lr_min=0.01, lr=0.1)
    group = optimizer.param_groups[0]
    assert optimizer.rho_t(0, group) == pytest.approx(0.4)                 # at the lr it was built with
    for lr, rho in [(0.055, 0.25), (0.01, 0.1), (0.001, 0.1), (0.2, 0.4)]:  # linear inside, clamped outside
        group["lr"] = lr
        assert optimizer.rho_t(0, group) == pytest.approx(rho)
    group["initial_lr"] = 0.05                                              # a torch scheduler's peak wins
    group["lr"] = 0.03
    assert optimizer.rho_t(0, group) == pytest.approx(0.1 + 0.3 * 0.5)
    group["lr_min"] = 0.05                                                  # lr_max <= lr_min: rho_max
    assert optimizer.rho_t(0, group) == pytest.approx(0.4)


def test_alpha_zero_and_constant_rho_is_sam():
    from runner.optim.sam import SAM

    model, x, y = tiny_problem()
    twin, _, _ = tiny_problem()
    gsam = GSAM(model.parameters(), torch.optim.SGD, rho_max=0.2, rho_min=0.2, alpha=0.0, lr=0.1, momentum=0.9)
    sam = SAM(twin.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    for _ in range(3):
        gsam.step(closure_for(model, gsam, x, y))
        sam.step(closure_for(twin, sam, x, y))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)


def test_a_non_finite_second_pass_skips_the_step():
    model, x, y = tiny_problem()
    optimizer = GSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * (float("nan") if calls else 1.0)
        loss.backward()
        calls.append(1)
        return loss

    optimizer.step(closure)
    assert len(calls) == 2 and optimizer.skipped_steps == 1 and not optimizer.base_optimizer.state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_gsam_from_config_over_both_bases_takes_two_passes_a_step(base):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "gsam", "base": base, "lr": 0.01, "rho_max": 0.1, "rho_min": 0.02})
    optimizer = build_optimizer(choice, model.parameters())
    assert capabilities(choice).passes_per_step == 2
    assert type(optimizer.base_optimizer).__name__.lower() == base
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        calls = []
        optimizer.step(closure_for(model, optimizer, x, y, calls))
        assert len(calls) == 2
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("node, key", [({"name": "gsam", "rho_min": 0.2, "rho_max": 0.1}, "optimizer.rho_min"),
                                       ({"name": "gsam", "alpha": -0.1}, "optimizer.alpha"),
                                       ({"name": "gsam", "m": 4}, "optimizer.m")])
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
    experiment = loop_experiment(model, x, torch.randint(0, 3, (32,)), {"name": "gsam", "lr": 0.1},
                                 TrainerConfig(epochs=1, progress=False), batch_size=32)
    progress = Progress()
    status = train(experiment, progress, Collect())
    bn, flat = model[1], x.view(32, 4)
    assert status == "completed" and progress.passes == 2
    torch.testing.assert_close(bn.running_mean, 0.1 * flat.mean(0))          # momentum 0.1, one update
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * flat.var(0))
    assert bn.num_batches_tracked.item() == 1
