"""RWP / m-RWP / average-direction SAM (runner/optim/rwp.py) against a hand-written float64 step with the same
noise: filter-wise (or per-tensor, or isotropic) Gaussian draws, the mixed gradient, SGD with momentum; passes per
step; the noise stream survives a checkpoint; both bases; the CLI."""
import copy
import io
import json

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.rwp import RWP, step_seed
from tiny import tiny_problem


def plain_closure(model, optimizer, x, y, calls):
    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        calls.append(1)
        return loss
    return closure


def hand_std(w: torch.Tensor, scale: str) -> torch.Tensor:
    """The noise std per unit sigma, written out: one norm per row (output filter) of a matrix, else per tensor."""
    if scale == "none":
        return torch.ones_like(w)
    if scale == "filter" and w.dim() == 2:
        rows = [torch.sqrt((w[i] ** 2).sum()) for i in range(w.shape[0])]
        return torch.stack(rows)[:, None].expand_as(w)
    return torch.full_like(w, float(torch.sqrt((w ** 2).sum())) + 1e-16)


def hand_rwp(model, x, y, steps, sigma, draws, lam, scale, seed, lr, momentum, wd):
    """lam g(w) + (1 - lam)/K sum_k g(w + eps_k), eps_k = sigma * std * z_k with z_k drawn in parameter order;
    then torch's SGD (coupled L2, heavy ball)."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buf = {k: None for k in w}
    g_fn = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))
    for t in range(steps):
        gen = torch.Generator().manual_seed(step_seed(seed, t))
        std = {k: hand_std(w[k], scale) for k in w}
        g = {k: torch.zeros_like(v) for k, v in w.items()}
        if lam > 0:
            g0 = g_fn(w)
            g = {k: g[k] + lam * g0[k] for k in w}
        for _ in range(draws):
            eps = {k: torch.randn(w[k].shape, generator=gen, dtype=torch.float64) * sigma * std[k] for k in w}
            gk = g_fn({k: w[k] + eps[k] for k in w})
            g = {k: g[k] + (1 - lam) / draws * gk[k] for k in w}
        for k in w:
            d = g[k] + wd * w[k]
            buf[k] = d.clone() if buf[k] is None else momentum * buf[k] + d
            w[k] = w[k] - lr * buf[k]
    return w


@pytest.mark.parametrize("lam, draws, scale", [(0.5, 1, "filter"), (0.0, 3, "filter"), (0.3, 2, "tensor"),
                                               (0.0, 2, "none")])
def test_rwp_matches_the_hand_written_step_with_the_same_noise(lam, draws, scale):
    sigma, lr, momentum, wd, seed, steps = 0.3, 0.1, 0.9, 1e-2, 1234, 12
    model, x, y = tiny_problem()
    expected = hand_rwp(model, x, y, steps, sigma, draws, lam, scale, seed, lr, momentum, wd)
    optimizer = RWP(model.parameters(), torch.optim.SGD, sigma=sigma, draws=draws, lam=lam, scale=scale, seed=seed,
                    lr=lr, momentum=momentum, weight_decay=wd)
    for _ in range(steps):
        calls = []
        optimizer.step(plain_closure(model, optimizer, x, y, calls))
        assert len(calls) == draws + (lam > 0)               # K passes, plus one at w for m-RWP
    worst = max((p.detach() - expected[k]).abs().max().item() for k, p in model.named_parameters())
    assert worst < 1e-12, worst
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), tiny_problem()[0].parameters()))
    assert moved > 1e-2                                       # the comparison is not trivially between two w0


def test_sigma_zero_is_the_base_optimizer():
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    rwp = RWP(model.parameters(), torch.optim.SGD, sigma=0.0, draws=2, lam=0.5, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        rwp.step(plain_closure(model, rwp, x, y, []))
        sgd.step(plain_closure(twin, sgd, x, y, []))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)


def test_the_noise_stream_survives_a_checkpoint_exactly():
    model, x, y = tiny_problem()
    torch.manual_seed(7)                                      # the run's seed seeds the noise
    opt = RWP(model.parameters(), torch.optim.SGD, sigma=0.5, draws=2, lam=0.0, lr=0.1, momentum=0.9)
    assert opt.seed == 7
    for _ in range(3):
        opt.step(plain_closure(model, opt, x, y, []))
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)               # the runner's checkpoints are read this way
    twin_model = copy.deepcopy(model)
    twin = RWP(twin_model.parameters(), torch.optim.SGD, sigma=0.5, draws=2, lam=0.0, lr=0.1, momentum=0.9,
               seed=99)                                       # another seed: the checkpoint's wins
    twin.load_state_dict(state)
    assert (twin.seed, twin.noise_step) == (7, 3)
    for _ in range(3):
        opt.step(plain_closure(model, opt, x, y, []))
        twin.step(plain_closure(twin_model, twin, x, y, []))
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_rwp_over_both_bases_builds_and_steps(base):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "rwp", "base": base, "lr": 1e-2, "draws": 2, "lam": 0.25})
    optimizer = build_optimizer(choice, model.parameters())
    assert type(optimizer.base_optimizer).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[base]
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    optimizer.step(plain_closure(model, optimizer, x, y, calls))
    assert len(calls) == capabilities(choice).passes_per_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_config_ranges_are_checked():
    from runner.config import ConfigError

    for key, value in [("sigma", -0.1), ("draws", 0), ("lam", 1.0), ("scale", "layer")]:
        with pytest.raises(ConfigError, match=f"optimizer.{key}"):
            OPTIMIZERS.validate({"name": "rwp", key: value})


def test_cli_run_measures_the_declared_passes(run_cli, tmp_path):
    out = run_cli("optimizer=rwp", "trainer.epochs=2", "optimizer.draws=2")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["passes_per_step"] == 3 and summary["passes_per_step_measured"] == 3
