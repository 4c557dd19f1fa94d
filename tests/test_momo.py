"""MoMo and MoMo-Adam (runner/optim/momo.py) in float64 against
- their closed form on a quadratic L(w) = 1/2 w^T A w + c (c > 0, so lb = 0 is a valid lower bound): the first
  step is the Polyak step min(lr, (L - lb) / ||g||^2) (MoMo-Adam: in the D-norm), and every step is the exact
  minimizer of the proximal model max(model_k(y), lb) + wd/2 ||y||^2 + 1/(2 lr) ||y - x_k||^2 (D-weighted for
  MoMo-Adam), checked against perturbations and a line search of the model objective;
- a hand-written implementation of the paper's update in its explicit form (the averages as weighted sums over
  the history, not the code's recursions), for several steps on the quadratic and on a tiny network;
- the cap: a tiny lr gives tau = lr at every step, i.e. SGD with EMA momentum;
- MoMo*'s online lower bound, a checkpoint resume, the refusal without a closure (so not a SAM base), the CLI.
pytorch_optimizer 4.1 has no MoMo, so there is no package oracle.
"""
import json

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, capabilities
from runner.optim.momo import Momo, MomoAdam
from tiny import tiny_problem

OFFSET = 0.3  # L(w) = 1/2 w^T A w + OFFSET >= OFFSET > 0


class Quadratic(nn.Module):
    def __init__(self, n: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.register_buffer("A", q @ q.T / n + 0.1 * torch.eye(n, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def loss(self, w=None):
        w = self.w if w is None else w
        return 0.5 * w @ self.A @ w + OFFSET


def quad_closure(model, optimizer):
    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss()
        loss.backward()
        return loss
    return closure


def run(optimizer, model, steps):
    """Weights after each step."""
    out = []
    for _ in range(steps):
        optimizer.step(quad_closure(model, optimizer))
        out.append(model.w.detach().clone())
    return out


# ------------------------------------------------------------------------------------------------- hand-written
def ema_weights(k: int, beta: float, from_first: bool) -> list[float]:
    """Weights of steps 1..k in an average with momentum beta: started at 0 (bias-corrected by the caller), or
    started at the first value (then step 1 keeps beta^(k-1))."""
    w = [(1 - beta) * beta ** (k - j) for j in range(1, k + 1)]
    if from_first:
        w[0] = beta ** (k - 1)
    return w


def hand_momo(f, g, x0, steps, lr, beta, wd=0.0, lb=0.0, bias_correction=False, adam=False, betas=(0.9, 0.999),
              eps=1e-8, divide=True):
    """The paper's update with the averages written as explicit sums over the history (f_j, g_j, x_j)."""
    x, history, out = x0.clone(), [], []
    for k in range(1, steps + 1):
        history.append((f(x), g(x), x.clone()))
        if adam:
            b1, b2 = betas
            rho_w = ema_weights(k, b1, from_first=False)
            rho = 1 - b1 ** k
            v = sum(c * gj ** 2 for c, (_, gj, _) in zip(ema_weights(k, b2, False), history))
            D = torch.sqrt(v / (1 - b2 ** k)) + eps
        else:
            rho_w = ema_weights(k, beta, from_first=not bias_correction)
            rho = 1 - beta ** k if bias_correction else 1.0
            D = torch.ones_like(x)
        d = sum(c * gj for c, (_, gj, _) in zip(rho_w, history))
        fbar = sum(c * fj for c, (fj, _, _) in zip(rho_w, history))
        gamma = sum(c * (gj @ xj) for c, (_, gj, xj) in zip(rho_w, history))
        s = 1 + lr * wd
        nom = s * (fbar - rho * lb) + d @ x - s * gamma
        tau = min(lr / rho, max(float(nom), 0.0) / float((d * d / D).sum()))
        if adam and not divide:
            x = (1 - lr * wd) * x - tau * d / D
        else:
            x = (x - tau * d / D) / s
        out.append(x.clone())
    return out


def quad_fns(model):
    A = model.A
    return (lambda w: 0.5 * w @ A @ w + OFFSET), (lambda w: A @ w)


# ------------------------------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("lr", [10.0, 1e-3])       # uncapped (Polyak) and capped (lr)
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_momo_first_step_is_the_polyak_step(lr, beta):
    model = Quadratic()
    w0 = model.w.detach().clone()
    g0, f0 = model.A @ w0, model.loss(w0)
    expected = w0 - min(lr, float(f0 / (g0 @ g0))) * g0
    (w1,) = run(Momo([model.w], lr=lr, beta=beta), model, 1)
    assert torch.allclose(w1, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("lr", [10.0, 1e-3])
def test_momo_adam_first_step_is_the_polyak_step_in_the_adam_norm(lr):
    model = Quadratic()
    w0 = model.w.detach().clone()
    g0, f0 = model.A @ w0, model.loss(w0)
    D = g0.abs() + 1e-8                                                  # sqrt(v_1 / (1 - beta2)) = |g|
    expected = w0 - min(lr, float(f0 / (g0 * g0 / D).sum())) * g0 / D
    (w1,) = run(MomoAdam([model.w], lr=lr), model, 1)
    assert torch.allclose(w1, expected, rtol=0, atol=1e-14)


MOMO_CASES = [dict(lr=1.0, beta=0.9), dict(lr=1.0, beta=0.5, wd=0.1), dict(lr=0.05, beta=0.9, lb=0.1),
              dict(lr=1.0, beta=0.9, bias_correction=True), dict(lr=2.0, beta=0.8, wd=0.05, bias_correction=True)]
ADAM_CASES = [dict(lr=1e-1), dict(lr=1.0, betas=(0.8, 0.99), wd=0.1), dict(lr=1e-1, wd=0.2, divide=False),
              dict(lr=1e-2, lb=0.1)]


def build(adam: bool, case: dict, params):
    kw = dict(case)
    wd = kw.pop("wd", 0.0)
    return (MomoAdam if adam else Momo)(params, weight_decay=wd, **kw)


@pytest.mark.parametrize("adam, case", [(False, c) for c in MOMO_CASES] + [(True, c) for c in ADAM_CASES])
def test_steps_match_the_hand_written_update_on_a_quadratic(adam, case):
    model = Quadratic()
    f, g = quad_fns(model)
    expected = hand_momo(f, g, model.w.detach().clone(), 8, adam=adam, **{k: v for k, v in case.items()},
                         **({"beta": 0.0} if adam else {}))
    got = run(build(adam, case, [model.w]), model, 8)
    worst = max((a - b).abs().max().item() for a, b in zip(got, expected))
    assert worst < 1e-12, worst


def model_objective(y, x_k, history_state, lr, wd, lb, D):
    """max(model_k(y), lb) + wd/2 ||y||_D^2 + 1/(2 lr) ||y - x_k||_D^2, model_k(y) = fbar - gamma + <d, y>."""
    fbar, gamma, d = history_state
    return (torch.clamp(fbar - gamma + d @ y, min=lb) + 0.5 * wd * (D * y * y).sum()
            + (D * (y - x_k) ** 2).sum() / (2 * lr))


@pytest.mark.parametrize("adam, case", [(False, dict(lr=1.0, beta=0.9)), (False, dict(lr=1.0, beta=0.9, wd=0.3)),
                                        (False, dict(lr=0.05, beta=0.7, lb=0.2)),
                                        (True, dict(lr=0.5, wd=0.2)), (True, dict(lr=0.5))])
def test_each_step_minimizes_the_proximal_momentum_model(adam, case):
    """The closed form is the paper's definition: x_{k+1} = argmin of the proximal model (strongly convex), so no
    perturbation of it and no point of a fine line search along the update's ray does better."""
    model = Quadratic(seed=1)
    optimizer = build(adam, case, [model.w])
    lr, wd, lb = case["lr"], case.get("wd", 0.0), case.get("lb", 0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x_k = model.w.detach().clone()
        optimizer.step(quad_closure(model, optimizer))
        x_next = model.w.detach().clone()
        state = optimizer.state[model.w]
        d, gamma = state["grad_avg"], state["grad_dot_w"]
        if adam:
            b1, b2 = optimizer.param_groups[0]["betas"]
            rho = 1 - b1 ** optimizer.steps
            D = torch.sqrt(state["grad_avg_sq"] / (1 - b2 ** optimizer.steps)) + 1e-8
        else:
            rho, D = 1.0, torch.ones_like(x_k)
        hist = (optimizer.loss_avg / rho, gamma / rho, d / rho)            # the bias-corrected model
        phi = lambda y: float(model_objective(y, x_k, hist, lr, wd, lb, D))
        best = phi(x_next)
        for scale in (1e-2, 1e-4, 1e-6):
            for _ in range(20):
                delta = torch.randn(x_k.shape, generator=gen, dtype=torch.float64) * scale
                assert best <= phi(x_next + delta) + 1e-13
        s = 1 + lr * wd                                                    # the ray x(t) = (x_k - t D^-1 d)/s
        ray = [phi((x_k - t * (d / rho) / D) / s) for t in torch.linspace(0, lr, 2001).tolist()]
        assert best <= min(ray) + 1e-13


# ------------------------------------------------------------------------------------------------- the cap
@pytest.mark.parametrize("bias_correction", [False, True])
def test_a_small_lr_caps_every_step_sgd_with_ema_momentum(bias_correction):
    lr, beta, steps = 1e-4, 0.9, 6
    model = Quadratic()
    x = model.w.detach().clone()
    optimizer = Momo([model.w], lr=lr, beta=beta, bias_correction=bias_correction)
    got = run(optimizer, model, steps)
    d = torch.zeros_like(x)
    for k, w in enumerate(got, 1):
        g = model.A @ x
        d = g if k == 1 and not bias_correction else beta * d + (1 - beta) * g
        rho = 1 - beta ** k if bias_correction else 1.0
        x = x - lr / rho * d                                                # tau = lr / rho: the cap
        assert torch.allclose(w, x, rtol=0, atol=1e-15)
    stats = optimizer.summary_stats()
    assert stats["step_size_capped_fraction"] == 1.0
    if not bias_correction:
        assert stats["step_size_mean"] == pytest.approx(lr) and stats["step_size_last"] == pytest.approx(lr)


def test_a_large_lr_never_caps_and_reaches_the_level_of_the_model():
    """Uncapped with lb = 0, beta = 0: each step moves onto the model's zero level (a Polyak step)."""
    model = Quadratic()
    optimizer = Momo([model.w], lr=1e6, beta=0.0)
    for _ in range(5):
        x = model.w.detach().clone()
        optimizer.step(quad_closure(model, optimizer))
        lin = model.loss(x) + (model.A @ x) @ (model.w.detach() - x)   # the linearization at x, at x_{k+1}
        assert abs(float(lin)) < 1e-12
    assert optimizer.summary_stats()["step_size_capped_fraction"] == 0.0


# ------------------------------------------------------------------------------------------------- MoMo*
def hand_fstar(f, g, x0, steps, lr, beta, lb0):
    """MoMo* (no weight decay, no bias correction) as in the paper's code: reset lb to half the model's level when
    the level drops below it, step, then lb <- h - tau ||d||^2 / 2, never below lb0."""
    x, lb, out = x0.clone(), lb0, []
    d = fbar = gamma = None
    for _ in range(steps):
        fk, gk = f(x), g(x)
        d = gk.clone() if d is None else beta * d + (1 - beta) * gk
        fbar = fk if fbar is None else beta * fbar + (1 - beta) * fk
        gamma = gk @ x if gamma is None else beta * gamma + (1 - beta) * (gk @ x)
        h = float(fbar + d @ x - gamma)
        if h < lb:
            lb = max(h / 2, lb0)
        norm = float(d @ d)
        tau = min(lr, max(h - lb, 0.0) / norm)
        lb = max(h - 0.5 * tau * norm, lb0)
        x = x - tau * d
        out.append((x.clone(), lb))
    return out


def test_online_lower_bound_matches_the_hand_written_estimate():
    model = Quadratic()
    f, g = quad_fns(model)
    expected = hand_fstar(f, g, model.w.detach().clone(), 8, lr=1.0, beta=0.9, lb0=0.0)
    optimizer = Momo([model.w], lr=1.0, beta=0.9, use_fstar=True)
    for x_exp, lb_exp in expected:
        optimizer.step(quad_closure(model, optimizer))
        assert torch.allclose(model.w.detach(), x_exp, rtol=0, atol=1e-12)
        assert float(optimizer.lb) == pytest.approx(lb_exp, abs=1e-12) and float(optimizer.lb) >= 0
    assert optimizer.summary_stats()["lb"] == pytest.approx(expected[-1][1], abs=1e-12)


# ------------------------------------------------------------------------------------------------- networks
def flat_fns(model, x, y):
    """f and grad of the batch loss as functions of one flat weight vector (parameter order)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def unflat(v):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    loss = lambda v: nn.functional.cross_entropy(functional_call(model, unflat(v), (x,)), y)
    return loss, grad(loss), torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("adam, case", [(False, dict(lr=1.0, beta=0.9, wd=1e-2)),
                                        (False, dict(lr=1.0, beta=0.9, bias_correction=True)),
                                        (True, dict(lr=1e-2, wd=1e-2)), (True, dict(lr=1e-1, divide=False, wd=0.1))])
def test_a_network_matches_the_hand_written_update(adam, case):
    """Several tensors: the sums <d, x>, gamma, ||d||^2 run over all of them (one step size for the model)."""
    model, x, y = tiny_problem()
    f, g, w0 = flat_fns(model, x, y)
    expected = hand_momo(f, g, w0, 6, adam=adam, **case, **({"beta": 0.0} if adam else {}))
    optimizer = build(adam, case, model.parameters())
    for step in range(6):
        def closure():
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)
        got = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert torch.allclose(got, expected[step], rtol=0, atol=1e-12), (got - expected[step]).abs().max()


# ------------------------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("adam", [False, True])
def test_a_resumed_optimizer_continues_exactly(adam):
    case = dict(lr=1.0, wd=0.1) if adam else dict(lr=1.0, beta=0.9, wd=0.1)
    model = Quadratic()
    uninterrupted = build(adam, case, [model.w])
    whole = run(uninterrupted, model, 6)
    model = Quadratic()
    first = build(adam, case, [model.w])
    run(first, model, 3)
    second = build(adam, case, [model.w])
    second.load_state_dict(first.state_dict())   # the averaged loss and the step count travel too
    rest = run(second, model, 3)
    assert torch.equal(rest[-1], whole[-1])
    assert second.summary_stats() == pytest.approx(uninterrupted.summary_stats(), rel=1e-12)


def test_step_without_the_loss_is_refused_so_not_a_sam_base():
    model = Quadratic()
    optimizer = Momo([model.w])
    model.loss().backward()
    with pytest.raises(RuntimeError, match="needs the loss value"):
        optimizer.step()
    loss = model.loss()
    optimizer.step(loss=loss)                                   # the code's other spelling: loss after backward
    assert optimizer.steps == 1
    # as a SAM base: the wrapper's base step gets neither closure nor loss: refused at validation, in one line
    from runner.config import ConfigError

    with pytest.raises(ConfigError, match="optimizer.base.name.*needs the loss"):
        OPTIMIZERS.validate({"name": "sam", "base": "momo", "lr": 1.0, "weight_decay": 0.0})


def test_registered_with_one_pass_per_step():
    for name in ("momo", "momo_adam"):
        choice = OPTIMIZERS.validate({"name": name})
        assert capabilities(choice).passes_per_step == 1
    assert OPTIMIZERS.validate({"name": "momo"}).kwargs == dict(lr=1.0, weight_decay=0.0, beta=0.9, lb=0.0,
                                                                bias_correction=False, use_fstar=False)


def test_cli_on_digits(run_cli, tmp_path):
    """Both from the CLI in one sweep (one process): completed, one pass a step, the step-size stats recorded."""
    from omegaconf import OmegaConf

    sweep = tmp_path / "sweep"
    result = run_cli("-m", "optimizer=momo,momo_adam", "trainer.epochs=2", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(sweep.rglob("summary.json"))
    assert len(runs) == 2
    for path in runs:
        name = OmegaConf.load(path.parent / ".hydra" / "config.yaml").optimizer.name
        summary = json.loads(path.read_text())
        assert summary["status"] == "completed" and summary["passes_per_step_measured"] == 1, name
        assert summary["final"]["test/acc"] > 0.5, (name, summary["final"])
        cap = {"momo": 1.0, "momo_adam": 1e-2 / (1 - 0.9)}[name]          # lr / rho, rho >= 1 - beta1
        assert 0 < summary["optimizer_stats"]["step_size_mean"] <= cap, (name, summary["optimizer_stats"])
