"""Curvature of the data loss: Hessian-vector products, Lanczos spectra, Hutchinson trace, SAM/ASAM sharpness.

What is computed, at a point w (a list of tensors in `paramspace.named_trainable` order) for
L(w) = (1/N) sum_i loss(f(x_i; w), y_i) over an evaluation set of N samples:
- `hvp_function`: v -> H v, H = the Hessian of L. Forward-over-reverse (`torch.func.jvp` of `torch.func.grad`,
  one forward+backward pass with dual numbers per batch) or double backward (Pearlmutter 1994: the gradient of
  g(w)·v, two passes per batch). The default "auto" runs both on the first product and keeps the faster (which one
  wins depends on the model, the device, even the allocator); if an op lacks forward-mode AD (or a custom
  autograd.Function does not support torch.func), it uses double backward.
- `lanczos` / `top_eigenvalues`: Ritz values of H by the Lanczos iteration with full reorthogonalization (Lanczos
  1950; Golub & Van Loan, Matrix Computations, sec. 10.1; used on neural-network Hessians by Ghorbani et al. 2019
  and PyHessian, Yao et al. 2020). Extremal eigenvalues of both signs: lambda_min is found as well as lambda_max (unlike power iteration,
  which finds the eigenvalue of largest |lambda|). Cost: one HVP per iteration.
- `hutchinson_trace`: tr(H) ~ mean of z^T H z over Rademacher probes z (Hutchinson 1989; unbiased, exact on
  diagonal matrices). Cost: one HVP per probe.
- `slq` / `spectral_grid` / `gaussian_density`: the eigenvalue density of H by stochastic Lanczos quadrature
  (Ghorbani, Krishnan & Xiao 2019; Golub & Meurant 1994; PyHessian's `density()`), Gaussian-broadened on a grid.
  Cost: probes x steps HVPs.
- `sam_sharpness`: max_{||e|| <= rho} L(w + e) - L(w) (Foret et al. 2021, SAM), by normalized-gradient ascent;
  `adaptive=True`: the ball ||T^{-1} e|| <= rho, T = |w| + eta elementwise (Kwon et al. 2021, ASAM).
  Cost: `steps` forward+backward passes over the set plus one forward.
- `edge_of_stability`: lambda_max * lr / factor (Cohen et al. 2021), factor 2 for gradient descent, 2 (1 + beta)
  with heavy-ball momentum (the optimizer's own: runner/optim `Stability`); the step is stable while it is < 1.

Conventions:
- the model is evaluated in eval mode (BatchNorm with its running statistics, no dropout) through `Probe`, with
  explicit parameters and copied buffers, so the live model stays bitwise unchanged; pass `buffers` (e.g.
  `Probe.recalibrated_buffers`) to use other BN statistics;
- no autocast; computed in float32, or in the parameters' dtype when wider (float64 tests);
- the loss is `objective` (default: plain cross-entropy) averaged over the whole evaluation set: batch means times
  batch sizes, summed, divided by N (so `objective` must be a per-sample mean for batching to be exact);
- weight decay is excluded: it would add wd to every eigenvalue, wd * #params to the trace, and its own term to
  the sharpness, hiding the curvature of the data loss;
- random vectors (Lanczos start, Rademacher probes) come from a CPU generator seeded with `seed`, then move to
  the device, so they are the same on every device.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from runner import paramspace
from runner.analysis.probe import EvalSet

Vector = list[torch.Tensor]
METHODS = ("auto", "forward_over_reverse", "double_backward")


# ------------------------------------------------------------------------------------------ loss and gradient
def _loss(probe, params: Vector, x, y, objective, buffers) -> torch.Tensor:
    """`Probe.loss`, but in the wider of float32 and the parameters' dtype (Probe.loss casts logits to float32,
    which would cap float64 tests at float32 precision), and with autocast off."""
    with torch.autocast(x.device.type, enabled=False):
        logits = probe.logits(params, x, buffers)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, y) if objective is None else objective(logits, y)


def _data_loss(probe, params: Vector, data: EvalSet, objective, buffers) -> torch.Tensor:
    """L(params) over all of `data`, a 0-d device tensor (no host sync)."""
    with torch.no_grad():
        return sum(_loss(probe, params, x, y, objective, buffers) * (len(y) / len(data)) for x, y in data.batches())


def _data_grad(probe, params: Vector, data: EvalSet, objective, buffers) -> tuple[Vector, torch.Tensor]:
    """(grad L, L) over all of `data` at `params` (plain reverse mode, one backward per batch)."""
    grad, loss = None, None
    with torch.enable_grad():
        ps = [p.detach().requires_grad_(True) for p in params]
        for x, y in data.batches():
            value = _loss(probe, ps, x, y, objective, buffers) * (len(y) / len(data))
            g = torch.autograd.grad(value, ps, allow_unused=True, materialize_grads=True)
            grad = list(g) if grad is None else torch._foreach_add(grad, g)
            loss = value.detach() if loss is None else loss + value.detach()
    return grad, loss


# ------------------------------------------------------------------------------------ Hessian-vector products
def hvp_function(probe, params: Vector, data: EvalSet, objective=None, method: str = "auto",
                 buffers: dict | None = None) -> Callable[[Vector], Vector]:
    """v -> H v with H the Hessian of the mean loss over all of `data` at `params` (weight decay excluded).

    method: "forward_over_reverse" (jvp of grad), "double_backward" (grad of g·v with create_graph), or "auto"
    (on the first call both, timed, and the faster from then on; if forward-over-reverse raises, double backward
    from then on, with a warning).
    The returned function has an attribute `method`: the one in use. v and H v are lists shaped like `params`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown HVP method {method!r}; one of {', '.join(METHODS)}")
    params = [p.detach() for p in params]

    def forward_over_reverse(v: Vector) -> Vector:
        total = None
        for x, y in data.batches():
            f = lambda ps: _loss(probe, ps, x, y, objective, buffers) * (len(y) / len(data))  # noqa: E731
            with warnings.catch_warnings():  # torch.func's first jvp scripts a helper: a FutureWarning, not ours
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
                _, hv = torch.func.jvp(torch.func.grad(f), (params,), (v,))
            total = hv if total is None else torch._foreach_add(total, hv)
        return total

    def double_backward(v: Vector) -> Vector:
        total = None
        with torch.enable_grad():
            ps = [p.detach().requires_grad_(True) for p in params]
            for x, y in data.batches():
                loss = _loss(probe, ps, x, y, objective, buffers) * (len(y) / len(data))
                g = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True, materialize_grads=True)
                gv = paramspace.dot(list(g), v)
                hv = (torch.autograd.grad(gv, ps, allow_unused=True, materialize_grads=True) if gv.requires_grad
                      else paramspace.zeros_like(ps))  # gradient constant in w: H = 0
                total = list(hv) if total is None else torch._foreach_add(total, hv)
        return total

    chosen = {"forward_over_reverse": forward_over_reverse, "double_backward": double_backward}

    def timed(method: Callable[[Vector], Vector], v: Vector) -> tuple[Vector, float]:
        if v and v[0].is_cuda:
            torch.cuda.synchronize(v[0].device)
        start = time.perf_counter()
        out = method(v)
        if v and v[0].is_cuda:
            torch.cuda.synchronize(v[0].device)
        return out, time.perf_counter() - start

    def hvp(v: Vector) -> Vector:
        v = [t.to(p.dtype) for t, p in zip(v, params)]
        if hvp.method != "auto":
            return chosen[hvp.method](v)
        # "auto", first product: both methods, timed; the faster is kept (which one wins depends on the model,
        # the device and even the allocator: scripts/bench_analysis.py). A missing forward-mode rule: double backward.
        try:
            out, forward_s = timed(forward_over_reverse, v)
        except torch.cuda.OutOfMemoryError:
            raise  # not a missing forward-mode rule: double backward would not help
        except (RuntimeError, NotImplementedError) as error:
            warnings.warn(f"forward-over-reverse HVP failed ({str(error).splitlines()[0]}); "
                          "using double backward instead")
            hvp.method = "double_backward"
            return double_backward(v)
        out_backward, backward_s = timed(double_backward, v)
        hvp.method = "forward_over_reverse" if forward_s <= backward_s else "double_backward"
        hvp.timings = {"forward_over_reverse_s": forward_s, "double_backward_s": backward_s}
        return out if hvp.method == "forward_over_reverse" else out_backward

    hvp.method = method
    return hvp


# ---------------------------------------------------------------------------------------------------- spectra
def _work_dtype(like: Vector) -> torch.dtype:
    return torch.promote_types(like[0].dtype, torch.float32)


def _gaussian(like: Vector, seed: int) -> torch.Tensor:
    """A unit Gaussian vector of the flattened space, drawn on a seeded CPU generator (device independent)."""
    n = sum(t.numel() for t in like)
    z = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z / torch.linalg.vector_norm(z)).to(like[0].device, _work_dtype(like))


def lanczos(hvp: Callable[[Vector], Vector], like: Vector, iterations: int = 20, seed: int = 0,
            start: torch.Tensor | None = None) -> dict:
    """Lanczos with full reorthogonalization: m = min(iterations, dimension) steps of
        w = H q_j - alpha_j q_j - beta_{j-1} q_{j-1},  alpha_j = q_j^T H q_j,  then w -= Q Q^T w (twice),
        beta_j = ||w||,  q_{j+1} = w / beta_j,
    from a seeded Gaussian q_0 (or from `start`, a flat vector, normalized here), stopping early on breakdown
    (beta_j ~ 0: the Krylov space is invariant and its Ritz values are exact eigenvalues). The Ritz values are the
    eigenvalues of the tridiagonal T (alpha on the diagonal, beta off it), computed in float64; the basis lives on
    the device in the parameters' dtype (at least float32). One host sync per iteration.

    Returns {"eigenvalues": Ritz values, descending (np.ndarray), "lambda_max", "lambda_min", "iterations": m,
    "residuals": ||H y - theta y|| = beta_m |s_m| for each Ritz pair (theta, y = Q s), "weights": s_1^2, the
    first components squared (the Gauss quadrature weights of q_0's spectral measure: sum_i w_i f(theta_i) ~
    q_0^T f(H) q_0, exact for polynomials of degree < 2m; they sum to 1), both in the same order}.
    """
    n = sum(t.numel() for t in like)
    m = min(int(iterations), n)
    if m < 1:
        raise ValueError(f"lanczos needs at least one iteration on a nonempty space (iterations={iterations}, "
                         f"dimension={n})")
    dtype = _work_dtype(like)
    tolerance = 100 * torch.finfo(dtype).eps
    basis = torch.empty(m, n, dtype=dtype, device=like[0].device)
    if start is None:
        basis[0] = _gaussian(like, seed)
    else:
        basis[0] = start.to(basis.device, dtype) / torch.linalg.vector_norm(start.to(dtype))
    alphas, betas, beta = [], [], torch.zeros((), dtype=dtype, device=basis.device)
    for j in range(m):
        w = paramspace.flatten(hvp(paramspace.unflatten(basis[j], like))).to(dtype)
        alpha = torch.dot(w, basis[j])
        w = w - alpha * basis[j] - (beta * basis[j - 1] if j else 0)
        for _ in range(2):  # full reorthogonalization, "twice is enough"
            w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        beta = torch.linalg.vector_norm(w)
        a, b = torch.stack([alpha, beta]).double().tolist()  # the one host sync of the iteration
        alphas.append(a)
        betas.append(b)
        scale = max(max(abs(x) for x in alphas), max(betas))
        if j + 1 == m or b <= tolerance * scale:
            break
        basis[j + 1] = w / beta
    k = len(alphas)
    tridiagonal = np.diag(alphas) + np.diag(betas[:k - 1], 1) + np.diag(betas[:k - 1], -1)
    theta, s = np.linalg.eigh(tridiagonal)
    order = np.argsort(theta)[::-1]
    return {"eigenvalues": theta[order], "lambda_max": float(theta[order[0]]),
            "lambda_min": float(theta[order[-1]]), "iterations": k,
            "residuals": np.abs(betas[-1] * s[-1, order]), "weights": s[0, order] ** 2}


def top_eigenvalues(hvp: Callable[[Vector], Vector], like: Vector, k: int = 1, iterations: int = 20,
                    seed: int = 0) -> dict:
    """The k largest Ritz values (algebraic) and the smallest, from one `lanczos` run. Fewer than k if Lanczos
    stopped earlier (breakdown or a space of dimension < k): "note" then says which (else it is ""). Also every
    Ritz value of the run ("ritz", descending) and its quadrature weight ("weights"): a one-probe sketch of the
    spectrum (see `slq`)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    result = lanczos(hvp, like, max(iterations, k), seed)
    values = result["eigenvalues"]
    n = sum(t.numel() for t in like)
    note = ""
    if len(values) < k:  # why fewer than k: the space, or a breakdown of the iteration
        note = (f"the parameter space has {n} dimensions" if result["iterations"] == n else
                f"Lanczos broke down after {result['iterations']} iterations: the Krylov space of its start vector "
                f"is invariant, so it holds only {result['iterations']} eigenvalues of the Hessian (repeated ones, "
                f"e.g. the zeros of a low-rank Hessian, count once; the space has {n} dimensions)")
    return {"top": [float(v) for v in values[:k]], "bottom": float(values[-1]), "lambda_max": result["lambda_max"],
            "note": note, "lambda_min": result["lambda_min"], "iterations": result["iterations"], "ritz": values,
            "weights": result["weights"]}


def _rademacher(like: Vector, generator: torch.Generator) -> torch.Tensor:
    n = sum(t.numel() for t in like)
    z = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8) * 2 - 1
    return z.to(like[0].device, _work_dtype(like))


def hutchinson_trace(hvp: Callable[[Vector], Vector], like: Vector, samples: int = 100, seed: int = 0) -> dict:
    """Hutchinson's estimator: tr(H) = E[z^T H z] for z with independent +-1 entries (Hutchinson 1989); its
    variance is 2 sum_{i != j} H_ij^2, so it is exact on diagonal matrices. One HVP per sample, one host sync.

    Returns {"trace": the mean of z^T H z, "stderr": their standard deviation (ddof=1) / sqrt(samples) (nan for
    one sample), "samples"}."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(samples):
        z = _rademacher(like, generator)
        estimates.append(torch.dot(z, paramspace.flatten(hvp(paramspace.unflatten(z, like))).to(z.dtype)))
    values = torch.stack(estimates).double().cpu().numpy()
    stderr = float(values.std(ddof=1) / np.sqrt(samples)) if samples > 1 else float("nan")
    return {"trace": float(values.mean()), "stderr": stderr, "samples": samples}


# ---------------------------------------------------------------------------------------- eigenvalue density
#: The density grid spans the nodes plus this many broadening widths on each side, so each Gaussian has at least
#: 5 sigma of its mass on the grid (at most 2.9e-7 of it left outside, and only for the extreme nodes).
DENSITY_PAD = 5.0


def slq(hvp: Callable[[Vector], Vector], like: Vector, probes: int = 1, iterations: int = 90, seed: int = 0) -> dict:
    """Stochastic Lanczos quadrature (SLQ) of the eigenvalue density of H: Ghorbani, Krishnan & Xiao 2019, "An
    Investigation into Neural Net Optimization via Hessian Eigenvalue Density" (after Golub & Meurant's
    Gauss quadrature by Lanczos, 1994); PyHessian's `density()` (Yao et al. 2020).

    The spectral density phi(t) = (1/n) sum_i delta(t - lambda_i) of the n eigenvalues of H satisfies, for any f,
        integral f phi = (1/n) tr f(H) = E_v[v^T f(H) v] ~ (1/P) sum_p sum_j w_pj f(theta_pj),
    with v = z / sqrt(n), z Rademacher (E[v v^T] = I/n), one per probe p. (theta_pj, w_pj) are the Gauss quadrature
    nodes and weights of v's spectral measure sum_i (u_i^T v)^2 delta(t - lambda_i): the Ritz values of m Lanczos
    steps from v and the squared first components of the tridiagonal's eigenvectors (`lanczos`). Lanczos runs
    with full reorthogonalization, as in PyHessian (without it, rounding makes ghost copies of converged
    eigenvalues that take quadrature weight). Each probe's rule is exact for polynomials of degree < 2m, so
    n * sum_j w_pj theta_pj = z_p^T H z_p: the trace estimate is Hutchinson's with the same probes, and
    `hutchinson_trace` with the same seed draws the same z.

    Probe p's z is the p-th Rademacher vector of a CPU generator seeded with `seed` (the same on every device).
    Cost: P x min(iterations, n) HVPs (fewer when a probe's Krylov space closes: breakdown), and an
    (iterations, n) basis on the device at a time.

    Returns {"nodes": (P, m) Ritz values per probe, descending, nan after the probe's last step; "weights": (P, m),
    0 there; "steps": (P,) Lanczos steps per probe; "dimension": n; "lambda_min", "lambda_max": the extreme nodes
    over all probes; "trace": n * mean_p sum_j w_pj theta_pj; "trace_stderr": n * std_p(...) / sqrt(P) (ddof=1,
    nan for P = 1); "second_moment": mean_p sum_j w_pj theta_pj^2 (~ tr(H^2) / n); "negative_mass": mean_p of the
    weight at nodes below -"negative_tolerance" = sqrt(eps of the working dtype) * max |theta|, so that
    numerically null directions (softmax's shift invariance, dead units) count as zero, not as negative}.
    """
    if probes < 1:
        raise ValueError(f"slq needs probes >= 1, got {probes}")
    n = sum(t.numel() for t in like)
    m = min(int(iterations), n)
    generator = torch.Generator().manual_seed(seed)
    nodes, weights = np.full((probes, m), np.nan), np.zeros((probes, m))
    steps = np.zeros(probes, dtype=np.int64)
    for p in range(probes):
        run = lanczos(hvp, like, m, start=_rademacher(like, generator))  # v = z / ||z|| = z / sqrt(n)
        k = run["iterations"]
        nodes[p, :k], weights[p, :k], steps[p] = run["eigenvalues"], run["weights"], k
    theta = np.where(np.isfinite(nodes), nodes, 0.0)  # (P, m); padding has weight 0
    first = (weights * theta).sum(1)                  # (P,) v_p^T H v_p
    tolerance = float(np.sqrt(torch.finfo(_work_dtype(like)).eps) * np.abs(theta).max())
    return {"nodes": nodes, "weights": weights, "steps": steps, "dimension": n,
            "lambda_min": float(np.nanmin(nodes)), "lambda_max": float(np.nanmax(nodes)),
            "trace": float(n * first.mean()),
            "trace_stderr": float(n * first.std(ddof=1) / np.sqrt(probes)) if probes > 1 else float("nan"),
            "second_moment": float((weights * theta ** 2).sum(1).mean()),
            "negative_mass": float(np.where(theta < -tolerance, weights, 0.0).sum(1).mean()),
            "negative_tolerance": tolerance}


def spectral_grid(nodes: np.ndarray, sigma: float, points: int) -> tuple[np.ndarray, float]:
    """(grid, sigma_abs) for `gaussian_density`: the broadening sigma_abs = sigma * width, width = the span of the
    finite nodes (max - min; for a single point, its |value|, or 1 at zero), and `points` equally spaced values
    over [min - DENSITY_PAD sigma_abs, max + DENSITY_PAD sigma_abs]."""
    finite = np.asarray(nodes, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or not 0 < sigma or points < 2:
        raise ValueError(f"spectral_grid needs finite nodes, sigma > 0 and points >= 2 (sigma={sigma}, "
                         f"points={points}, {finite.size} finite nodes)")
    low, high = float(finite.min()), float(finite.max())
    width = high - low if high > low else (abs(high) or 1.0)
    sigma_abs = sigma * width
    return np.linspace(low - DENSITY_PAD * sigma_abs, high + DENSITY_PAD * sigma_abs, points), sigma_abs


def gaussian_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma_abs: float) -> np.ndarray:
    """phi_sigma(t) = (1/P) sum_p sum_j w_pj N(t; theta_pj, sigma_abs^2) on `grid`: the SLQ density broadened by a
    Gaussian of standard deviation sigma_abs, as Ghorbani et al. 2019 and PyHessian do. nodes and weights are
    (P, m) (nan nodes are padding); for the exact density of a dense spectrum pass its n eigenvalues as (1, n) and
    weights 1/n. Integrates to sum_pj w_pj / P = 1 up to the tails left outside the grid (< 3e-7 on a
    `spectral_grid`), so it is not renormalized (PyHessian renormalizes on its narrower grid).
    Cost: P * m * len(grid) exponentials, in chunks of ~4M."""
    nodes, weights = np.asarray(nodes, dtype=float), np.asarray(weights, dtype=float)
    keep = np.isfinite(nodes)
    theta, w = nodes[keep], weights[keep] / nodes.shape[0]  # (K,) every probe's nodes; / P: the mean over probes
    grid = np.asarray(grid, dtype=float)
    density = np.empty_like(grid)
    chunk = max(1, (1 << 22) // max(1, theta.size))
    for start in range(0, grid.size, chunk):
        t = grid[start:start + chunk, None]                                      # (c, 1)
        density[start:start + chunk] = (w * np.exp(-0.5 * ((t - theta) / sigma_abs) ** 2)).sum(1)
    return density / (sigma_abs * np.sqrt(2 * np.pi))


# -------------------------------------------------------------------------------------------------- sharpness
def sam_sharpness(probe, params: Vector, data: EvalSet, objective=None, rho: float = 0.05, steps: int = 1,
                  adaptive: bool = False, eta: float = 0.0, buffers: dict | None = None) -> dict:
    """max_{||T^{-1} e|| <= rho} L(w + e) - L(w) over all of `data`, by `steps` normalized-gradient ascent steps.

    In the scaled coordinates u = T^{-1} e (T = I for SAM, Foret et al. 2021; T = |w| + eta elementwise for ASAM,
    Kwon et al. 2021, every tensor, biases and BN included, as runner/optim/sam.py) the gradient is T g, so
        u <- proj_rho(u + (rho / steps) T g(w + T u) / ||T g(w + T u)||),   e = T u,
    from u = 0; steps=1 is SAM's e = rho T^2 g / ||T g|| (1e-12 is added to the norm, as in the optimizer).
    The projection onto the rho-ball is the definition; with these step sizes it never has to act.

    Returns {"sharpness": L(w+e) - L(w), "loss": L(w), "perturbed_loss": L(w+e)} (one host sync).
    """
    if rho < 0 or steps < 1:
        raise ValueError(f"need rho >= 0 and steps >= 1, got rho={rho}, steps={steps}")
    w = [p.detach() for p in params]
    t = [p.abs() + eta for p in w] if adaptive else [torch.ones_like(p) for p in w]
    u = paramspace.zeros_like(w)
    loss = None
    for _ in range(steps):
        g, value = _data_grad(probe, paramspace.axpy(1.0, torch._foreach_mul(t, u), w), data, objective, buffers)
        loss = value if loss is None else loss
        tg = torch._foreach_mul(t, g)
        u = paramspace.axpy((rho / steps) / (paramspace.norm(tg) + 1e-12), tg, u)
        u = paramspace.scale(torch.clamp(rho / (paramspace.norm(u) + 1e-30), max=1.0), u)
    perturbed = _data_loss(probe, paramspace.axpy(1.0, torch._foreach_mul(t, u), w), data, objective, buffers)
    loss, perturbed = torch.stack([loss, perturbed]).double().tolist()
    return {"sharpness": perturbed - loss, "loss": loss, "perturbed_loss": perturbed}


def edge_of_stability(lambda_max: float, lr: float, factor: float = 2.0) -> float:
    """lambda_max * lr / factor = lambda_max / (factor / lr): gradient descent on a quadratic is stable while
    lambda_max < 2 / lr, i.e. while this ratio is < 1; full-batch GD drives it to ~1 (Cohen et al. 2021,
    "Gradient descent on neural networks typically occurs at the edge of stability"). Other optimizers have other
    factors: 2 (1 + beta) for heavy-ball momentum beta, (2 + 2 beta) / (1 + 2 beta) for Nesterov; each optimizer
    declares its own (runner/optim: `Stability`, `stability(choice)`), and the hessian analysis uses that."""
    return lambda_max * lr / factor
