"""Figures for loss landscapes and curvature: 1-D slices and interpolations, 2-D contours and surfaces, and
curvature over training.

Every function draws on a bare `matplotlib.figure.Figure` (no pyplot, so the user's backend and pyplot's figure
registry are never touched; `Figure.savefig` renders with Agg), writes a PNG to `path` (creating its parent
folder), drops the figure and returns the path as a `Path`.

- The title passed in should carry the settings the data were made with (directions, BN mode, number of samples,
  seed, ...), so a figure says how it was made; it is the figure's suptitle.
- Non-finite values (a diverged point has an inf or nan loss) never crash a plot: they are masked
  (`numpy.ma.masked_invalid`) and the title says how many were masked, and where.
- Arrays follow the landscape modules' `.npz` layout: `x` (and `y` for 2-D, or `alpha` for interpolations) and
  `{split}_loss`, `{split}_acc` for whichever of the splits `train`, `val`, `test` were evaluated. A 2-D array
  has shape `(ny, nx)`: rows follow `y`, columns follow `x` (matplotlib's `contour(x, y, Z)` convention).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")
#: plot_contour draws equal units on both axes while one range is at most this many times the other.
MAX_ASPECT = 2.5
_SPLIT_COLORS = {"train": "C0", "val": "C2", "test": "C1"}
_DPI = 120


# --------------------------------------------------------------------------------------------------- helpers
def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path  # no pyplot, so nothing holds the figure: it is freed once the caller's frame drops it


def _masked(values) -> np.ma.MaskedArray:
    return np.ma.masked_invalid(np.asarray(values, dtype=float))


def _n_masked(a: np.ma.MaskedArray) -> int:
    return int(np.ma.count_masked(a))


def _title(title: str, masked: Mapping[str, int] | None = None, extra: str = "") -> str:
    """The caller's title, plus a second line naming how many non-finite values were masked, and where."""
    notes = []
    counts = {k: n for k, n in (masked or {}).items() if n}
    if counts:
        total = sum(counts.values())
        where = ", ".join(f"{k}: {n}" for k, n in counts.items())
        notes.append(f"{total} non-finite value{'s' if total != 1 else ''} masked ({where})")
    if extra:
        notes.append(extra)
    return "\n".join([title, *notes]) if notes else title


def log_levels(z, n: int) -> np.ndarray:
    """`n` increasing contour levels from the minimum to the maximum of the finite values of `z`, geometrically
    spaced, so that the many lines land near the minimum, where the interesting structure of a loss basin is.

    When the minimum is <= 0 (a zero or negative loss) the spacing is geometric in `z - min + eps`, with `eps`
    a thousandth of the range: levels still crowd toward the minimum and still span exactly min..max.
    A constant `z` gives the single level `[min]`. Raises `ValueError` without finite values or with `n < 2`.
    """
    if n < 2:
        raise ValueError(f"log_levels needs n >= 2, got {n}")
    finite = np.asarray(z, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ValueError("log_levels: no finite values")
    lo, hi = float(finite.min()), float(finite.max())
    if hi == lo:
        return np.array([lo])
    if lo > 0:
        levels = np.geomspace(lo, hi, n)
    else:
        eps = (hi - lo) * 1e-3
        levels = lo - eps + np.geomspace(eps, hi - lo + eps, n)
    levels[0], levels[-1] = lo, hi  # exact ends despite rounding
    return levels


def _log_y(ax) -> None:
    """A logarithmic y axis with plain tick labels ("0.2", "40") instead of "2x10^-1", "4x10^1"."""
    from matplotlib.ticker import LogFormatter

    class _Plain(LogFormatter):
        # LogFormatter decides which ticks get a label (all minor ticks only over a short range); "%.3g" writes it
        def __call__(self, x, pos=None):
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_Plain())
    ax.yaxis.set_minor_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _level_ticks(cbar, levels: np.ndarray, n_ticks: int = 7) -> None:
    """Colour-bar ticks at about `n_ticks` of the contour levels (ends included), written with 3 significant
    digits, instead of matplotlib's default of one long label per other level."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    idx = np.unique(np.round(np.linspace(0, len(levels) - 1, min(n_ticks, len(levels)))).astype(int))
    cbar.ax.yaxis.set_major_locator(FixedLocator(levels[idx]))
    cbar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    cbar.ax.yaxis.set_minor_locator(NullLocator())


def _splits(arrays: Mapping, metric: str) -> list[str]:
    return [s for s in SPLITS if f"{s}_{metric}" in arrays]


def _grid(arrays: Mapping, split: str):
    """x (nx,), y (ny,), masked Z (ny, nx) of `{split}_loss`, with a clear error for a wrong key or shape."""
    key = f"{split}_loss"
    if key not in arrays:
        raise KeyError(f"no {key!r} in the arrays (keys: {sorted(arrays)})")
    x = np.asarray(arrays["x"], dtype=float).ravel()
    y = np.asarray(arrays["y"], dtype=float).ravel()
    z = _masked(arrays[key])
    if z.shape != (len(y), len(x)):
        raise ValueError(f"{key} has shape {z.shape}, expected (len(y), len(x)) = {(len(y), len(x))}")
    return x, y, z


# ------------------------------------------------------------------------------------------------ 1-D plots
def plot_1d(arrays: Mapping, path, title: str, xlabel: str = "direction coordinate") -> Path:
    """Loss (left) and accuracy (right) along a 1-D slice, one line per split present.

    The coordinate is `arrays["x"]` (a slice along a direction, 0 = the trained point, marked by a dotted line)
    or `arrays["alpha"]` (a linear interpolation from a to b; the x label then defaults to
    "alpha (0 = a, 1 = b)" and both ends are marked). The loss axis is logarithmic when every finite loss is
    positive. Without any accuracy array there is only the loss panel.
    """
    if "alpha" in arrays:
        coord = np.asarray(arrays["alpha"], dtype=float).ravel()
        marks = (0.0, 1.0)
        if xlabel == "direction coordinate":
            xlabel = "alpha (0 = a, 1 = b)"
    elif "x" in arrays:
        coord = np.asarray(arrays["x"], dtype=float).ravel()
        marks = (0.0,)
    else:
        raise KeyError(f"plot_1d needs an 'x' or 'alpha' array (keys: {sorted(arrays)})")
    loss_splits, acc_splits = _splits(arrays, "loss"), _splits(arrays, "acc")
    if not loss_splits and not acc_splits:
        raise KeyError(f"no '<split>_loss' or '<split>_acc' arrays for splits {SPLITS} (keys: {sorted(arrays)})")

    panels = [(m, s) for m, s in (("loss", loss_splits), ("acc", acc_splits)) if s]
    fig = _figure((5.2 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    masked: dict[str, int] = {}
    for ax, (metric, splits) in zip(axes, panels):
        finite_values = []
        for split in splits:
            key = f"{split}_{metric}"
            values = _masked(arrays[key]).ravel()
            if values.shape != coord.shape:
                raise ValueError(f"{key} has {values.size} values for {coord.size} coordinates")
            masked[key] = _n_masked(values)
            finite_values.append(values.compressed())
            ax.plot(coord, values, marker="o", markersize=3, color=_SPLIT_COLORS[split], label=split)
        finite_values = np.concatenate(finite_values)
        if metric == "loss" and finite_values.size and (finite_values > 0).all():
            _log_y(ax)
        for m in marks:
            ax.axvline(m, color="0.5", linestyle=":", linewidth=1)
        if coord.size and np.isfinite(coord).all() and coord.max() > coord.min():
            pad = 0.03 * (coord.max() - coord.min())  # the full range even where every value is masked
            ax.set_xlim(coord.min() - pad, coord.max() + pad)
        ax.set_xlabel(xlabel)
        if metric == "loss":
            ax.set_ylabel("loss (log scale)" if ax.get_yscale() == "log" else "loss")
        else:
            ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
        ax.legend(fontsize="small")
    fig.suptitle(_title(title, masked), fontsize="medium")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ 2-D plots
def plot_contour(arrays: Mapping, path, title: str, split: str = "train", levels: int = 30, trajectory=None,
                 xlabel: str = "d1", ylabel: str = "d2") -> Path:
    """Contour lines of `{split}_loss` over the plane spanned by two directions (Li et al. 2018, Fig. 5).

    `levels` log-spaced levels between the minimum and maximum of the finite losses (`log_levels`), coloured on
    a log scale (when the losses are positive) with a labelled colour bar. The centre (0, 0), the point the
    directions start from, is marked with a black cross. `trajectory`, an (m, 2) array of coordinates in the
    same plane (e.g. the optimization path projected on its PCA directions, Li et al. Sec. 7), is drawn as a
    line with markers, its start as a circle and its end as a star. Equal aspect where the two ranges are within
    `MAX_ASPECT` of each other: both axes are multiples of direction vectors of the same norm, so a basin's shape is
    shown undistorted; beyond that (a PCA plane whose first direction spans far more than the second) equal units
    would make a thin strip, so the axes fill the panel and the title says they are scaled differently. The legend
    sits below the panel, never over the trajectory or the contours.
    """
    from matplotlib.colors import BoundaryNorm, LogNorm

    x, y, z = _grid(arrays, split)
    fig = _figure((6.4, 5.6))
    ax = fig.add_subplot()
    finite = z.compressed()
    if finite.size >= 2 and finite.min() < finite.max():
        lv = log_levels(finite, levels)
        # positive losses: a log colour scale; otherwise one colour step per (shifted-log-spaced) level
        norm = LogNorm(vmin=lv[0], vmax=lv[-1]) if lv[0] > 0 else BoundaryNorm(lv, ncolors=256)
        cs = ax.contour(x, y, z, levels=lv, cmap="viridis", norm=norm, linewidths=1)
        cbar = fig.colorbar(cs, ax=ax, shrink=0.9)
        cbar.set_label(f"{split} loss" + (" (log scale)" if lv[0] > 0 else " (log-spaced levels)"))
        _level_ticks(cbar, lv)
    else:
        why = f"constant loss {finite[0]:.4g}: nothing to contour" if finite.size else "no finite loss to contour"
        ax.text(0.5, 0.75, why, ha="center", va="center", transform=ax.transAxes)
        ax.set(xlim=(x.min(), x.max()), ylim=(y.min(), y.max()))
    ax.plot(0, 0, marker="x", markersize=9, markeredgewidth=2, color="black", linestyle="none", label="centre (0, 0)")
    if trajectory is not None:
        t = np.asarray(trajectory, dtype=float)
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"trajectory must have shape (m, 2), got {t.shape}")
        t = t[np.isfinite(t).all(axis=1)]
        if len(t):
            ax.plot(t[:, 0], t[:, 1], color="C3", marker=".", markersize=5, linewidth=1.2, label="trajectory")
            ax.plot(*t[0], marker="o", markersize=6, color="C3", markerfacecolor="white", linestyle="none",
                    label="start")
            ax.plot(*t[-1], marker="*", markersize=13, color="C3", markeredgecolor="black", linestyle="none",
                    label="end")
    spans = (float(np.ptp(x)) if x.size else 0.0, float(np.ptp(y)) if y.size else 0.0)
    extra = ""
    if min(spans) > 0 and max(spans) / min(spans) > MAX_ASPECT:
        extra = f"axes scaled differently (the {xlabel} range is {spans[0] / spans[1]:.3g}x the {ylabel} range)"
    else:
        ax.set_aspect("equal", adjustable="box")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize="small", loc="outside lower center", ncols=min(len(labels), 4))
    fig.suptitle(_title(title, {f"{split}_loss": _n_masked(z)}, extra), fontsize="medium")
    return _save(fig, path)


def plot_surface(arrays: Mapping, path, title: str, split: str = "train") -> Path:
    """3-D surface of `{split}_loss` over the plane of two directions (Li et al. 2018, Fig. 1).

    The height is the loss itself; the colours follow a log scale when the losses are positive, so the
    structure near the minimum stays visible. Masked (non-finite) points leave holes in the surface.
    """
    from matplotlib.colors import LogNorm, Normalize

    x, y, z = _grid(arrays, split)
    fig = _figure((7.0, 5.8))
    ax = fig.add_subplot(projection="3d")
    X, Y = np.meshgrid(x, y)
    finite = z.compressed()
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        norm = LogNorm(vmin=lo, vmax=hi) if lo > 0 and hi > lo else Normalize(vmin=lo, vmax=hi)
        surf = ax.plot_surface(X, Y, z.filled(np.nan), cmap="viridis", norm=norm, rstride=1, cstride=1,
                               linewidth=0.2, edgecolor="0.3", antialiased=True)
        cbar = fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.1)
        cbar.set_label(f"{split} loss" + (" (log colour scale)" if isinstance(norm, LogNorm) else ""))
    else:
        ax.text2D(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="d1", ylabel="d2", zlabel=f"{split} loss")
    fig.suptitle(_title(title, {f"{split}_loss": _n_masked(z)}), fontsize="medium")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ curves
def plot_curve(steps, values: Mapping[str, Sequence[float]], path, title: str, ylabel: str,
               log: bool = False, threshold: str | None = None) -> Path:
    """Several quantities against the training step, e.g. `{"lambda_max": [...], "2(1+β)/η": [...]}`.

    The key named `threshold` (and a key named "2/lr") is drawn as a dashed black line labelled as the stability
    threshold, e.g. the optimizer's edge of stability: gradient descent with learning rate lr is unstable on a
    quadratic whose top Hessian eigenvalue exceeds 2/lr (2(1+β)/lr with heavy-ball momentum β), and full-batch
    training drives lambda_max up to it and hovers there (Cohen et al. 2021). A scalar value is broadcast over
    the steps (a constant learning rate). With `log`, the y axis is logarithmic and values <= 0 are left out (the
    title says how many).
    """
    steps = np.asarray(steps, dtype=float).ravel()
    if not values:
        raise ValueError("plot_curve needs at least one series")
    fig = _figure((7.0, 4.5))
    ax = fig.add_subplot()
    masked: dict[str, int] = {}
    n_nonpositive = 0
    for i, (name, series) in enumerate(values.items()):
        v = np.asarray(series, dtype=float)
        if v.ndim == 0:
            v = np.full(steps.shape, float(v))
        v = v.ravel()
        if v.shape != steps.shape:
            raise ValueError(f"{name!r} has {v.size} values for {steps.size} steps")
        v = _masked(v)
        masked[name] = _n_masked(v)
        if log:
            n_nonpositive += int(np.ma.filled(v <= 0, False).sum())
            v = np.ma.masked_less_equal(v, 0)
        if name == "2/lr" or name == threshold:
            ax.plot(steps, v, color="black", linestyle="--", linewidth=1.2, label=f"{name} (stability threshold)")
        else:
            ax.plot(steps, v, color=f"C{i % 10}", marker="." if len(steps) <= 60 else None, label=name)
    if log:
        _log_y(ax)
    ax.set(xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3, which="both" if log else "major")
    ax.legend(fontsize="small")
    extra = f"{n_nonpositive} value{'s' if n_nonpositive != 1 else ''} <= 0 not shown on the log axis" \
        if n_nonpositive else ""
    fig.suptitle(_title(title, masked, extra), fontsize="medium")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ spectra
def plot_density(grid, density, path, title: str, nodes=None, stats: Mapping[str, float] | None = None,
                 decades: float = 12.0) -> Path:
    """A Hessian eigenvalue density on a log scale against the eigenvalue, as Ghorbani et al. 2019 (Fig. 1) and
    PyHessian draw it: the Gaussian-broadened SLQ density `density` on `grid`.

    The y axis spans `decades` decades below the peak (lower values are not drawn); eigenvalue 0 is a dotted line;
    `nodes` (the quadrature nodes of every probe, nan padding ignored) are ticks along the bottom; `stats`
    (e.g. lambda_min, lambda_max, negative mass, trace) are written in a box in the corner.
    """
    grid = np.asarray(grid, dtype=float).ravel()
    values = _masked(density).ravel()
    if values.shape != grid.shape:
        raise ValueError(f"density has {values.size} values for {grid.size} grid points")
    fig = _figure((7.0, 4.6))
    ax = fig.add_subplot()
    positive = values.compressed()[values.compressed() > 0]
    if positive.size:
        floor = max(float(positive.min()), float(positive.max()) * 10.0 ** -decades)
        ax.plot(grid, np.ma.masked_less(values, floor), color="C0", linewidth=1.2, label="density")
        ax.set_yscale("log")
        ax.set_ylim(floor, float(positive.max()) * 2)
    else:
        ax.text(0.5, 0.5, "no positive density to draw", ha="center", va="center", transform=ax.transAxes)
    if grid.size and grid.min() <= 0 <= grid.max():
        ax.axvline(0.0, color="0.5", linestyle=":", linewidth=1)
    if nodes is not None:
        theta = np.asarray(nodes, dtype=float).ravel()
        theta = theta[np.isfinite(theta)]
        ax.plot(theta, np.full(theta.shape, 0.02), linestyle="none", marker="|", markersize=8, color="C3",
                alpha=0.6, transform=ax.get_xaxis_transform(), label=f"quadrature nodes ({theta.size})")
    if stats:
        text = "\n".join(f"{k} = {v:.4g}" for k, v in stats.items())
        ax.text(0.98, 0.97, text, ha="right", va="top", transform=ax.transAxes, fontsize="small",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})
    if grid.size:
        ax.set_xlim(grid.min(), grid.max())
    ax.set(xlabel="eigenvalue", ylabel="density (log scale)")
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize="small", loc="best")
    fig.suptitle(_title(title, {"density": _n_masked(values)}), fontsize="medium")
    return _save(fig, path)


def plot_ritz(values, weights, path, title: str, top_k: int = 1) -> Path:
    """The Ritz values of one Lanczos run (x) with their Gauss quadrature weights (y, log scale), as stems: the
    largest `top_k` and the smallest (converged extremes, the numbers the `hessian` analysis reports) in colour,
    the interior ones (a coarse one-probe quadrature of the spectrum) in grey. Eigenvalue 0 is a dotted line.
    """
    values = np.asarray(values, dtype=float).ravel()
    weights = np.asarray(weights, dtype=float).ravel()
    if values.shape != weights.shape:
        raise ValueError(f"{values.size} Ritz values but {weights.size} weights")
    fig = _figure((7.0, 4.4))
    ax = fig.add_subplot()
    keep = np.isfinite(values) & np.isfinite(weights)
    values, weights = values[keep], np.maximum(weights[keep], 1e-30)  # a weight of exactly 0 on a log axis
    order = np.argsort(values)[::-1]
    values, weights = values[order], weights[order]
    bottom = max(float(weights.min()) / 3, 1e-30) if weights.size else 1e-3
    groups = [("interior Ritz values", slice(top_k, max(top_k, len(values) - 1)), "0.6"),
              (f"top {min(top_k, len(values))}", slice(0, top_k), "C3"),
              ("smallest", slice(len(values) - 1, len(values)) if len(values) > top_k else slice(0, 0), "C0")]
    for label, part, color in groups:
        if values[part].size:
            ax.vlines(values[part], bottom, weights[part], color=color, linewidth=1.2)
            ax.plot(values[part], weights[part], "o", color=color, markersize=4, label=label)
    if values.size and values.min() <= 0 <= values.max():
        ax.axvline(0.0, color="0.5", linestyle=":", linewidth=1)
    _log_y(ax)
    if weights.size:
        ax.set_ylim(bottom, float(weights.max()) * 2)
    ax.set(xlabel="eigenvalue (Ritz value)", ylabel="quadrature weight (log scale)")
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return _save(fig, path)
