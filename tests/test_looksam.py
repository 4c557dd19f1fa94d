"""LookSAM against a hand-written float64 computation of the paper's rule (k = 3, 10 steps), its pass count
(the second pass really skipped), an exact resume from the middle of a k-cycle, BN statistics, bases and the CLI."""
import copy
import io
import json

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.bn import FrozenBNStats
from runner.optim.looksam import LookSAM
from runner.step import StepClosure


def tiny_problem(n=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    return model, x, y


def closure_for(model, optimizer, x, y, calls):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        calls.append(1)
        return loss
    return closure


def norm(v: dict) -> torch.Tensor:
    return torch.sqrt(sum((t ** 2).sum() for t in v.values()))


def dot(a: dict, b: dict) -> torch.Tensor:
    return sum((a[q] * b[q]).sum() for q in a)


def test_looksam_matches_the_papers_rule_for_ten_steps_and_skips_the_second_pass():
    rho, k, alpha, lr, momentum, wd = 0.5, 3, 0.7, 0.1, 0.9, 1e-2
    model, x, y = tiny_problem()
    w = {q: v.detach().clone() for q, v in model.named_parameters()}
    buf = {q: None for q in w}
    g_fn = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))
    g_v = None
    for t in range(10):
        g = g_fn(w)
        if t % k == 0:                                                           # SAM step
            e = {q: rho * g[q] / (norm(g) + 1e-12) for q in w}
            g_s = g_fn({q: w[q] + e[q] for q in w})
            cos = dot(g, g_s) / (norm(g) * norm(g_s))
            g_v = {q: g_s[q] - norm(g_s) * cos * g[q] / norm(g) for q in w}     # the paper's g_v
            assert abs(dot(g_v, g)) < 1e-12                                      # orthogonal to g
            d = g_s
        else:                                                                    # reuse step
            d = {q: g[q] + alpha * norm(g) / norm(g_v) * g_v[q] for q in w}
        for q in w:                                                              # torch SGD, coupled L2
            u = d[q] + wd * w[q]
            buf[q] = u.clone() if buf[q] is None else momentum * buf[q] + u
            w[q] = w[q] - lr * buf[q]

    optimizer = LookSAM(model.parameters(), torch.optim.SGD, rho=rho, k=k, alpha=alpha, lr=lr, momentum=momentum,
                        weight_decay=wd)
    passes = []
    for _ in range(10):
        calls = []
        optimizer.step(closure_for(model, optimizer, x, y, calls))
        passes.append(len(calls))
    assert passes == [2, 1, 1, 2, 1, 1, 2, 1, 1, 2]           # 14 passes in 10 steps; 1 + 1/k per k-cycle
    diff = max((p.detach() - w[q]).abs().max().item() for q, p in model.named_parameters())
    print(f"LookSAM: max |w - oracle| after 10 steps = {diff:.2e}")
    assert diff < 1e-12


def test_pytorch_optimizers_looksam_runs_two_passes_every_step():
    """What the docstring says of the reference: the gradient at w before `step`, and the closure in every step."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    model, x, y = tiny_problem()
    opt = pytorch_optimizer.LookSAM(model.parameters(), torch.optim.SGD, k=3, lr=0.1)
    calls = []
    for _ in range(6):
        closure = closure_for(model, opt, x, y, calls)
        closure()                                  # its protocol: the first gradient before step
        opt.step(closure)
    assert len(calls) == 12                        # 2 per step, LookSAM's k notwithstanding


def test_resume_in_the_middle_of_a_cycle_equals_the_uninterrupted_run():
    """g_v and the step count survive a checkpoint (read back with weights_only=True)."""
    model, x, y = tiny_problem()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.5, k=3, alpha=0.7, lr=0.1, momentum=0.9)
    for _ in range(5):                             # steps 0..4: the next (5) reuses g_v of step 3
        opt.step(closure_for(model, opt, x, y, []))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["looksam_steps"] == 5 and len(saved["optimizer"]["looksam_g_v"]) == 4
    twin = copy.deepcopy(model)
    twin.load_state_dict(saved["model"])
    resumed = LookSAM(twin.parameters(), torch.optim.SGD, rho=0.5, k=3, alpha=0.7, lr=0.1, momentum=0.9)
    resumed.load_state_dict(saved["optimizer"])
    for _ in range(5):
        calls, twin_calls = [], []
        opt.step(closure_for(model, opt, x, y, calls))
        resumed.step(closure_for(twin, resumed, x, y, twin_calls))
        assert len(calls) == len(twin_calls)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_a_skipped_sam_step_keeps_the_previous_g_v():
    model, x, y = tiny_problem()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.5, k=1, lr=0.1)
    opt.step(closure_for(model, opt, x, y, []))
    kept = {p: v.clone() for p, v in opt.g_v.items()}

    def bad():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * float("nan")
        loss.backward()
        return loss

    opt.step(bad)
    assert opt.skipped_steps == 1 and all(torch.equal(kept[p], v) for p, v in opt.g_v.items())


def test_bn_running_statistics_come_from_the_first_pass_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.5, k=2, lr=0.1)
    closure = StepClosure(model, nn.functional.cross_entropy, x, y, autocast=torch.autocast("cpu", enabled=False),
                          frozen_bn=FrozenBNStats(model), params=list(model.parameters()),
                          zero_grad=lambda: opt.zero_grad(set_to_none=True))
    opt.step(closure)                              # a SAM step: 2 passes, one BN update
    assert closure.passes == 2
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert model[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_builds_and_steps_over_both_bases(base):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "looksam", "base": base, "lr": 0.01, "k": 4})
    assert capabilities(choice).passes_per_step == 1.25
    opt = build_optimizer(choice, model.parameters())
    assert isinstance(opt.base_optimizer, {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[base])
    calls = []
    for _ in range(8):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure_for(model, opt, x, y, calls))
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(calls) == 10


def test_cli_runs_and_reports_the_measured_passes(run_cli, tmp_path):
    """1280 samples in batches of 64, 2 epochs: 40 steps, 8 of them SAM steps (k = 5): 48 passes."""
    out = run_cli("optimizer=looksam", "trainer.epochs=2", "dataset.subset=1280")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["passes_per_step"] == 1.2 and summary["passes_per_step_measured"] == 1.2
