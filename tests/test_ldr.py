"""LDR-KL and ALDR-KL (Zhu, Ying, Yang, ICML 2023) against their definitions in float64: the closed form, its
dual (a maximum over label distributions), the lambda -> 0 / inf limits, ALDR's per-sample lambda update in closed
form and its fixed point; the sample indices reach the loss through the loop's closure; the lambdas survive a
checkpoint (a resumed run equals the uninterrupted one); both run from the CLI on digits."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from runner.losses import LOSSES


def problem(n: int = 7, k: int = 5, seed: int = 0, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale,
            torch.randint(0, k, (n,), generator=g))


def direct_ldr(z: torch.Tensor, y: torch.Tensor, lam: float, c: float) -> list[float]:
    """lam log((1/K) sum_k exp((c [k != y] + z_k - z_y) / lam)), one sample at a time, with Python floats."""
    out = []
    for zi, yi in zip(z.tolist(), y.tolist()):
        k = len(zi)
        terms = [math.exp((c * (j != yi) + zi[j] - zi[yi]) / lam) for j in range(k)]
        out.append(lam * math.log(sum(terms) / k))
    return out


def ldr(**params):
    return LOSSES.validate({"name": "ldr_kl", **params}).build(num_classes=5)


def aldr(num_samples: int | None = 7, num_classes: int = 5, **params):
    return LOSSES.validate({"name": "aldr_kl", **params}).build(num_classes=num_classes, num_samples=num_samples)


# ------------------------------------------------------------------------------------------------------- LDR-KL

@pytest.mark.parametrize("lam, c", [(1.0, 0.1), (0.3, 0.0), (5.0, 1.0), (0.1, 2.0)])
def test_ldr_kl_is_its_formula_and_the_worst_case_over_label_distributions(lam, c):
    z, y = problem()
    loss = ldr(lam=lam, margin=c)
    values = loss(z, y, reduction="none")
    torch.testing.assert_close(values, torch.tensor(direct_ldr(z, y, lam, c), dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    assert loss(z, y).item() == pytest.approx(values.mean().item(), rel=1e-14)
    assert loss(z, y, reduction="sum").item() == pytest.approx(values.sum().item(), rel=1e-14)
    # the DRO form: max over p in the simplex of sum_k p_k d_k - lam KL(p || 1/K), attained at softmax(d / lam)
    d = torch.full_like(z, c).scatter_(1, y[:, None], 0.0) + z - z.gather(1, y[:, None])
    objective = lambda p: (p * d).sum(1) - lam * (p * torch.log(p * d.shape[1])).sum(1)  # noqa: E731
    torch.testing.assert_close(objective(torch.softmax(d / lam, 1)), values, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):                                    # no other distribution does better
        p = torch.softmax(torch.randn(d.shape, generator=g, dtype=torch.float64) * 3, 1)
        assert (objective(p) <= values + 1e-12).all()
    logits = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (logits,))


def test_ldr_kl_limits_hinge_mean_and_cross_entropy():
    z, y = problem(k=5)
    c, k = 0.5, 5
    d = torch.full_like(z, c).scatter_(1, y[:, None], 0.0) + z - z.gather(1, y[:, None])
    hinge = d.max(1).values                                  # Crammer-Singer: max(0, max_{k != y} c + z_k - z_y)
    assert (hinge >= 0).all()
    for lam in (1e-2, 1e-4, 1e-6):                           # in [hinge - lam log K, hinge]
        small = ldr(lam=lam, margin=c)(z, y, reduction="none")
        assert ((hinge - small) <= lam * math.log(k) + 1e-12).all() and (small <= hinge + 1e-12).all()
    big = ldr(lam=1e7, margin=c)(z, y, reduction="none")    # -> the mean of d (a linear, symmetric loss)
    torch.testing.assert_close(big, d.mean(1), rtol=0, atol=1e-5)
    # c = 0, lam = 1: cross-entropy - log K
    torch.testing.assert_close(ldr(lam=1.0, margin=0.0)(z, y, reduction="none"),
                               F.cross_entropy(z, y, reduction="none") - math.log(k), rtol=1e-12, atol=1e-12)


def test_score_normalizations_of_the_reference_code():
    z, y = problem()
    for normalize, scores in (("softplus", F.softplus(z) / F.softplus(z).mean(1, keepdim=True)),
                              ("l1", z / z.abs().mean(1, keepdim=True))):
        got = ldr(lam=0.7, margin=0.2, normalize=normalize)(z, y, reduction="none")
        torch.testing.assert_close(got, torch.tensor(direct_ldr(scores, y, 0.7, 0.2), dtype=torch.float64))
    zero = torch.zeros(2, 5, requires_grad=True)             # all-zero scores: finite, no nan
    value = ldr(normalize="l1")(zero, torch.tensor([0, 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zero.grad).all()


# ------------------------------------------------------------------------------------------------------ ALDR-KL

def adaptive_lambda(d: torch.Tensor, lam: torch.Tensor, lam0: float, alpha: float) -> torch.Tensor:
    """The closed form, written out: p = softmax(d / lam); lam0 (1 - KL(p || 1/K) / (alpha log K))."""
    k = d.shape[1]
    p = torch.softmax(d / lam[:, None], 1)
    kl = (p * torch.log(p * k)).sum(1)
    return lam0 * (1 - kl / (alpha * math.log(k)))


def test_aldr_lambda_update_is_the_closed_form_and_the_loss_uses_it():
    z, y = problem()
    lam0, alpha, c = 0.8, 3.0, 0.1
    loss = aldr(lam0=lam0, alpha=alpha, margin=c)
    d = torch.full_like(z, c).scatter_(1, y[:, None], 0.0) + z - z.gather(1, y[:, None])
    rho = alpha * math.log(5) / lam0
    seen = torch.tensor([4, 0, 2])
    first = loss(z[seen], y[seen], reduction="none", indices=seen)
    lam = adaptive_lambda(d[seen], torch.full((3,), lam0, dtype=torch.float64), lam0, alpha)
    expected = torch.tensor([direct_ldr(z[seen][i:i + 1], y[seen][i:i + 1], lam[i].item(), c)[0] for i in range(3)],
                            dtype=torch.float64) - rho / 2 * (lam - lam0) ** 2
    torch.testing.assert_close(first, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.lambdas[seen], lam, rtol=1e-15, atol=0)        # stored (float64)
    untouched = torch.tensor([1, 3, 5, 6])
    assert (loss.lambdas[untouched] == lam0).all()
    assert ((lam >= lam0 * (1 - 1 / alpha)) & (lam <= lam0)).all()
    # the closed form is the best lambda for that p: sum p d - lam KL(p) - rho/2 (lam - lam0)^2 over a grid
    p = torch.softmax(d[seen] / lam0, 1)
    kl = (p * torch.log(p * 5)).sum(1)
    grid = torch.linspace(0.01, 2.0, 200001, dtype=torch.float64)
    best = grid[torch.argmax(-grid[None, :] * kl[:, None] - rho / 2 * (grid[None, :] - lam0) ** 2, dim=1)]
    torch.testing.assert_close(best, lam, rtol=0, atol=2e-5)
    # the next visit starts from the stored lambda
    second = loss(z[seen], y[seen], reduction="none", indices=seen)
    lam2 = adaptive_lambda(d[seen], lam, lam0, alpha)
    torch.testing.assert_close(loss.lambdas[seen], lam2, rtol=1e-14, atol=0)
    assert not torch.allclose(second, first)
    # gradient: lambda enters as a constant (the maximizer, no gradient through it, as in the reference code): the
    # gradient is psi_lam's at that lam, and psi_lam's own gradient is the math's (gradcheck)
    from runner.losses.ldr import ldr_kl, margin_differences

    logits = z[seen].clone().requires_grad_(True)
    loss(logits, y[seen], indices=seen).backward()          # a third visit: lam3 from lam2
    lam3 = loss.lambdas[seen].clone()
    torch.testing.assert_close(lam3, adaptive_lambda(d[seen], lam2, lam0, alpha), rtol=1e-14, atol=0)
    fixed = lambda t: ldr_kl(margin_differences(t, y[seen], c), lam3).mean()  # noqa: E731
    at = logits.detach().clone().requires_grad_(True)
    fixed(at).backward()
    torch.testing.assert_close(logits.grad, at.grad, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(fixed, (at.detach().clone().requires_grad_(True),))


def test_aldr_alternating_updates_reach_a_stationary_lambda():
    """Visiting the same samples with the same scores repeats p <- p*(lam), lam <- closed form(p): the fixed point
    is stationary for psi_lam - rho/2 (lam - lam0)^2 (its derivative in lam is -KL(p*_lam) - rho (lam - lam0))."""
    z, y = problem(n=5, k=4, seed=3)
    lam0, alpha, c = 1.0, 1.5, 0.1
    loss = aldr(num_samples=5, num_classes=4, lam0=lam0, alpha=alpha, margin=c)
    every = torch.arange(5)
    for _ in range(300):
        loss(z, y, indices=every)
    lam = loss.lambdas.double()
    d = torch.full_like(z, c).scatter_(1, y[:, None], 0.0) + z - z.gather(1, y[:, None])
    rho = alpha * math.log(4) / lam0
    p = torch.softmax(d / lam[:, None], 1)
    kl = (p * torch.log(p * 4)).sum(1)
    torch.testing.assert_close(-kl - rho * (lam - lam0), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-6)
    grid = torch.linspace(lam0 * (1 - 1 / alpha), lam0, 4001, dtype=torch.float64)
    for i in range(5):                                   # and it is the maximum over the range lambda can take
        values = torch.stack([torch.tensor(direct_ldr(z[i:i + 1], y[i:i + 1], g.item(), c)[0]) for g in grid[::40]])
        penalized = values - rho / 2 * (grid[::40] - lam0) ** 2
        at_lam = direct_ldr(z[i:i + 1], y[i:i + 1], lam[i].item(), c)[0] - rho / 2 * (lam[i].item() - lam0) ** 2
        assert at_lam >= penalized.max().item() - 1e-6


def test_aldr_without_indices_treats_samples_as_unseen_and_stores_nothing():
    z, y = problem()
    loss = aldr()
    loss(z, y, indices=torch.arange(7))                  # some lambdas adapted
    stored = loss.lambdas.clone()
    fresh = aldr()(z, y, reduction="none", indices=torch.arange(7))
    torch.testing.assert_close(loss(z, y, reduction="none"), fresh)
    assert torch.equal(loss.lambdas, stored)
    with pytest.raises(ValueError, match="num_samples"):
        aldr(num_samples=None)(z, y, indices=torch.arange(7))


def test_the_closure_passes_indices_to_a_loss_that_needs_them():
    """runner/step.py: `objective(..., indices=)` at every pass, a subset's and a chunk's own indices."""
    from runner.optim.bn import FrozenBNStats
    from runner.step import StepClosure

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 5)
    x, y = torch.randn(12, 4), torch.randint(0, 5, (12,))
    loss = aldr(num_samples=100)
    indices = torch.arange(40, 52)

    def closure(**kw):
        return StepClosure(model, loss, x, y, autocast=torch.autocast("cpu", enabled=False),
                           frozen_bn=FrozenBNStats(model), params=list(model.parameters()),
                           zero_grad=lambda: model.zero_grad(set_to_none=True), indices=indices, **kw)

    touched = lambda: (loss.lambdas != 1.0).nonzero().flatten().tolist()  # noqa: E731
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[1, 5]] = True
    closure()(select=mask)
    assert touched() == [41, 45]
    closure(per_sample=True)()
    assert touched() == list(range(40, 52))
    loss.lambdas.fill_(1.0)
    for chunk in closure().split(5)[:2]:
        chunk()
    assert touched() == list(range(40, 50))
    plain = StepClosure(model, F.cross_entropy, x, y, autocast=torch.autocast("cpu", enabled=False),
                        frozen_bn=FrozenBNStats(model), params=list(model.parameters()),
                        zero_grad=lambda: model.zero_grad(set_to_none=True), indices=indices)
    assert torch.isfinite(plain())                       # a loss without needs_indices gets no indices= argument


def test_the_entry_declares_what_the_module_needs():
    assert LOSSES.get("aldr_kl").capabilities.get("sample_indices") is True and aldr().needs_indices
    assert not LOSSES.get("ldr_kl").capabilities.get("sample_indices") and not getattr(ldr(), "needs_indices", False)


def test_experiment_builds_indices_and_checkpoints_the_lambdas(compose, one_thread):
    """build(): the task gives sample indices, the loss is sized by the train split and on the device; the
    lambdas go into the checkpoint and come back; a checkpoint without them (older format) still loads."""
    from runner.experiment import build
    from runner.spec import validate
    from runner.train import Progress

    spec = validate(compose(["loss=aldr_kl", "model=mlp", "dataset.imbalance_ratio=5"]))
    experiment = build(spec, torch.device("cpu"))
    assert experiment.task.train.with_indices
    assert experiment.objective.lambdas.shape == (experiment.task.train.num_samples,)
    experiment.objective.lambdas[:10] = torch.linspace(0.6, 0.9, 10, dtype=torch.float64)
    state = experiment.state_dict(Progress())
    assert torch.equal(state["objective"]["lambdas"], experiment.objective.lambdas)
    twin = build(spec, torch.device("cpu"))
    assert (twin.objective.lambdas == 1.0).all()
    twin.load_state_dict(state, "memory")
    assert torch.equal(twin.objective.lambdas, experiment.objective.lambdas)
    older = {k: v for k, v in state.items() if k != "objective"}
    third = build(spec, torch.device("cpu"))
    third.load_state_dict(older, "memory")                # tolerated: the lambdas start afresh
    assert (third.objective.lambdas == 1.0).all()
    plain = build(validate(compose(["model=mlp"])), torch.device("cpu"))
    assert not plain.task.train.with_indices and plain.state_dict(Progress())["objective"] == {}


# -------------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Both losses from the CLI on digits, 2 epochs, in one sweep (one process): sweep/ldr_kl, sweep/aldr_kl."""
    from tests.conftest import runner_process

    tmp = tmp_path_factory.mktemp("ldr_cli")
    out = runner_process(tmp, "-m", "loss=ldr_kl,aldr_kl", "trainer.epochs=2", "trainer.progress=false",
                         f"hydra.sweep.dir={tmp / 'sweep'}", "hydra.sweep.subdir=${loss.name}")
    assert out.returncode == 0, out.stderr
    return tmp / "sweep"


def test_cli_both_losses_train_on_digits(cli_runs):
    for name in ("ldr_kl", "aldr_kl"):
        summary = json.loads((cli_runs / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["final"]["test/acc"] > 0.3, (name, summary["final"])
        state = torch.load(cli_runs / name / "checkpoints" / "last.pt", weights_only=True)
        assert state["config"]["loss"]["name"] == name
        assert ("lambdas" in state["objective"]) == (name == "aldr_kl")


def test_aldr_resumed_run_equals_the_uninterrupted_one(cli_runs, compose, tmp_path, one_thread):
    """The CLI's 2 epochs uninterrupted; then, from its epoch-1 checkpoint (prev.pt), epoch 2 again in another
    folder: the same lambdas and weights at the end (the lambdas are in the checkpoint, the data order too)."""
    from runner.run import run

    whole = cli_runs / "aldr_kl" / "checkpoints"
    middle = torch.load(whole / "prev.pt", weights_only=True)
    end = torch.load(whole / "last.pt", weights_only=True)
    assert end["config"]["loss"]["name"] == "aldr_kl"
    assert middle["progress"]["epoch"] == 1 and end["progress"]["epoch"] == 2
    lam1, lam2 = middle["objective"]["lambdas"], end["objective"]["lambdas"]
    assert (lam1 < 1.0).all() and (lam1 >= 0.5).all()      # every training sample seen once: in [lam0/2, lam0]
    assert not torch.equal(lam1, lam2)
    cfg = compose(["loss=aldr_kl", "trainer.epochs=2", "trainer.progress=false", "logger=none",
                   f"trainer.resume={whole / 'prev.pt'}"])
    assert run(cfg, tmp_path / "resumed")["status"] == "completed"
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(resumed["objective"]["lambdas"], lam2)
    for key, value in end["model"].items():
        assert torch.equal(resumed["model"][key], value), key
