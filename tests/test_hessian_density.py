"""Oracle tests of the Hessian eigenvalue density (stochastic Lanczos quadrature, Ghorbani et al. 2019:
runner/analysis/curvature.py `slq`, `spectral_grid`, `gaussian_density`; the `hessian_density` analysis).

The oracle is the dense Hessian of test_curvature.py's tiny float64 MLP (rebuilt here: 39 parameters, indefinite,
with a 5-fold zero eigenvalue from softmax's shift invariance), its eigenvalues and eigenvectors. The model-free parts
(moments, the density's distance to the dense one) use the dense matrix as the operator, so that hundreds of
probes cost microseconds; the first test runs the real HVP on the model. The CLI path is in test_analysis.py.
"""
import numpy as np
import pytest
import torch

from torch import nn
from torch.func import functional_call

from runner import paramspace
from runner.analysis.curvature import (_rademacher, gaussian_density, hutchinson_trace, hvp_function, slq,
                                       spectral_grid)
from runner.analysis.probe import EvalSet, Probe
from runner.config import ConfigError
from tests.test_curvature import matrix_hvp


def probe_vectors(n: int, probes: int, seed: int) -> torch.Tensor:
    """The (P, n) unit start vectors `slq` uses: z_p / sqrt(n), z_p the p-th Rademacher draw of the seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    like = [torch.zeros(n, dtype=torch.float64)]
    return torch.stack([_rademacher(like, generator) for _ in range(probes)]) / np.sqrt(n)


def clusters(values: np.ndarray, tolerance: float = 1e-8) -> list[np.ndarray]:
    """Indices of the (ascending) eigenvalues grouped into numerically equal clusters."""
    breaks = np.flatnonzero(np.diff(values) > tolerance) + 1
    return np.split(np.arange(len(values)), breaks)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """torch on one thread for this module (tiny problems; on shared cores more threads only spin), restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense(single_thread):
    """(probe, data, H, eigenvalues ascending, eigenvectors as columns) of test_curvature's MLP (5 -> 4 -> 3 tanh,
    float64, 20 samples, cross-entropy). H by torch.autograd.functional.hessian: independent of our HVP, and
    without torch.func's one-time warm-up (seconds)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    probe = Probe(model)

    def flat_loss(flat):
        return nn.functional.cross_entropy(functional_call(model, dict(zip(probe.names, paramspace.unflatten(
            flat, probe.params))), (x,)), y)

    h = torch.autograd.functional.hessian(flat_loss, paramspace.flatten(probe.params))
    values, vectors = torch.linalg.eigh(h)
    return probe, EvalSet(x, y, 20), h, values.numpy(), vectors.numpy()


# ------------------------------------------------------------------- (a) full steps: the exact spectral measure
def test_full_steps_give_the_dense_eigenvalues_and_the_probes_projections(dense):
    """With as many Lanczos steps as parameters, each probe's nodes are the distinct eigenvalues of H and each
    weight is the probe's squared projection onto that eigenspace (Gauss quadrature of v's spectral measure is
    the measure itself once the Krylov space is invariant); the trace is Hutchinson's with the same probes."""
    probe, data, h, values, vectors = dense
    n, probes = h.shape[0], 2
    hvp = hvp_function(probe, probe.params, data, method="double_backward")
    found = slq(hvp, probe.params, probes=probes, iterations=n, seed=5)
    groups = clusters(values)
    assert len(groups) < n and found["dimension"] == n  # the 5-fold zero: Lanczos breaks down early
    assert found["steps"].tolist() == [len(groups)] * probes
    distinct = np.array([values[g].mean() for g in groups])
    v = probe_vectors(n, probes, seed=5).numpy()
    for p in range(probes):
        k = found["steps"][p]
        nodes, weights = found["nodes"][p, :k], found["weights"][p, :k]
        assert np.isnan(found["nodes"][p, k:]).all() and not found["weights"][p, k:].any()  # padding
        np.testing.assert_allclose(np.sort(nodes), distinct, atol=1e-6)       # every eigenvalue, each once
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        projections = np.array([np.sum((vectors[:, g].T @ v[p]) ** 2) for g in groups])  # ||P_lambda v||^2
        np.testing.assert_allclose(weights[np.argsort(nodes)], projections, atol=1e-6)
    assert found["lambda_min"] == pytest.approx(values[0], abs=1e-8) and values[0] < -0.1
    assert found["lambda_max"] == pytest.approx(values[-1], abs=1e-8)
    quadratic = np.einsum("pi,ij,pj->p", v, h.numpy(), v)                       # v_p^T H v_p
    assert found["trace"] == pytest.approx(n * quadratic.mean(), rel=1e-10)
    assert found["trace"] == pytest.approx(hutchinson_trace(hvp, probe.params, samples=probes, seed=5)["trace"],
                                           rel=1e-10)
    negative = values < -found["negative_tolerance"]
    expected = np.mean([np.sum((vectors[:, negative].T @ v[p]) ** 2) for p in range(probes)])
    assert found["negative_mass"] == pytest.approx(expected, abs=1e-6) and 0 < expected < 1


# ------------------------------------------------------------------------------- (b) moments and normalization
def test_moments_are_exact_per_probe_and_match_the_traces_within_monte_carlo_error(dense):
    """m = 4 steps: each probe's rule integrates t^k exactly for k < 2m = 8, so sum_j w_j theta_j^k = v^T H^k v.
    Averaged over P probes this estimates tr(H^k)/n; for Rademacher z, Var(z^T A z) = 2 sum_{i != j} A_ij^2, so
    the mean of v^T A v = z^T A z / n over P probes has standard error sqrt(2 sum_{i!=j} A_ij^2 / P) / n, computed
    here from the dense A = H^k. The seeded draw is within 4 of those (the chance of a miss for a random seed is
    below 1/16 by Chebyshev, ~6e-5 for the near-normal mean of 400 draws)."""
    _, _, h, values, _ = dense
    n, probes, steps = h.shape[0], 400, 4
    found = slq(matrix_hvp(h), [torch.zeros(n, dtype=torch.float64)], probes=probes, iterations=steps, seed=0)
    assert found["steps"].tolist() == [steps] * probes
    nodes, weights = found["nodes"], found["weights"]
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-12)
    v = probe_vectors(n, probes, seed=0).numpy()
    for k in range(1, 2 * steps):
        a = np.linalg.matrix_power(h.numpy(), k)
        exact = np.einsum("pi,ij,pj->p", v, a, v)                                 # v_p^T H^k v_p
        np.testing.assert_allclose((weights * nodes ** k).sum(1), exact, rtol=1e-9, atol=1e-12)
        if k <= 2:
            off_diagonal = np.sum(a ** 2) - np.sum(np.diag(a) ** 2)
            stderr = np.sqrt(2 * off_diagonal / probes) / n
            estimate = (weights * nodes ** k).sum(1).mean()
            assert abs(estimate - np.trace(a) / n) < 4 * stderr, (k, estimate, np.trace(a) / n, stderr)
    assert found["trace"] == pytest.approx(n * (weights * nodes).sum(1).mean(), rel=1e-12)
    assert found["second_moment"] == pytest.approx((weights * nodes ** 2).sum(1).mean(), rel=1e-12)
    grid, sigma_abs = spectral_grid(nodes, 0.01, 2000)
    density = gaussian_density(nodes, weights, grid, sigma_abs)
    assert sigma_abs == pytest.approx(0.01 * (np.nanmax(nodes) - np.nanmin(nodes)))
    assert np.sum(density) * (grid[1] - grid[0]) == pytest.approx(1.0, abs=1e-6)  # integrates to 1 on the grid
    assert density.min() >= 0


# --------------------------------------------------------------------------------- (c) against the dense density
@pytest.mark.parametrize("probes", [8, 32])
def test_broadened_slq_density_is_close_to_the_dense_spectrums(dense, probes):
    """With full steps, phi_slq = sum_i wbar_i g(t - lambda_i), wbar_i = mean_p (u_i^T v_p)^2, against
    phi = sum_i (1/n) g(t - lambda_i) with the same Gaussian g: by the triangle inequality ||phi_slq - phi||_1 <=
    sum_i |wbar_i - 1/n|, and E|wbar_i - 1/n| <= sd(wbar_i) <= sqrt(2/P)/n (Var (u^T z)^2 = 2 - 2 sum u^4 <= 2), so
    E L1 <= sqrt(2/P). The seeded L1 is below that bound; the dense density shifted by 2 sigma is not."""
    _, _, h, values, _ = dense
    n = h.shape[0]
    found = slq(matrix_hvp(h), [torch.zeros(n, dtype=torch.float64)], probes=probes, iterations=n, seed=1)
    grid, sigma_abs = spectral_grid(found["nodes"], 0.02, 4000)
    dx = grid[1] - grid[0]
    estimate = gaussian_density(found["nodes"], found["weights"], grid, sigma_abs)
    exact = gaussian_density(values[None], np.full((1, n), 1 / n), grid, sigma_abs)
    bound = np.sqrt(2 / probes)
    distance = np.sum(np.abs(estimate - exact)) * dx
    assert distance < bound, (distance, bound)
    wrong = gaussian_density(values[None] + 2 * sigma_abs, np.full((1, n), 1 / n), grid, sigma_abs)
    assert np.sum(np.abs(wrong - exact)) * dx > bound  # the bound tells a spectrum shifted by 2 sigma apart
    assert np.sum(exact) * dx == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------- edges and config
def test_a_zero_hessian_and_a_single_probe():
    """H = 0: one node at 0 (immediate breakdown), a grid of width 1 around it, a density of mass 1, no
    standard error from one probe."""
    like = [torch.zeros(6, dtype=torch.float64)]
    found = slq(matrix_hvp(torch.zeros(6, 6, dtype=torch.float64)), like, probes=1, iterations=6)
    assert found["steps"].tolist() == [1] and found["nodes"][0, 0] == 0 and np.isnan(found["nodes"][0, 1:]).all()
    assert found["trace"] == 0 and found["negative_mass"] == 0 and np.isnan(found["trace_stderr"])
    grid, sigma_abs = spectral_grid(found["nodes"], 0.05, 500)
    assert sigma_abs == pytest.approx(0.05) and grid[0] == pytest.approx(-0.25) and grid[-1] == pytest.approx(0.25)
    density = gaussian_density(found["nodes"], found["weights"], grid, sigma_abs)
    assert np.sum(density) * (grid[1] - grid[0]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="probes"):
        slq(matrix_hvp(torch.zeros(6, 6, dtype=torch.float64)), like, probes=0)


BAD = {
    "sigma": [float("nan"), float("inf"), 0.0, -0.1, 2.0],
    "probes": [0],
    "iterations": [1, 1001],
    "grid_points": [100],  # 100 points cannot resolve sigma = 0.01 of the width: needs 2 per sigma
    "loss": ["smoothed"],
    "method": ["fast"],
    "samples": [0],
}


@pytest.fixture(scope="module")
def default_node():
    """The composed `analysis` node of `analysis=hessian_density` (conf/analysis/hessian_density.yaml), as a dict."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=["analysis=hessian_density"]).analysis)


def with_setting(node: dict, **settings) -> dict:
    return {**node, "hessian_density": {**node["hessian_density"], **settings}}


@pytest.mark.parametrize("key,value", [(k, v) for k, values in BAD.items() for v in values])
def test_bad_settings_are_one_config_error_naming_the_key(default_node, key, value):
    from runner.analysis import validate_plan

    with pytest.raises(ConfigError) as error:
        validate_plan(with_setting(default_node, **{key: value}))
    message = str(error.value)
    assert f"analysis.hessian_density.{key}" in message and "\n" not in message, message


def test_a_nan_from_the_command_line_is_refused(compose):
    """Hydra parses `nan` into a float: refused (by the schema layer's finite check, before the range check)."""
    from omegaconf import OmegaConf

    from runner.analysis import validate_plan

    cfg = compose(["analysis=hessian_density", "analysis.hessian_density.sigma=nan"])
    with pytest.raises(ConfigError, match=r"analysis.hessian_density.sigma=nan \(allowed: a finite"):
        validate_plan(OmegaConf.to_container(cfg.analysis, resolve=True))


def test_default_settings_validate_and_grid_points_follow_sigma(default_node):
    from runner.analysis import validate_plan

    params = validate_plan(default_node).choices[0].params
    assert (params.probes, params.iterations, params.sigma, params.grid_points, params.loss) == (
        3, 90, 0.01, 10000, "plain")
    assert validate_plan(with_setting(default_node, sigma=0.001, grid_points=2021)) is not None
    with pytest.raises(ConfigError, match="2021..1000000"):  # 2 (1 + 10 sigma) / sigma + 1 points: spacing sigma / 2
        validate_plan(with_setting(default_node, sigma=0.001, grid_points=2020))


# ------------------------------------------------------------------------------------------------- figures
def test_density_and_ritz_figures_are_written(tmp_path):
    from runner.analysis import plots

    grid = np.linspace(-1, 3, 801)
    nodes = np.array([[2.5, 0.4, 0.0, -0.3, np.nan]])
    density = gaussian_density(nodes, np.array([[0.01, 0.3, 0.5, 0.19, 0.0]]), grid, 0.04)
    density[5] = np.nan  # a non-finite value is masked, not a crash
    path = plots.plot_density(grid, density, tmp_path / "sub" / "density.png", "title", nodes=nodes,
                              stats={"lambda_max": 2.5, "negative mass": 0.19})
    assert path.stat().st_size > 0
    path = plots.plot_ritz([3.0, 1.0, 0.2, -0.5], [1e-3, 0.2, 0.7, 0.0], tmp_path / "ritz.png", "title", top_k=2)
    assert path.stat().st_size > 0
