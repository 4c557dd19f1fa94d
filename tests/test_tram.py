"""TRAM against a hand-written float64 step from the paper's equations (Algorithm 1; Eqs. 2, 4, 5, 7), its cost (2
forward+backward + 1 forward a step), the state a resume needs (its CLI runs on digits and the grokking task:
tests/test_every_method.py)."""
import copy
import io

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.config import ConfigError
from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.bn import FrozenBNStats
from runner.optim.tram import TRAM
from runner.step import StepClosure

STEPS, LR, MOMENTUM, WD = 10, 0.1, 0.9, 1e-2


def tiny_problem(steps=STEPS, n=16):
    """A float64 MLP and one fresh batch per step (so 'this batch at the previous weights' differs from 'the
    previous step's logits', which a wrong implementation might reuse)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    batches = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))) for _ in range(steps)]
    return model, batches


def step_closure(model, optimizer, x, y):
    return StepClosure(model, nn.functional.cross_entropy, x, y, autocast=torch.autocast("cpu", enabled=False),
                       frozen_bn=FrozenBNStats(model), params=list(model.parameters()),
                       zero_grad=lambda: optimizer.zero_grad(set_to_none=True))


# ----------------------------------------------------------------------------------------- the oracle
def oracle(model, batches, reference, adaptive, base, sigma=0.1):
    """Algorithm 1 written out: d = mean_x KL(p_ref || p_w) (Eq. 4/5), e = d T² g / ||T g|| (Eq. 7), the base
    step with g(w + e); torch SGD (coupled L2) / AdamW (decoupled) by hand. Returns weights and each step's d."""
    f = lambda w, x: functional_call(model, w, (x,))                               # noqa: E731
    g_fn = lambda w, x, y: grad(lambda v: nn.functional.cross_entropy(f(v, x), y))(w)  # noqa: E731
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    first, previous = dict(w), dict(w)
    state = {k: {"buf": None, "m": torch.zeros_like(v), "v": torch.zeros_like(v)} for k, v in w.items()}
    radii = []
    for t, (x, y) in enumerate(batches, start=1):
        g = g_fn(w, x, y)
        logits = f(w, x)
        if reference == "noise":
            target = f(w, x + sigma * torch.randn_like(x))                         # p(.|x + z, w_t)
        else:
            target = f(previous if reference == "previous" else first, x)          # p(.|x, w_{t-1}) or (.|x, w_0)
        p, log_p, log_q = target.softmax(-1), target.log_softmax(-1), logits.log_softmax(-1)
        d = (p * (log_p - log_q)).sum(-1).mean()                                   # forward KL, batch mean
        radii.append(d)
        t_w = {k: (v.abs() if adaptive else torch.ones_like(v)) for k, v in w.items()}
        norm = torch.sqrt(sum(((t_w[k] * g[k]) ** 2).sum() for k in w))
        e = {k: d * t_w[k] ** 2 * g[k] / (norm + 1e-12) for k in w}               # Eq. 7
        g2 = g_fn({k: w[k] + e[k] for k in w}, x, y)                               # Eq. 6
        previous = dict(w)
        new = {}
        for k in w:
            s = state[k]
            if base == "sgd":
                step = g2[k] + WD * w[k]
                s["buf"] = step.clone() if s["buf"] is None else MOMENTUM * s["buf"] + step
                new[k] = w[k] - LR * s["buf"]
            else:  # AdamW, betas (0.9, 0.99), eps 1e-8, decoupled decay
                b1, b2 = 0.9, 0.99
                s["m"] = b1 * s["m"] + (1 - b1) * g2[k]
                s["v"] = b2 * s["v"] + (1 - b2) * g2[k] ** 2
                m_hat, v_hat = s["m"] / (1 - b1 ** t), s["v"] / (1 - b2 ** t)
                new[k] = w[k] * (1 - LR * WD) - LR * m_hat / (v_hat.sqrt() + 1e-8)
        w = new
    return w, radii


def build(model, base, **kwargs):
    if base == "sgd":
        return TRAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, weight_decay=WD, **kwargs)
    return TRAM(model.parameters(), torch.optim.AdamW, lr=LR, betas=(0.9, 0.99), weight_decay=WD, **kwargs)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("reference, adaptive", [("previous", True), ("previous", False), ("initial", True),
                                                 ("noise", True)])
def test_ten_steps_match_the_papers_equations(base, reference, adaptive):
    model, batches = tiny_problem()
    torch.manual_seed(1)                       # the noise draws: one randn_like(x) a step in both
    expected, radii = oracle(model, batches, reference, adaptive, base)
    optimizer = build(model, base, reference=reference, adaptive=adaptive)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    torch.manual_seed(1)
    for t, (x, y) in enumerate(batches):
        closure = step_closure(model, optimizer, x, y)
        calls_before = len(forwards)
        optimizer.step(closure)
        assert closure.passes == 2 and closure._calls == 2           # 2 forward+backward passes ...
        assert len(forwards) - calls_before == 3                       # ... and 1 forward-only pass
        torch.testing.assert_close(optimizer.radius, radii[t], atol=1e-13, rtol=0)
    if reference != "noise":
        assert radii[0].item() == 0                                    # step 1: the reference is w_1 itself
    assert all(r.item() > 0 for r in radii[1:])                        # then a real trust region
    diff = max((p.detach() - expected[k]).abs().max().item() for k, p in model.named_parameters())
    assert diff < 1e-12, diff


def test_first_step_is_the_base_step_and_the_perturbation_follows_the_gradient():
    """d = 0 on the first step: exactly the base optimizer. The released code's e (θ² d / ||θ g||, no g) would
    differ from ours even in sign: ours is an ascent direction, <e, g> > 0."""
    model, batches = tiny_problem(steps=2)
    twin = copy.deepcopy(model)
    optimizer = build(model, "sgd")
    sgd = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    x, y = batches[0]
    optimizer.step(step_closure(model, optimizer, x, y))
    sgd.zero_grad()
    nn.functional.cross_entropy(twin(x), y).backward()
    sgd.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    x, y = batches[1]
    closure = step_closure(model, optimizer, x, y)
    closure()
    optimizer.after_pass()
    optimizer.radius = torch.tensor(0.01, dtype=torch.float64)
    e = optimizer.perturbation(optimizer._groups())[0]
    g = [p.grad for p in model.parameters()]
    assert sum((a * b).sum() for a, b in zip(e, g)).item() > 0


def test_rho_max_and_scale():
    model, batches = tiny_problem(steps=3)
    twin = copy.deepcopy(model)
    _, radii = oracle(copy.deepcopy(model), batches[:2], "previous", True, "sgd")
    capped = build(model, "sgd", rho_max=radii[1].item() / 2)
    scaled = build(twin, "sgd", scale=3.0)
    for x, y in batches[:2]:
        capped.step(step_closure(model, capped, x, y))
        scaled.step(step_closure(twin, scaled, x, y))
    assert capped.radius.item() == pytest.approx(radii[1].item() / 2, rel=1e-12)
    torch.testing.assert_close(scaled.radius, 3 * radii[1], atol=1e-14, rtol=0)


def test_reference_forward_leaves_bn_running_statistics_to_the_first_pass():
    torch.manual_seed(0)
    x, y = torch.rand(32, 4), torch.randint(0, 3, (32,))
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))   # BN input does not depend on the weights
    optimizer = TRAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for _ in range(2):
        optimizer.step(step_closure(model, optimizer, x, y))
    bn = model[0]
    torch.testing.assert_close(bn.running_mean, (1 - 0.9 ** 2) * x.mean(0))   # two updates (momentum 0.1)
    assert bn.num_batches_tracked.item() == 2


def test_state_dict_carries_the_reference_weights_and_a_resume_is_exact():
    model, batches = tiny_problem(steps=5)
    optimizer = build(model, "adamw")
    for x, y in batches[:3]:
        optimizer.step(step_closure(model, optimizer, x, y))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)                  # tensors only
    assert len(state["tram_reference"]) == len(list(model.parameters()))
    twin_model = copy.deepcopy(model)
    twin = build(twin_model, "adamw")
    twin.load_state_dict(state)
    for x, y in batches[3:]:
        optimizer.step(step_closure(model, optimizer, x, y))
        twin.step(step_closure(twin_model, twin, x, y))
        torch.testing.assert_close(twin.radius, optimizer.radius, atol=0, rtol=0)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_refusals():
    model, batches = tiny_problem(steps=1)
    optimizer = build(model, "sgd")
    x, y = batches[0]

    def plain():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match="closure.logits"):
        optimizer.step(plain)
    tokens = nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(8, 3))
    noisy = TRAM(tokens.parameters(), torch.optim.SGD, lr=0.1, reference="noise")
    with pytest.raises(RuntimeError, match="reference=previous or initial"):
        noisy.step(step_closure(tokens, noisy, torch.randint(0, 5, (4, 2)), torch.randint(0, 3, (4,))))
    for key, value in [("reference", "pretrained"), ("rho_max", -1.0), ("sigma", -0.1)]:
        with pytest.raises(ConfigError, match=f"optimizer.{key}"):
            OPTIMIZERS.validate({"name": "tram", key: value}, prefix="optimizer")


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_builds_from_config_over_both_bases_and_steps(base):
    model, batches = tiny_problem(steps=2)
    choice = OPTIMIZERS.validate({"name": "tram", "base": base, "lr": 1e-2})
    optimizer = build_optimizer(choice, model.parameters())
    base_class = torch.optim.SGD if base == "sgd" else torch.optim.AdamW
    assert isinstance(optimizer.base_optimizer, base_class) and capabilities(choice).passes_per_step == 2
    if base == "adamw":
        assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in batches:
        optimizer.step(step_closure(model, optimizer, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
