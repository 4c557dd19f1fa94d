"""Oracle tests of runner/analysis/curvature.py: dense Hessians of tiny float64 models, quadratics with a known
spectrum and closed-form SAM/ASAM sharpness, and the live model left bitwise unchanged."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from runner import paramspace
from runner.analysis.curvature import (edge_of_stability, hutchinson_trace, hvp_function, lanczos, sam_sharpness,
                                       top_eigenvalues)
from runner.analysis.probe import EvalSet, Probe


# ------------------------------------------------------------------------------------------------- fixtures
def mlp_problem(batch_size=7):
    """5 -> 4 -> 3 tanh MLP in float64 (39 parameters), 20 samples, cross-entropy; and its dense Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    probe = Probe(model)
    names, live = paramspace.named_trainable(model)

    def flat_loss(flat):
        params = dict(zip(names, paramspace.unflatten(flat, live)))
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    dense = torch.func.hessian(flat_loss)(paramspace.flatten(probe.params))
    return probe, EvalSet(x, y, batch_size), dense


class Shift(nn.Module):
    """logits = w + x: with a quadratic objective, L(w) = mean_i 1/2 (w+x_i)^T A (w+x_i) + b^T (w+x_i) is a
    quadratic in w with Hessian A and gradient A (w + mean x) + b."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return self.w + x


def quadratic_problem(eigenvalues, seed=0, n=12, batch_size=5):
    """A Probe whose data loss is a quadratic with Hessian A = Q diag(eigenvalues) Q^T; returns (probe, data,
    objective, A, gradient at the model's point, the gradient as a function of the point)."""
    generator = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    a = (a + a.T) / 2
    b = torch.randn(d, generator=generator, dtype=torch.float64)
    w = torch.randn(d, generator=generator, dtype=torch.float64)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    objective = lambda logits, y: (0.5 * ((logits @ a) * logits).sum(1) + logits @ b).mean()  # noqa: E731
    probe = Probe(Shift(w))
    data = EvalSet(x, torch.zeros(n, dtype=torch.long), batch_size)
    gradient = lambda point: a @ (point + x.mean(0)) + b  # noqa: E731
    return probe, data, objective, a, gradient(w), gradient


def matrix_hvp(a):
    return lambda v: [a @ v[0]]


def spectrum_matrix(eigenvalues, seed=0):
    generator = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return (a + a.T) / 2


# ---------------------------------------------------------------------------------------- HVP against dense H
@pytest.mark.parametrize("method", ["forward_over_reverse", "double_backward", "auto"])
def test_hvp_matches_dense_hessian_with_batches(method):
    probe, data, dense = mlp_problem(batch_size=7)  # 7 does not divide 20: batches of 7, 7, 6
    hvp = hvp_function(probe, probe.params, data, method=method)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(dense.shape[0], generator=generator, dtype=torch.float64)
        hv = hvp(paramspace.unflatten(v, probe.params))
        assert all(t.dtype == torch.float64 for t in hv)
        torch.testing.assert_close(paramspace.flatten(hv), dense @ v, rtol=1e-10, atol=1e-12)
    if method == "auto":  # both ran on the first product, timed; the faster is kept
        assert hvp.method in ("forward_over_reverse", "double_backward") and set(hvp.timings) == {
            "forward_over_reverse_s", "double_backward_s"}
    else:
        assert hvp.method == method


def test_lanczos_full_dimension_recovers_the_dense_spectrum():
    probe, data, dense = mlp_problem()
    exact = torch.linalg.eigvalsh(dense).numpy()
    hvp = hvp_function(probe, probe.params, data)
    result = lanczos(hvp, probe.params, iterations=dense.shape[0])
    ritz = result["eigenvalues"]
    assert np.all(np.diff(ritz) <= 0)  # descending
    assert result["lambda_max"] == pytest.approx(exact[-1], abs=1e-8)
    assert result["lambda_min"] == pytest.approx(exact[0], abs=1e-8)
    assert exact[0] < -1e-6  # the network's Hessian is indefinite: lambda_min is a real test
    # every Ritz value is an eigenvalue and every eigenvalue is found (repeated ones once: softmax's shift
    # invariance makes 0 an eigenvalue of multiplicity 5, so Lanczos breaks down before 39 steps)
    assert np.abs(ritz[:, None] - exact[None, :]).min(1).max() < 1e-8
    assert np.abs(ritz[:, None] - exact[None, :]).min(0).max() < 1e-8
    assert result["iterations"] <= dense.shape[0]
    assert result["residuals"].max() < 1e-8


def test_hutchinson_on_the_mlp_within_three_standard_errors():
    probe, data, dense = mlp_problem(batch_size=20)
    result = hutchinson_trace(hvp_function(probe, probe.params, data), probe.params, samples=200, seed=0)
    assert result["samples"] == 200 and result["stderr"] > 0
    assert abs(result["trace"] - torch.trace(dense).item()) < 3 * result["stderr"]


# -------------------------------------------------------------------------------- quadratics, known spectra
def test_lanczos_finds_a_negative_eigenvalue_of_largest_magnitude():
    values = [-5.0, -1.0, 0.5, 1.0, 2.0, 3.0]   # |lambda| is largest at -5: power iteration would return -5
    probe, data, objective, a, *_ = quadratic_problem(values)
    hvp = hvp_function(probe, probe.params, data, objective)
    result = lanczos(hvp, probe.params, iterations=50)  # capped at the dimension
    assert result["iterations"] == 6
    np.testing.assert_allclose(result["eigenvalues"], sorted(values, reverse=True), atol=1e-10)
    assert result["lambda_max"] == pytest.approx(3.0, abs=1e-10)
    assert result["lambda_min"] == pytest.approx(-5.0, abs=1e-10)
    top = top_eigenvalues(hvp, probe.params, k=3, iterations=6)
    np.testing.assert_allclose(top["top"], [3.0, 2.0, 1.0], atol=1e-10)
    assert top["bottom"] == pytest.approx(-5.0, abs=1e-10)
    assert top["lambda_min"] == top["bottom"] and top["lambda_max"] == top["top"][0]


def test_lanczos_few_iterations_converge_to_extremes_of_a_large_spectrum():
    values = np.concatenate([[-20.0], np.linspace(-1, 1, 198), [50.0]])  # 200 dims, isolated extremes
    like = [torch.zeros(200, dtype=torch.float64)]
    result = lanczos(matrix_hvp(spectrum_matrix(values)), like, iterations=30, seed=3)
    assert result["iterations"] == 30
    assert result["lambda_max"] == pytest.approx(50.0, rel=1e-8)
    assert result["lambda_min"] == pytest.approx(-20.0, rel=1e-8)
    assert np.all(result["eigenvalues"] <= 50 + 1e-8) and np.all(result["eigenvalues"] >= -20 - 1e-8)  # interlacing


def test_lanczos_stops_on_breakdown():
    a = torch.diag(torch.tensor([2.0, 2.0, 2.0, -1.0, -1.0], dtype=torch.float64))  # two distinct eigenvalues
    result = lanczos(matrix_hvp(a), [torch.zeros(5, dtype=torch.float64)], iterations=5)
    assert result["iterations"] == 2
    np.testing.assert_allclose(result["eigenvalues"], [2.0, -1.0], atol=1e-12)


def test_hutchinson_exact_on_a_diagonal_matrix():
    d = torch.linspace(-3, 7, 50, dtype=torch.float64)
    result = hutchinson_trace(lambda v: [d * v[0]], [torch.zeros(50, dtype=torch.float64)], samples=10)
    assert result["trace"] == pytest.approx(d.sum().item(), abs=1e-12)
    assert result["stderr"] == pytest.approx(0.0, abs=1e-12)
    assert result["samples"] == 10


def test_hutchinson_within_three_standard_errors_on_a_dense_matrix():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(30, 30, generator=generator, dtype=torch.float64)
    a = (m + m.T) / 2 + 3 * torch.eye(30, dtype=torch.float64)
    like = [torch.zeros(5, 6, dtype=torch.float64)]  # a 2-D tensor: flatten/unflatten round trip
    result = hutchinson_trace(lambda v: [(a @ v[0].reshape(-1)).reshape(5, 6)], like, samples=400, seed=1)
    exact = torch.trace(a).item()
    variance = 2 * (a.pow(2).sum() - a.diag().pow(2).sum()).item()  # of one probe
    assert result["stderr"] == pytest.approx(math.sqrt(variance / 400), rel=0.2)
    assert abs(result["trace"] - exact) < 3 * result["stderr"]
    assert hutchinson_trace(lambda v: [(a @ v[0].reshape(-1)).reshape(5, 6)], like, samples=400, seed=1) == result


# --------------------------------------------------------------------------------------------- SAM sharpness
def quadratic_value(a, g, e):
    """L(w + e) - L(w) of a quadratic with Hessian a and gradient g at w."""
    return (g @ e + 0.5 * e @ a @ e).item()


def test_sam_sharpness_one_step_closed_form():
    probe, data, objective, a, g, _ = quadratic_problem([0.5, 1.0, 2.0, 4.0, 8.0])
    rho = 0.1
    result = sam_sharpness(probe, probe.params, data, objective, rho=rho)
    e = rho * g / g.norm()
    assert result["sharpness"] == pytest.approx(quadratic_value(a, g, e), rel=1e-9)
    assert result["perturbed_loss"] - result["loss"] == pytest.approx(result["sharpness"], abs=1e-15)
    w = probe.params[0]
    loss = objective(w + data.x, data.y).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-12)


def test_sam_sharpness_multi_step_is_between_one_step_and_the_bound():
    probe, data, objective, a, _, gradient = quadratic_problem([0.1, 0.5, 3.0, 20.0, 40.0], seed=2)
    # a point near the minimum (not the model's own): the curvature term dominates the gradient term
    zero = torch.zeros(5, dtype=torch.float64)
    minimum = zero - torch.linalg.solve(a, gradient(zero))
    w = minimum + 0.01 * torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = gradient(w)
    rho = 0.3
    one = sam_sharpness(probe, [w], data, objective, rho=rho, steps=1)["sharpness"]
    many = sam_sharpness(probe, [w], data, objective, rho=rho, steps=10)["sharpness"]
    assert one == pytest.approx(quadratic_value(a, g, rho * g / g.norm()), rel=1e-9)
    bound = rho * g.norm().item() + rho ** 2 * 40.0 / 2  # max over the ball of g.e + 1/2 e^T A e
    assert one <= many <= bound
    assert many > 1.3 * one  # ascent in several steps turns toward the top eigenvector
    assert sam_sharpness(probe, probe.params, data, objective, rho=rho, steps=10)["sharpness"] >= \
        sam_sharpness(probe, probe.params, data, objective, rho=rho, steps=1)["sharpness"]


def test_asam_sharpness_closed_form():
    probe, data, objective, a, g, _ = quadratic_problem([0.5, 1.0, 2.0, 4.0], seed=1)
    rho, eta = 0.5, 0.01
    result = sam_sharpness(probe, probe.params, data, objective, rho=rho, adaptive=True, eta=eta)
    t = probe.params[0].abs() + eta
    e = rho * t ** 2 * g / (t * g).norm()
    assert (e / t).norm().item() == pytest.approx(rho)  # on the boundary of ASAM's ball
    assert result["sharpness"] == pytest.approx(quadratic_value(a, g, e), rel=1e-9)
    multi = sam_sharpness(probe, probe.params, data, objective, rho=rho, steps=5, adaptive=True, eta=eta)
    assert multi["sharpness"] >= result["sharpness"] - 1e-12


def test_sam_sharpness_batches_do_not_matter():
    probe, data, objective, a, g, _ = quadratic_problem([1.0, 2.0, 3.0], n=12, batch_size=5)
    whole = EvalSet(data.x, data.y, 12)
    for kwargs in ({}, {"steps": 3}, {"adaptive": True}):
        split = sam_sharpness(probe, probe.params, data, objective, **kwargs)
        assert sam_sharpness(probe, probe.params, whole, objective, **kwargs) == pytest.approx(split, rel=1e-12)


# ------------------------------------------------------------------------------------- the live model is safe
def test_every_function_leaves_the_model_bitwise_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    with torch.no_grad():
        for _ in range(3):
            model(x + 1)  # non-trivial running statistics
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe, data = Probe(model), EvalSet(x, y, 10)

    for method in ("auto", "forward_over_reverse", "double_backward"):
        hvp = hvp_function(probe, probe.params, data, method=method)
        lanczos(hvp, probe.params, iterations=4)
        top_eigenvalues(hvp, probe.params, k=2, iterations=4)
        hutchinson_trace(hvp, probe.params, samples=3)
    for kwargs in ({}, {"steps": 3}, {"adaptive": True, "eta": 0.01}):
        sam_sharpness(probe, probe.params, data, rho=0.1, **kwargs)

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_batch_norm_hessian_matches_dense():
    """BN uses its running statistics (eval mode), so H of the BN model equals the dense Hessian of the
    eval-mode function, in both HVP methods (float32: tolerances of float32)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model(torch.randn(16, 3, dtype=torch.float64) * 2 + 1)
    model.eval()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    probe = Probe(model)
    names, live = paramspace.named_trainable(model)
    buffers = dict(model.named_buffers())
    dense = torch.func.hessian(lambda flat: nn.functional.cross_entropy(
        functional_call(model, {**dict(zip(names, paramspace.unflatten(flat, live))), **buffers}, (x,)), y))(
        paramspace.flatten(probe.params))
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    for method in ("forward_over_reverse", "double_backward"):
        hv = hvp_function(probe, probe.params, EvalSet(x, y, 4), method=method)(paramspace.unflatten(v, live))
        torch.testing.assert_close(paramspace.flatten(hv), dense @ v, rtol=1e-10, atol=1e-12)


class _OldStyleSquare(torch.autograd.Function):
    """An autograd.Function without setup_context: torch.func transforms reject it, autograd does not."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class SquareModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2).double()

    def forward(self, x):
        return _OldStyleSquare.apply(self.linear(x))


def test_auto_falls_back_to_double_backward():
    torch.manual_seed(0)
    probe = Probe(SquareModel())
    data = EvalSet(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)), 3)
    v = [torch.randn_like(p) for p in probe.params]
    with pytest.raises(RuntimeError):
        hvp_function(probe, probe.params, data, method="forward_over_reverse")(v)
    auto = hvp_function(probe, probe.params, data)
    with pytest.warns(UserWarning, match="double backward"):
        hv = auto(v)
    assert auto.method == "double_backward"
    expected = hvp_function(probe, probe.params, data, method="double_backward")(v)
    torch.testing.assert_close(hv, expected, rtol=0, atol=0)
    # the dense oracle: x -> (Wx+b)^2 written with plain ops
    names, live = paramspace.named_trainable(probe.model)
    dense = torch.func.hessian(lambda flat: nn.functional.cross_entropy(
        functional_call(probe.model.linear, dict(zip(["weight", "bias"], paramspace.unflatten(flat, live))),
                        (data.x,)) ** 2, data.y))(paramspace.flatten(probe.params))
    torch.testing.assert_close(paramspace.flatten(hv), dense @ paramspace.flatten(v), rtol=1e-10, atol=1e-12)


def test_unknown_method_is_rejected():
    probe, data, _ = mlp_problem()
    with pytest.raises(ValueError, match="unknown HVP method"):
        hvp_function(probe, probe.params, data, method="finite_differences")


# ------------------------------------------------------------------------------ seeds, devices and arithmetic
def recording_hvp(a, seen):
    def hvp(v):
        seen.append(v[0].detach().clone())
        return [a.to(v[0].device) @ v[0]]
    return hvp


def test_start_vector_depends_only_on_the_seed():
    a = spectrum_matrix([1.0, 2.0, 3.0, 4.0])
    like = [torch.zeros(4, dtype=torch.float64)]
    first, again, other = [], [], []
    lanczos(recording_hvp(a, first), like, iterations=2, seed=7)
    lanczos(recording_hvp(a, again), like, iterations=2, seed=7)
    torch.manual_seed(123)  # the global generator plays no part
    lanczos(recording_hvp(a, other), like, iterations=2, seed=8)
    expected = torch.randn(4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(first[0], again[0])
    torch.testing.assert_close(first[0], expected / expected.norm(), rtol=0, atol=0)
    assert not torch.equal(first[0], other[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_random_vectors_identical_on_cuda():
    a = spectrum_matrix([1.0, -2.0, 3.0, 4.0, 5.0])
    cpu, gpu = [], []
    lanczos(recording_hvp(a, cpu), [torch.zeros(5, dtype=torch.float64)], iterations=1, seed=4)
    lanczos(recording_hvp(a, gpu), [torch.zeros(5, dtype=torch.float64, device="cuda")], iterations=1, seed=4)
    assert gpu[0].device.type == "cuda" and torch.equal(cpu[0], gpu[0].cpu())
    cpu, gpu = [], []
    hutchinson_trace(recording_hvp(a, cpu), [torch.zeros(5, dtype=torch.float64)], samples=3, seed=4)
    hutchinson_trace(recording_hvp(a, gpu), [torch.zeros(5, dtype=torch.float64, device="cuda")], samples=3, seed=4)
    assert all(torch.equal(c, g.cpu()) for c, g in zip(cpu, gpu))


def test_float32_model_gives_float32_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    probe = Probe(model)
    data = EvalSet(torch.randn(6, 3), torch.randint(0, 2, (6,)), 6)
    hv = hvp_function(probe, probe.params, data)([torch.ones_like(p) for p in probe.params])
    assert all(t.dtype == torch.float32 for t in hv)
    assert lanczos(hvp_function(probe, probe.params, data), probe.params, iterations=3)["iterations"] == 3


def test_edge_of_stability():
    assert edge_of_stability(40.0, 0.05) == pytest.approx(1.0)
    assert edge_of_stability(10.0, 0.1) == pytest.approx(0.5)
    assert edge_of_stability(0.0, 1.0) == 0.0


# ----------------------------------------------------------------------------------- the stability threshold
def _run_on_quadratic(choice, lr: float, a: torch.Tensor, steps: int = 300) -> float:
    """||w|| after `steps` steps of the registry's optimizer (torch's own update) on L(w) = w^T A w / 2 from a
    seeded start, relative to the start: ~0 when stable, huge when not."""
    import dataclasses

    from runner.optim import build_optimizer

    choice = type(choice)(choice.entry, dataclasses.replace(choice.params, lr=lr))
    w = torch.nn.Parameter(torch.randn(a.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    optimizer = build_optimizer(choice, [w])
    start = w.detach().norm().item()
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * w @ a @ w).backward()
        optimizer.step()
    return w.detach().norm().item() / start


@pytest.mark.parametrize("node, factor", [
    ({"name": "sgd", "momentum": 0.0}, 2.0),                                 # gradient descent: 2/lr
    ({"name": "sgd", "momentum": 0.9}, 2 * 1.9),                             # heavy ball: 2(1+b)/lr
    ({"name": "sgd", "momentum": 0.5}, 2 * 1.5),
    ({"name": "sgd", "momentum": 0.9, "nesterov": True}, 3.8 / 2.8),        # Nesterov: (2+2b)/((1+2b) lr)
    ({"name": "sam", "momentum": 0.9, "rho": 0.0}, 2 * 1.9),                # a wrapper: its base's threshold
])
def test_stability_threshold_is_where_the_optimizer_diverges_on_a_quadratic(node, factor, one_thread):
    """Oracle: on L(w) = w^T A w / 2 with top eigenvalue 10, the optimizer's declared threshold factor/lr (runner/
    optim `stability`) is the closed form, the iteration matrix's spectral radius crosses 1 there, and the real
    optimizer converges at lr 2% below lr* = factor/10 and diverges 2% above it."""
    from runner.optim import OPTIMIZERS, stability

    node = {"weight_decay": 0.0, **node}
    choice = OPTIMIZERS.validate(node)
    rule = stability(choice)
    assert rule.factor == pytest.approx(factor)
    lam, lr_star = 10.0, factor / 10.0
    assert rule.threshold(lr_star) == pytest.approx(lam) and rule.ratio(lam, lr_star) == pytest.approx(1.0)
    beta = node.get("momentum", 0.0)
    for scale, stable in ((0.98, True), (1.02, False)):
        step = scale * lr_star * lam  # the iteration on the top eigenvector: (w, v) -> M (w, v), torch's SGD
        if node.get("nesterov"):
            m = np.array([[1 - step * (1 + beta), -step * beta**2 / lam], [lam, beta]])
        else:
            m = np.array([[1 - step, -step * beta / lam], [lam, beta]])
        assert (max(abs(np.linalg.eigvals(m))) < 1) == stable
    a = spectrum_matrix([lam, 4.0, 1.0])
    if "rho" not in node:  # the dynamics of the optimizer itself (SAM's rho=0 step is its base's)
        assert _run_on_quadratic(choice, 0.98 * lr_star, a) < 1e-3
        assert _run_on_quadratic(choice, 1.02 * lr_star, a) > 1e3
    assert edge_of_stability(lam, lr_star, rule.factor) == pytest.approx(1.0)


def test_adaptive_methods_have_no_lambda_max_threshold_and_every_optimizer_says_which():
    """Every registered optimizer resolves to a rule: declared by itself, or (a wrapper) its base's; Adam-type,
    sign and adaptive-step methods declare that no threshold of lambda_max applies, with a reason."""
    from runner.optim import OPTIMIZERS, Wraps, stability

    for name in OPTIMIZERS.names():
        choice = OPTIMIZERS.validate({"name": name})
        if not isinstance(choice.params, Wraps):
            assert choice.entry.capabilities.get("stability") is not None, f"{name} declares no stability rule"
        rule = stability(choice)
        assert (rule.factor is None) == bool(rule.note.count("no edge-of-stability threshold")), name
    for name in ("adam", "adamw", "lion", "grams", "momo", "momo_adam", "gravity"):
        rule = stability(OPTIMIZERS.validate({"name": name}))
        assert rule.factor is None and math.isnan(rule.threshold(0.1)) and math.isnan(rule.ratio(5.0, 0.1))
    wrapped = stability(OPTIMIZERS.validate({"name": "sam", "base": "adamw"}))
    assert wrapped.factor is None and "sam wraps adamw" in wrapped.note and "preconditioned" in wrapped.note


def test_top_eigenvalues_says_why_it_returns_fewer_than_k():
    """k larger than what Lanczos can give: fewer values and a note saying why (the dimension, or a breakdown on a
    spectrum with repeated eigenvalues)."""
    small = top_eigenvalues(matrix_hvp(spectrum_matrix([5.0, 3.0, 1.0])), [torch.zeros(3, dtype=torch.float64)],
                            k=6, iterations=6)
    assert len(small["top"]) == 3 and "3 dimensions" in small["note"]
    repeated = spectrum_matrix([5.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0])  # 3 distinct eigenvalues in 8 dimensions
    found = top_eigenvalues(matrix_hvp(repeated), [torch.zeros(8, dtype=torch.float64)], k=8, iterations=8)
    assert len(found["top"]) == 3 and "broke down after 3 iterations" in found["note"]
    assert top_eigenvalues(matrix_hvp(repeated), [torch.zeros(8, dtype=torch.float64)], k=2)["note"] == ""
