"""Loss landscapes after Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the Loss Landscape of Neural Nets"
(NeurIPS; reference code tomgoldstein/loss-landscape): 1-D and 2-D slices around a point, linear interpolation
between two models, and PCA directions of an optimization trajectory.

Filter normalization (Li et al., Sec. 4). A random Gaussian direction d is rescaled filter by filter so that each
filter (each slice along dim 0 of a weight with more than one dimension: a conv output channel, a linear layer's
output neuron) has the norm of the same filter of the weights:  d_i <- d_i / (||d_i|| + 1e-10) * ||w_i||  (Frobenius
norms; the 1e-10 is the reference code's). A slice is then invariant to the scale of a layer whose output a
normalization layer divides out again (tests check it), so landscapes of different networks can be compared.
`layer` rescales each tensor as a whole, `none` keeps the raw Gaussian.

Conventions (where reference implementations differ, this is what we do):
- Directions come from a CPU `torch.Generator` seeded with `seed`: a float32 Gaussian is drawn for every tensor of
  `like` in order (also for the ones then zeroed), the norms are taken on the CPU in float64, and only the result
  moves to each tensor's device and dtype. The same seed gives the same direction bitwise on CPU and GPU, and the
  global RNG is never drawn from. A 2-D grid uses `random_direction(seed)` and `random_direction(seed + 1)`
  (`second_direction`); like Li we do not orthogonalize them (two Gaussians in many dimensions nearly are).
- Tensors of at most one dimension (biases, BatchNorm/LayerNorm scales and shifts) get a zero direction by default,
  as Li's `--xignore biasbn`. When they are included, `filter` and `layer` set the direction to the weight itself
  (Li's `d.copy_(w)`: a per-filter scalar normalized to its own norm); `none` keeps the Gaussian.
- BatchNorm: `bn="eval"` evaluates every point with the model's saved running statistics; `bn="recalibrate"`
  re-estimates them at each point over the training evaluation set (`Probe.buffers_at`), which costs one pass over
  `sets["train"]` per point.
- Metrics are plain float32 cross-entropy and top-1 accuracy (whatever the training objective), summed over fixed
  evaluation subsets (`probe.evaluation_sets`: seeded, device resident, no augmentation).
- A point is `w + a * d1 + b * d2`, computed in that order in (at least) float32, so the centre (0, 0) is `w`
  bitwise. In a 2-D result `Z[iy, ix]` is the point `xs[ix], ys[iy]`: `matplotlib.contour(x, y, Z)` draws it right.
- Interpolation (Li Sec. 3, after Goodfellow et al. 2015) is `(1 - alpha) * a + alpha * b` for the parameters and
  for every floating-point buffer (BN running statistics too); integer buffers (`num_batches_tracked`) are `a`'s.
  Alpha 0 and 1 are the two models exactly. `bn="recalibrate"` re-estimates BN at each point instead.
- Saved directions: the analyses write each landscape's directions into its `.npz` (`direction_x`, `direction_y`,
  flattened in parameter order, with `direction_names` and `direction_shapes`); `load_directions(run_dir, name)`
  reads them back by parameter name, so another run can be projected on the same plane.
- PCA directions (Li Sec. 7): the rows `w_i - w_final` of the saved checkpoints, centred on their mean as the
  reference does (it calls sklearn's PCA); the first two principal axes, unit norm, are d1 and d2, with the
  explained variance ratio of each. The trajectory's coordinates are the projections of `w_i - w_final` (not
  centred), so the final point is the origin of the plot, as in the reference. `center=False` gives the plain
  SVD of the offsets instead. Computed from the m x m Gram matrix in float64 (never an m x P matrix).

Speed. No host sync per point: each point's loss sum and correct count stay device tensors (`Probe.sums`) and are
read once at the end. When the model is small, `points_per_batch` points are evaluated by one forward pass with
`torch.func.vmap` over stacked parameter sets (one batched matmul instead of many small ones). If vmap cannot run
the model (data-dependent control flow, BN recalibration that writes buffers, ...) it falls back to the
point-by-point loop with a warning; `points_per_batch=1` asks for the loop.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from runner.analysis.probe import BN_MODES, EvalSet, Probe
from runner.losses import measured_loss

NORMALIZATIONS = ("filter", "layer", "none")

#: Li's guard against a zero direction filter.
_EPS = 1e-10
#: Automatic `points_per_batch` (see `_auto_points_per_batch`): never vmap models this large ...
_VMAP_MAX_PARAMS = 1_000_000
#: ... at most this many points per chunk and this many numbers in one chunk of stacked parameter sets ...
_VMAP_MAX_POINTS = 64
_VMAP_MAX_STACKED = 1 << 24
#: ... and at most this much work (points x parameters x samples per batch, ~ multiply-adds of an MLP) per chunk.
_VMAP_MAX_WORK = {"cpu": 1 << 26, "other": 1 << 30}


# ------------------------------------------------------------------------------------------------ directions
def random_direction(like: list[Tensor], seed: int, normalization: str = "filter",
                     ignore_vectors: bool = True) -> list[Tensor]:
    """A Gaussian direction shaped like `like`, normalized per `normalization` (see NORMALIZATIONS and the module
    doc); the same values for the same `seed` and `like` on every device. Never draws from the global RNG."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; one of {', '.join(NORMALIZATIONS)}")
    generator = torch.Generator().manual_seed(int(seed))
    out = []
    for w in like:
        d = torch.randn(tuple(w.shape), generator=generator, dtype=torch.float32)  # drawn for every tensor
        if w.dim() <= 1:
            if ignore_vectors:
                d = torch.zeros_like(d)
            elif normalization != "none":
                d = w.detach().to("cpu", torch.float32).clone()  # Li: d.copy_(w)
        elif normalization == "filter":
            w64 = w.detach().to("cpu", torch.float64).reshape(w.shape[0], -1)
            d64 = d.double().reshape(w.shape[0], -1)
            factor = w64.norm(dim=1) / (d64.norm(dim=1) + _EPS)
            d = (d64 * factor[:, None]).reshape(w.shape).float()
        elif normalization == "layer":
            w64, d64 = w.detach().to("cpu", torch.float64), d.double()
            d = (d64 * (w64.norm() / (d64.norm() + _EPS))).float()
        out.append(d.to(device=w.device, dtype=w.dtype))
    return out


def second_direction(like: list[Tensor], seed: int, normalization: str = "filter",
                     ignore_vectors: bool = True) -> list[Tensor]:
    """The y direction of a 2-D grid whose x direction is `random_direction(like, seed, ...)`: seed + 1."""
    return random_direction(like, seed + 1, normalization, ignore_vectors)


#: The axes a saved landscape can have directions for: "x" (every landscape), "y" (2-D grids and PCA).
AXES = ("x", "y")


def direction_arrays(names: list[str], directions: dict[str, list[Tensor]]) -> dict[str, np.ndarray]:
    """The directions of a landscape as `.npz` arrays: `direction_<axis>` (every tensor flattened and concatenated
    in parameter order, in the parameters' dtype: the values the grid was computed with, exactly),
    `direction_names` (the parameter names) and `direction_shapes` ("64,32" per tensor; "" for a scalar), which
    `load_directions` reads back."""
    out = {}
    for axis, direction in directions.items():
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; one of {', '.join(AXES)}")
        if len(direction) != len(names):
            raise ValueError(f"direction {axis} has {len(direction)} tensors for {len(names)} parameter names")
        out[f"direction_{axis}"] = (torch.cat([d.detach().reshape(-1).cpu() for d in direction]).numpy()
                                    if direction else np.zeros(0, dtype=np.float32))
    first = next(iter(directions.values()))
    out["direction_names"] = np.asarray(list(names), dtype=str)
    out["direction_shapes"] = np.asarray([",".join(str(n) for n in d.shape) for d in first], dtype=str)
    return out


def load_directions(run_dir, name: str = "landscape_2d") -> dict[str, dict[str, Tensor]]:
    """The directions a saved landscape was computed along: {"x": {parameter name: tensor}, "y": {...}} ("y" for
    `landscape_2d` and `pca`), CPU tensors shaped like the parameters, from `<run_dir>/analysis/<name>.npz` (or
    `run_dir` itself when it is that .npz file). A grid point (x, y) is the run's weights w + x d_x + y d_y:

        d = load_directions("outputs/sgd_run", "landscape_2d")   # {"x": {name: tensor}, "y": {...}}

    e.g. a second run's weights w' on the same plane: solve the 2 x 2 least-squares system of the flattened
    d_x, d_y for w' - w (`paramspace.flatten` of `[d["x"][n] for n in names]`, in `Probe.names` order)."""
    path = Path(run_dir)
    if path.suffix != ".npz":
        path = path / "analysis" / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no landscape arrays at {path} (run the analysis {name} first)")
    with np.load(path, allow_pickle=False) as saved:
        if "direction_names" not in saved.files:
            raise ValueError(f"{path} holds no directions (written before landscapes saved them): run the analysis "
                             "again, or rebuild them with random_direction(params, seed) / second_direction")
        names = [str(n) for n in saved["direction_names"]]
        shapes = [tuple(int(n) for n in text.split(",")) if text else () for text in saved["direction_shapes"]]
        out = {}
        for axis in AXES:
            if f"direction_{axis}" not in saved.files:
                continue
            flat = torch.from_numpy(saved[f"direction_{axis}"].copy())
            sizes = [math.prod(shape) for shape in shapes]
            if sum(sizes) != flat.numel():
                raise ValueError(f"{path}: direction_{axis} has {flat.numel()} numbers for parameters of {sum(sizes)}")
            out[axis] = {n: t.reshape(shape) for n, t, shape in zip(names, flat.split(sizes), shapes)}
    return out


# ------------------------------------------------------------------------------------------------ evaluation
def _combine(bases: list[list[Tensor]], coeffs: Tensor) -> list[Tensor]:
    """For B rows of `coeffs` (B, k) and k lists of tensors: the B points  c0*bases[0] + c1*bases[1] + ... (left to
    right), each tensor stacked to (B, *shape). With coefficients (1, 0) or (0, 1) a base comes out bitwise."""
    out = []
    for j in range(len(bases[0])):
        ref = bases[0][j]
        dtype = torch.promote_types(ref.dtype, torch.float32)
        c = coeffs.to(device=ref.device, dtype=dtype)
        view = (c.shape[0],) + (1,) * ref.dim()
        acc = None
        for k, base in enumerate(bases):
            term = c[:, k].reshape(view) * base[j].to(dtype)
            acc = term if acc is None else acc + term
        out.append(acc.to(ref.dtype))
    return out


def _translated(params: list[Tensor], directions: list[list[Tensor]], coeffs: Tensor) -> list[Tensor]:
    """The B points  params + c0*d0 + c1*d1 (left to right), stacked to (B, *shape); params + 0*d is params."""
    out = []
    for j, w in enumerate(params):
        dtype = torch.promote_types(w.dtype, torch.float32)
        c = coeffs.to(device=w.device, dtype=dtype)
        view = (c.shape[0],) + (1,) * w.dim()
        acc = w.to(dtype).unsqueeze(0)
        for k, d in enumerate(directions):
            acc = acc + c[:, k].reshape(view) * d[j].to(device=w.device, dtype=dtype)
        out.append(acc.to(w.dtype))
    return out


def _auto_points_per_batch(params: list[Tensor], sets: dict[str, EvalSet], n: int) -> int:
    """How many points one vmapped forward evaluates when the caller does not say.

    vmap pays where one point's forward is too small to keep the device busy (per-call overhead dominates): it
    stacks B points into one batched matmul. Once a point's forward is itself big (many parameters times many
    samples per batch), stacking only adds memory traffic. Measured on a CPU core (21 x 21 grid): a 64-128-10 MLP on
    1000 samples in one batch is already compute bound (vmap 0.9-1.3x the loop), a 2-16-2 MLP on 200 samples runs
    ~10x faster in chunks of 64. So B is what fits a work budget per chunk, capped, and 1 (the loop) when fewer
    than 4 points fit. The budget off the CPU (GPU: launch bound, so larger) is a guess not yet measured."""
    size = sum(p.numel() for p in params)
    if size == 0 or size >= _VMAP_MAX_PARAMS or n < 2:
        return 1
    batch = max(min(data.batch_size, len(data)) for data in sets.values())
    device = params[0].device.type
    work = size * max(batch, 1)
    points = min(n, _VMAP_MAX_POINTS, _VMAP_MAX_STACKED // size,
                 _VMAP_MAX_WORK["cpu" if device == "cpu" else "other"] // work)
    return points if points >= 4 else 1


class _Points:
    """The points to evaluate: `chunk(lo, hi)` gives (parameters stacked to (hi - lo, ...), buffers, and which
    buffers are stacked: a dict name -> 0 or None for vmap's in_dims)."""

    def __init__(self, n: int, chunk: Callable[[int, int], tuple[list[Tensor], dict, dict]]):
        self.n, self.chunk = n, chunk

    def point(self, i: int) -> tuple[list[Tensor], dict]:
        params, buffers, dims = self.chunk(i, i + 1)
        return [p[0] for p in params], {k: (b[0] if dims[k] == 0 else b) for k, b in buffers.items()}


def _vmap_sums(probe: Probe, params: list[Tensor], buffers: dict, dims: dict, data: EvalSet
               ) -> tuple[Tensor, Tensor]:
    """(loss sums (B,), correct counts (B,)) of B stacked points over `data`, one vmapped forward per batch."""

    def one(p, b, x, y):
        logits = probe.logits(p, x, b)
        return measured_loss(logits.float(), y, reduction="sum"), (logits.argmax(1) == y).sum()

    batched = torch.func.vmap(one, in_dims=(0, dims, None, None))
    count = params[0].shape[0] if params else 1
    loss = torch.zeros(count, device=data.y.device)
    correct = torch.zeros(count, device=data.y.device, dtype=torch.long)
    for x, y in data.batches():
        with probe.autocast:
            batch_loss, batch_correct = batched(params, buffers, x, y)
        loss += batch_loss
        correct += batch_correct
    return loss, correct


@torch.no_grad()
def _evaluate(probe: Probe, points: _Points, sets: dict[str, EvalSet], bn: str, points_per_batch: int | None,
              progress: bool, desc: str, params_hint: list[Tensor]) -> dict[str, np.ndarray]:
    if bn not in BN_MODES:
        raise ValueError(f"unknown BN mode {bn!r}; one of {', '.join(BN_MODES)}")
    if not sets:
        raise ValueError("no evaluation sets")
    train = sets.get("train")
    recalibrate = bn == "recalibrate" and probe.has_batch_norm
    if recalibrate and train is None:
        raise ValueError('bn="recalibrate" needs a "train" evaluation set to re-estimate BatchNorm statistics on')
    n = points.n
    if points_per_batch is None:
        per = 1 if recalibrate else _auto_points_per_batch(params_hint, sets, n)
    else:
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be at least 1, not {points_per_batch}")
        per = 1 if recalibrate else min(int(points_per_batch), max(n, 1))

    from runner.heartbeat import Work
    samples = " + ".join(f"{len(data)} {split}" for split, data in sets.items())
    bar = Work(desc, n, unit="points", detail=f"on {samples} samples", show=progress)
    losses: dict[str, list[Tensor]] = {s: [] for s in sets}
    corrects: dict[str, list[Tensor]] = {s: [] for s in sets}
    start = 0
    try:
        while start < n:
            stop = min(n, start + per)
            if per > 1:
                try:
                    stacked, buffers, dims = points.chunk(start, stop)
                    out = {s: _vmap_sums(probe, stacked, buffers, dims, data) for s, data in sets.items()}
                except Exception as error:  # noqa: BLE001  (any model vmap cannot run: evaluate point by point)
                    warnings.warn(f"landscape: vmap over points failed ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''}); evaluating point by point",
                                  RuntimeWarning, stacklevel=3)
                    per = 1
                    continue
                for s, (loss, correct) in out.items():
                    losses[s].append(loss)
                    corrects[s].append(correct)
            else:
                params, buffers = points.point(start)
                buffers = probe.buffers_at(params, bn, train, buffers)
                for s, data in sets.items():
                    loss, correct = probe.sums(params, data, buffers)
                    losses[s].append(loss.reshape(1))
                    corrects[s].append(correct.reshape(1))
            bar.update(stop - start)
            start = stop
    finally:
        bar.close()

    result = {}
    stacked_all = [torch.cat(losses[s]).double() for s in sets] + [torch.cat(corrects[s]).double() for s in sets]
    host = torch.stack([t.to(stacked_all[0].device) for t in stacked_all]).cpu().numpy()  # the one host sync
    for i, (s, data) in enumerate(sets.items()):
        result[f"{s}_loss"] = host[i] / len(data)
        result[f"{s}_acc"] = host[len(sets) + i] / len(data)
    return result


def _coordinates(values: Sequence[float] | Tensor, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite values")
    return array


def _check_like(params: list[Tensor], direction: list[Tensor], name: str) -> None:
    if len(direction) != len(params) or any(d.shape != p.shape for d, p in zip(direction, params)):
        raise ValueError(f"{name} is not shaped like the parameters")


def _grid_points(probe: Probe, params: list[Tensor], directions: list[list[Tensor]], coeffs: np.ndarray) -> _Points:
    device = params[0].device if params else torch.device("cpu")
    table = torch.as_tensor(coeffs, dtype=torch.float32, device=device)  # (n, k)
    buffers = probe.buffers
    dims = {k: None for k in buffers}

    def chunk(lo: int, hi: int):
        return _translated(params, directions, table[lo:hi]), buffers, dims

    return _Points(len(coeffs), chunk)


def landscape_1d(probe: Probe, params: list[Tensor], direction: list[Tensor], sets: dict[str, EvalSet],
                 xs: Sequence[float] | Tensor, bn: str = "eval", points_per_batch: int | None = None,
                 progress: bool = False) -> dict[str, np.ndarray]:
    """Loss and accuracy at `params + x * direction` for x in `xs`: {"x": (n,), "<split>_loss": (n,),
    "<split>_acc": (n,)} for every split of `sets`."""
    x = _coordinates(xs, "xs")
    _check_like(params, direction, "direction")
    points = _grid_points(probe, params, [direction], x[:, None])
    out = _evaluate(probe, points, sets, bn, points_per_batch, progress, "landscape 1-D", params)
    return {"x": x, **out}


def landscape_2d(probe: Probe, params: list[Tensor], d1: list[Tensor], d2: list[Tensor], sets: dict[str, EvalSet],
                 xs: Sequence[float] | Tensor, ys: Sequence[float] | Tensor, bn: str = "eval",
                 points_per_batch: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Loss and accuracy on the grid `params + x * d1 + y * d2`: {"x": (nx,), "y": (ny,), "<split>_loss": (ny, nx),
    "<split>_acc": (ny, nx)}, where [iy, ix] is the point (xs[ix], ys[iy]) (matplotlib's contour(x, y, Z))."""
    x, y = _coordinates(xs, "xs"), _coordinates(ys, "ys")
    _check_like(params, d1, "d1")
    _check_like(params, d2, "d2")
    grid_y, grid_x = np.meshgrid(y, x, indexing="ij")  # row-major over (iy, ix)
    coeffs = np.stack([grid_x.reshape(-1), grid_y.reshape(-1)], axis=1)
    points = _grid_points(probe, params, [d1, d2], coeffs)
    out = _evaluate(probe, points, sets, bn, points_per_batch, progress, "landscape 2-D", params)
    return {"x": x, "y": y, **{k: v.reshape(len(y), len(x)) for k, v in out.items()}}


def interpolate(probe_a: Probe, params_a: list[Tensor], params_b: list[Tensor], sets: dict[str, EvalSet],
                alphas: Sequence[float] | Tensor, bn: str = "eval", buffers_a: dict | None = None,
                buffers_b: dict | None = None, probe_b: Probe | None = None, points_per_batch: int | None = None,
                progress: bool = False) -> dict[str, np.ndarray]:
    """Loss and accuracy along `(1 - alpha) * a + alpha * b`, evaluated with `probe_a`'s model: {"alpha": (n,),
    "<split>_loss": (n,), "<split>_acc": (n,)}. Floating-point buffers are interpolated too (`buffers_a`, else
    `probe_a.buffers`; `buffers_b`, else `probe_b.buffers` when `probe_b` is given, else `buffers_a`); integer
    buffers are `a`'s. `bn="recalibrate"` re-estimates BN statistics at every point instead."""
    alpha = _coordinates(alphas, "alphas")
    _check_like(params_a, params_b, "params_b")
    buffers_a = probe_a.buffers if buffers_a is None else buffers_a
    if buffers_b is None:
        buffers_b = probe_b.buffers if probe_b is not None else buffers_a
    if set(buffers_a) != set(buffers_b):
        raise ValueError("the two models' buffers do not have the same names")
    floating = [k for k, b in buffers_a.items() if b.is_floating_point()]
    dims = {k: (0 if k in floating else None) for k in buffers_a}
    device = params_a[0].device if params_a else torch.device("cpu")
    table = torch.as_tensor(np.stack([1.0 - alpha, alpha], axis=1), dtype=torch.float32, device=device)

    def chunk(lo: int, hi: int):
        coeffs = table[lo:hi]
        params = _combine([params_a, [p.to(a.device) for p, a in zip(params_b, params_a)]], coeffs)
        mixed = _combine([[buffers_a[k] for k in floating], [buffers_b[k].to(buffers_a[k].device) for k in floating]],
                         coeffs) if floating else []
        buffers = {k: buffers_a[k] for k in buffers_a}
        buffers.update(zip(floating, mixed))
        return params, buffers, dims

    out = _evaluate(probe_a, _Points(len(alpha), chunk), sets, bn, points_per_batch, progress, "interpolation",
                    params_a)
    return {"alpha": alpha, **out}


# ------------------------------------------------------------------------------------------------ PCA
@torch.no_grad()
def pca_directions(trajectory: list[list[Tensor]], final: list[Tensor], center: bool = True,
                   ignore_vectors: bool = False) -> dict:
    """Li et al. Sec. 7: the first two principal axes of the offsets `w_i - w_final` of saved checkpoints.

    Returns {"d1", "d2": unit-norm directions shaped like `final` (its devices and dtypes), "explained_variance_ratio":
    (2,), "trajectory": (m, 2) coordinates ((w_i - w_final) . d1, (w_i - w_final) . d2)}. The offsets are centred
    before the decomposition (as sklearn's PCA in the reference; `center=False`: plain SVD of the offsets); the
    coordinates are not. `ignore_vectors` zeroes the tensors of at most one dimension first (Li's `--ignore biasbn`).
    Each axis's sign is chosen so that its largest-magnitude entry is positive (deterministic)."""
    m = len(trajectory)
    if m < 3:
        raise ValueError(f"PCA directions need at least 3 checkpoints, got {m}")
    for i, point in enumerate(trajectory):
        _check_like(final, point, f"checkpoint {i}")
    keep = [not (ignore_vectors and w.dim() <= 1) for w in final]

    def offsets(j: int) -> Tensor:
        """(m, numel) float64 rows w_i - w_final of tensor j, on the final tensor's device."""
        w = final[j]
        rows = torch.stack([point[j].to(device=w.device, dtype=torch.float64).reshape(-1) for point in trajectory])
        return rows - w.to(torch.float64).reshape(1, -1)

    gram = torch.zeros(m, m, dtype=torch.float64)
    for j, w in enumerate(final):
        if keep[j] and w.numel():
            rows = offsets(j)
            gram += (rows @ rows.T).cpu()
    a = gram
    if center:
        h = torch.eye(m, dtype=torch.float64) - 1.0 / m
        a = h @ gram @ h
    values, vectors = torch.linalg.eigh((a + a.T) / 2)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    total = values.sum()
    if total <= 0 or values[1] <= 1e-12 * values[0]:
        raise ValueError("the trajectory spans fewer than two dimensions: no second principal direction")
    u = vectors[:, :2] / values[:2].sqrt()  # axis k = sum_i u[i, k] * row_i  (rows centred or not: sum u = 0)

    axes = [[], []]
    for j, w in enumerate(final):
        if keep[j] and w.numel():
            rows = offsets(j)
            if center:
                rows = rows - rows.mean(0, keepdim=True)
            comp = u.to(rows.device).T @ rows  # (2, numel)
        else:
            comp = torch.zeros(2, w.numel(), dtype=torch.float64, device=w.device)
        for k in range(2):
            axes[k].append(comp[k].reshape(w.shape))
    for k in range(2):  # exact unit norm and a deterministic sign
        flat = torch.cat([t.reshape(-1).cpu() for t in axes[k]])
        sign = 1.0 if flat[flat.abs().argmax()] >= 0 else -1.0
        scale = sign / flat.norm()
        axes[k] = [t * scale.to(t.device) for t in axes[k]]

    coords = torch.zeros(m, 2, dtype=torch.float64)
    for j, w in enumerate(final):
        if keep[j] and w.numel():
            rows = offsets(j)
            coords += (rows @ torch.stack([axes[0][j].reshape(-1), axes[1][j].reshape(-1)], 1)).cpu()
    return {
        "d1": [t.to(w.dtype) for t, w in zip(axes[0], final)],
        "d2": [t.to(w.dtype) for t, w in zip(axes[1], final)],
        "explained_variance_ratio": (values[:2] / total).numpy(),
        "trajectory": coords.numpy(),
    }
