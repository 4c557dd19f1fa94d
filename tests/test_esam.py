"""ESAM against a hand-written float64 step from the paper's equations (same SWP masks), its selected-sample count
and pass count, its equivalence with SAM at beta = gamma = 1, exact resume, BN statistics, bases and the CLI."""
import copy
import io
import json

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.bn import FrozenBNStats
from runner.optim.esam import ESAM, selected_count, swp_seed
from runner.optim.sam import SAM
from runner.step import StepClosure

SEED = 1234


def tiny_problem(n=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    return model, x, y


def objective(logits, y, reduction="mean"):
    return nn.functional.cross_entropy(logits, y, reduction=reduction)


def step_closure(model, optimizer, x, y):
    """The loop's closure (runner/step.py) with per-sample losses, as the loop builds it for ESAM."""
    return StepClosure(model, objective, x, y, autocast=torch.autocast("cpu", enabled=False),
                       frozen_bn=FrozenBNStats(model), params=list(model.parameters()),
                       zero_grad=lambda: optimizer.zero_grad(set_to_none=True), per_sample=True)


def masks_for(w: dict, step: int, beta: float, per_tensor: bool) -> dict:
    """The documented recipe: a CPU generator seeded with swp_seed(seed, step), tensors in parameter order."""
    gen = torch.Generator().manual_seed(swp_seed(SEED, step))
    if per_tensor:
        coins = (torch.rand(len(w), generator=gen) < beta).tolist()
        return {k: torch.full_like(v, float(c)) for (k, v), c in zip(w.items(), coins)}
    return {k: (torch.rand(v.shape, generator=gen) < beta).double() for k, v in w.items()}


@pytest.mark.parametrize("per_tensor", [False, True])
def test_esam_matches_the_papers_equations_for_ten_steps(per_tensor):
    rho, beta, gamma, lr, momentum, wd = 0.5, 0.5, 0.5, 0.1, 0.9, 1e-2
    model, x, y = tiny_problem()
    n, k = len(y), selected_count(gamma, len(y))
    assert k == 8
    w = {name: v.detach().clone() for name, v in model.named_parameters()}
    buf = {name: None for name in w}

    def losses(p, xs, ys):                                    # per-sample l_i
        return objective(functional_call(model, p, (xs,)), ys, reduction="none")

    g_fn = grad(lambda p, xs, ys: losses(p, xs, ys).mean())
    chosen_expected = []
    for step in range(10):
        g = g_fn(w, x, y)                                                        # g = grad L_B(w)
        m = masks_for(w, step, beta, per_tensor)
        norm = torch.sqrt(sum(((m[q] if per_tensor else 1) * g[q] ** 2).sum() for q in w))  # code: ||g_S||
        e = {q: rho / beta * m[q] * g[q] / (norm + 1e-12) for q in w}         # rho/beta m⊙g/||g||
        w_e = {q: w[q] + e[q] for q in w}
        with torch.no_grad():
            s = losses(w_e, x, y) - losses(w, x, y)                              # s_i = l_i(w+e) - l_i(w)
        chosen = torch.topk(s, k).indices.sort().values                          # B+: the k largest
        chosen_expected.append(chosen.tolist())
        g_plus = g_fn(w_e, x[chosen], y[chosen])                                # grad L_{B+}(w + e)
        for q in w:                                                              # torch SGD, coupled L2
            d = g_plus[q] + wd * w[q]
            buf[q] = d.clone() if buf[q] is None else momentum * buf[q] + d
            w[q] = w[q] - lr * buf[q]

    optimizer = ESAM(model.parameters(), torch.optim.SGD, rho=rho, beta=beta, gamma=gamma, seed=SEED,
                     swp_per_tensor=per_tensor, lr=lr, momentum=momentum, weight_decay=wd)
    for step in range(10):
        closure = step_closure(model, optimizer, x, y)
        selected = []
        optimizer.step(_Spy(closure, selected))
        assert selected == [None, chosen_expected[step]]       # first pass on B, second on B+ (the top k)
        assert closure.samples == n + k and closure.passes == 1.5  # forward+backward samples: 16 + 8
        assert optimizer.second_pass_fraction == 0.5 and optimizer.forward_only_passes == 1.0
    diff = max((p.detach() - w[q]).abs().max().item() for q, p in model.named_parameters())
    print(f"ESAM per_tensor={per_tensor}: max |w - oracle| after 10 steps = {diff:.2e}")
    assert diff < 1e-12


class _Spy:
    """A StepClosure that records the `select` of each call (forwards every other attribute)."""

    def __init__(self, closure, log):
        self._closure, self._log = closure, log

    def __call__(self, select=None, **kwargs):
        self._log.append(None if select is None else select.tolist())
        return StepClosure.__call__(self._closure, select=select, **kwargs)

    def __getattr__(self, name):
        return getattr(self._closure, name)


def test_beta_and_gamma_one_is_sam():
    """No mask, every sample: SAM's update and 2 passes, no ranking forward."""
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    esam = ESAM(model.parameters(), torch.optim.SGD, rho=0.3, beta=1.0, gamma=1.0, lr=0.1, momentum=0.9)
    sam = SAM(twin.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    for _ in range(10):
        closure = step_closure(model, esam, x, y)
        esam.step(closure)
        sam.step(step_closure(twin, sam, x, y))
        assert closure.passes == 2 and esam.second_pass_fraction == 1.0 and esam.forward_only_passes == 0.0
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_swp_masks_keep_a_fraction_beta_change_every_step_and_depend_only_on_seed_and_step():
    big = [torch.empty(400, 250), torch.empty(1000)]
    opt = ESAM([nn.Parameter(t) for t in big], torch.optim.SGD, beta=0.6, seed=7, lr=0.1)
    a, b = opt.swp_masks(big, 0), opt.swp_masks(big, 1)
    kept = sum(m.sum().item() for m in a) / sum(m.numel() for m in a)
    assert abs(kept - 0.6) < 0.01
    assert not torch.equal(a[0], b[0])
    assert all(torch.equal(u, v) for u, v in zip(a, opt.swp_masks(big, 0)))         # step 0 again: same
    other = ESAM([nn.Parameter(t) for t in big], torch.optim.SGD, beta=0.6, seed=8, lr=0.1)
    assert not torch.equal(a[0], other.swp_masks(big, 0)[0])                        # another run's seed


def test_resume_mid_run_continues_exactly(tmp_path):
    """The masks' clock (step count) and seed are in the state dict: checkpoint after 3 steps, go on 4 more."""
    model, x, y = tiny_problem()
    make = lambda m: ESAM(m.parameters(), torch.optim.SGD, rho=0.5, beta=0.5, gamma=0.5, seed=SEED,  # noqa
                          lr=0.1, momentum=0.9)
    opt = make(model)
    for _ in range(3):
        opt.step(step_closure(model, opt, x, y))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)                   # what a checkpoint reads back
    twin = copy.deepcopy(model)
    twin.load_state_dict(saved["model"])
    resumed = ESAM(twin.parameters(), torch.optim.SGD, rho=0.5, beta=0.5, gamma=0.5, seed=99, lr=0.1, momentum=0.9)
    resumed.load_state_dict(saved["optimizer"])
    assert (resumed.steps, resumed.seed) == (3, SEED)
    for _ in range(4):
        opt.step(step_closure(model, opt, x, y))
        resumed.step(step_closure(twin, resumed, x, y))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_bn_running_statistics_come_from_the_first_pass_only():
    """The ranking forward at w + e and the second pass on B+ leave BN's running statistics alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)                                            # one update, at w, on the whole batch
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.5, beta=0.5, gamma=0.5, lr=0.1)
    opt.step(step_closure(model, opt, x, y))
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert model[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_builds_and_steps_over_both_bases(base):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "esam", "base": base, "lr": 0.01})
    caps = capabilities(choice)
    assert caps.passes_per_step == 1.5 and caps.per_sample_loss
    opt = build_optimizer(choice, model.parameters())
    assert isinstance(opt.base_optimizer, {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[base])
    before = [p.detach().clone() for p in model.parameters()]
    closure = step_closure(model, opt, x, y)
    opt.step(closure)
    assert closure.passes == 1.5
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_plain_closure_is_refused_with_a_message():
    model, x, y = tiny_problem()
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = objective(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="per-sample"):
        opt.step(closure)


def test_cli_runs_and_reports_the_measured_passes(run_cli, tmp_path):
    """1280 samples in batches of 64: every step is 1 + 32/64 forward+backward passes."""
    out = run_cli("optimizer=esam", "trainer.epochs=2", "dataset.subset=1280")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["passes_per_step"] == 1.5 and summary["passes_per_step_measured"] == 1.5
    assert summary["optimizer_stats"] == {"second_pass_fraction": 0.5}
    assert summary["forward_only_passes"] == 40  # the ranking forward, one per step, counted apart
