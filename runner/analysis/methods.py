"""The registered analyses: one schema (its YAML's fields, checked once) and one function each.

landscape_1d, landscape_2d  Li et al. 2018 filter-normalized random slices (runner/analysis/landscape.py)
interpolate                 linear path between this run and `analysis.other` (Goodfellow et al. 2015)
pca                         Li et al. 2018 Sec. 7: the plane of the training trajectory's top two PCA directions
hessian                     top-k / smallest eigenvalues (Lanczos), trace (Hutchinson), edge-of-stability ratio
sharpness                   SAM sharpness, one-step and by ascent, and its adaptive (ASAM) form

Conventions, shared: landscapes report plain float32 cross-entropy and accuracy (the numbers of `train/loss`,
`test/loss`, comparable across objectives) on fixed seeded subsets without augmentation; curvature and
sharpness use the run's training objective (what the optimizer minimizes) without weight decay, in fp32,
BN in eval mode (running statistics), on the training subset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from runner import paramspace
from runner.analysis import ANALYSES, Context, Outcome
from runner.config import Checked, check


# ------------------------------------------------------------------------------------------ shared settings

@dataclass
class Subsets(Checked):
    """Which samples: a seeded subset of `samples` per split (null: all), evaluated `batch_size` at a time."""
    samples: Optional[int] = 2048
    batch_size: int = 1024
    seed: int = 0  # seeds the subsets and the random directions / probe vectors

    def check(self):
        check(self.samples is None or self.samples >= 1, "samples", self.samples, "null or >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2**32)")


@dataclass
class BNMode(Checked):
    """`eval`: BatchNorm uses the checkpoint's running statistics; `recalibrate`: re-estimated at every point
    on the training subset (slower; what the point's own network would use)."""
    bn: str = "eval"

    def check(self):
        check(self.bn in ("eval", "recalibrate"), "bn", self.bn, "eval, recalibrate")


@dataclass
class Directions(Checked):
    """Li et al.'s random directions: `filter` normalization (each output filter scaled to the weight filter's
    norm), `layer` or `none`; 1-D tensors (biases, BN) get a zero direction unless ignore_vectors=false."""
    normalization: str = "filter"
    ignore_vectors: bool = True
    points_per_batch: Optional[int] = None  # grid points per vmapped forward (null: chosen by model size)

    def check(self):
        check(self.normalization in ("filter", "layer", "none"), "normalization", self.normalization,
              "filter, layer, none")
        check(self.points_per_batch is None or self.points_per_batch >= 1, "points_per_batch",
              self.points_per_batch, "null or >= 1")


def _axis(obj, name: str) -> None:
    low, high, points = getattr(obj, f"{name}_min"), getattr(obj, f"{name}_max"), getattr(obj, f"{name}_points")
    check(np.isfinite(low) and np.isfinite(high) and low < high, f"{name}_min",
          f"{low}..{high}", f"finite bounds with {name}_min < {name}_max")
    check(2 <= points <= 10001, f"{name}_points", points, "2..10001")


def _title(settings, context: Context, extra: str = "") -> str:
    spec = context.experiment.spec
    parts = [f"{spec.experiment} {spec.model.name}/{spec.optimizer.name} seed {spec.seed}",
             f"step {context.progress.step}", f"BN {settings.bn}",
             f"{settings.samples or 'all'} samples/split, seed {settings.seed}"]
    return ", ".join(parts[:2]) + "\n" + ", ".join(parts[2:] + ([extra] if extra else []))


def _landscape_scalars(arrays: dict, center) -> dict:
    """Numbers a report can compare: loss at the centre and the largest rise within the slice."""
    out = {}
    for key, values in arrays.items():
        if key.endswith("_loss"):
            split = key[:-5]
            finite = values[np.isfinite(values)]
            out[f"{split}_loss_center"] = float(values[center])
            out[f"{split}_loss_max_rise"] = float(finite.max() - values[center]) if finite.size else float("nan")
    return out


# ----------------------------------------------------------------------------------------------- landscapes

@dataclass
class Landscape1D(Subsets, BNMode, Directions):
    x_min: float = -1.0
    x_max: float = 1.0
    x_points: int = 51

    def check(self):
        _axis(self, "x")


@ANALYSES.register("landscape_1d", Landscape1D, "Li et al. 2018 filter-normalized 1-D slice", periodic=False)
def landscape_1d(context: Context, **settings) -> Outcome:
    from runner.analysis import landscape, plots

    s = Landscape1D(**settings)
    probe, sets = context.probe, context.sets(s.samples, s.seed, s.batch_size)
    direction = landscape.random_direction(probe.params, s.seed, s.normalization, s.ignore_vectors)
    xs = np.linspace(s.x_min, s.x_max, s.x_points)
    arrays = landscape.landscape_1d(probe, probe.params, direction, sets, xs, bn=s.bn,
                                    points_per_batch=s.points_per_batch, progress=context.show_progress)
    title = _title(s, context, f"{s.normalization}-normalized direction")
    center = int(np.argmin(np.abs(xs)))
    return Outcome(scalars=_landscape_scalars(arrays, center) if xs[center] == 0 else {}, arrays=arrays,
                   figures={"": lambda path: plots.plot_1d(arrays, path, title)}, info={"bn": s.bn})


@dataclass
class Landscape2D(Landscape1D):
    x_points: int = 21
    y_min: float = -1.0
    y_max: float = 1.0
    y_points: int = 21
    surface: bool = True  # also a 3-D surface figure

    def check(self):
        _axis(self, "y")


@ANALYSES.register("landscape_2d", Landscape2D, "Li et al. 2018 filter-normalized 2-D grid", periodic=False)
def landscape_2d(context: Context, **settings) -> Outcome:
    from runner.analysis import landscape

    s = Landscape2D(**settings)
    probe, sets = context.probe, context.sets(s.samples, s.seed, s.batch_size)
    d1 = landscape.random_direction(probe.params, s.seed, s.normalization, s.ignore_vectors)
    d2 = landscape.random_direction(probe.params, s.seed + 1, s.normalization, s.ignore_vectors)
    xs, ys = np.linspace(s.x_min, s.x_max, s.x_points), np.linspace(s.y_min, s.y_max, s.y_points)
    arrays = landscape.landscape_2d(probe, probe.params, d1, d2, sets, xs, ys, bn=s.bn,
                                    points_per_batch=s.points_per_batch, progress=context.show_progress)
    return _grid_outcome(arrays, xs, ys, s, _title(s, context, f"{s.normalization}-normalized directions"))


def _grid_outcome(arrays: dict, xs, ys, s, title: str, trajectory=None, info: dict | None = None) -> Outcome:
    from runner.analysis import plots

    cx, cy = int(np.argmin(np.abs(xs))), int(np.argmin(np.abs(ys)))
    scalars = _landscape_scalars(arrays, (cy, cx)) if xs[cx] == 0 and ys[cy] == 0 else {}
    figures = {}
    for split in [k[:-5] for k in arrays if k.endswith("_loss")]:
        figures[f"_{split}_contour"] = (lambda sp: lambda path: plots.plot_contour(
            arrays, path, title, split=sp, trajectory=trajectory))(split)
    if s.surface:
        figures["_train_surface"] = lambda path: plots.plot_surface(arrays, path, title, split="train")
    return Outcome(scalars=scalars, arrays=arrays, figures=figures, info={"bn": s.bn, **(info or {})})


# ------------------------------------------------------------------------------------------- interpolation

@dataclass
class Interpolate(Subsets, BNMode):
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    alpha_points: int = 21
    other_checkpoint: str = "last"  # of analysis.other when it is a run directory: last, best or a path

    def check(self):
        _axis(self, "alpha")


@ANALYSES.register("interpolate", Interpolate, "linear path from this run (0) to analysis.other (1)",
                   periodic=False, needs_other=True)
def interpolate(context: Context, **settings) -> Outcome:
    from runner.analysis import landscape, plots
    from runner.analysis.probe import Probe
    from runner.experiment import load_run

    s = Interpolate(**settings)
    other, other_progress = load_run(context.plan.other, s.other_checkpoint, device=context.device)
    if other.spec.resolved["model"] != context.experiment.spec.resolved["model"]:
        raise ValueError(f"analysis.other={context.plan.other} is another model ({other.spec.model.name}: "
                         f"{other.spec.resolved['model']}); interpolation needs the same architecture")
    probe_b = Probe(other.model, other.autocast())
    names_a, names_b = context.probe.names, probe_b.names
    shapes_a = [tuple(p.shape) for p in context.probe.params]
    if names_a != names_b or shapes_a != [tuple(p.shape) for p in probe_b.params]:
        raise ValueError(f"analysis.other={context.plan.other} has other parameters than this run")
    sets = context.sets(s.samples, s.seed, s.batch_size)
    alphas = np.linspace(s.alpha_min, s.alpha_max, s.alpha_points)
    arrays = landscape.interpolate(context.probe, context.probe.params, probe_b.params, sets, alphas, bn=s.bn,
                                   buffers_a=context.probe.buffers, buffers_b=probe_b.buffers, probe_b=probe_b)
    distance = paramspace.norm(paramspace.sub(probe_b.params, context.probe.params)).item()
    title = _title(s, context, f"0 = this run, 1 = {Path(context.plan.other).name}")
    scalars = {"distance": distance}
    for key, values in arrays.items():  # the barrier: the largest rise above the straight line between ends
        if key.endswith("_loss") and np.all(np.isfinite(values)):
            line = np.interp(alphas, [alphas[0], alphas[-1]], [values[0], values[-1]])
            scalars[f"{key[:-5]}_barrier"] = float(np.max(values - line))
    return Outcome(scalars=scalars, arrays=arrays, figures={"": lambda path: plots.plot_1d(arrays, path, title)},
                   info={"bn": s.bn, "other": str(context.plan.other), "other_step": other_progress.step})


# ----------------------------------------------------------------------------------------------------- PCA

@dataclass
class PCA(Subsets, BNMode):
    points: int = 21      # grid points per axis
    margin: float = 0.3   # the grid spans the trajectory's coordinates plus this fraction on each side
    surface: bool = False
    snapshot_every_epochs: Optional[int] = 1   # during training: save the parameters every N epochs
    snapshot_every_steps: Optional[int] = None  # ... or every N steps

    def check(self):
        for key in ("snapshot_every_epochs", "snapshot_every_steps"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, value, "null or >= 1")
        check(self.snapshot_every_epochs or self.snapshot_every_steps, "snapshot_every_epochs",
              self.snapshot_every_epochs, ">= 1 (or set snapshot_every_steps): PCA needs snapshots along training")
        check(2 <= self.points <= 10001, "points", self.points, "2..10001")
        check(0 <= self.margin <= 10, "margin", self.margin, "0..10")


TRAJECTORY_MIN = 3


def save_trajectory_point(context: Context) -> None:
    """During training: this step's trainable parameters into analysis/trajectory/step=<N>.pt (atomic)."""
    from runner.rundir import atomic_write_bytes

    folder = context.trajectory_dir()
    if folder is None:
        return
    state = {"step": context.progress.step, "epoch": context.progress.epoch, "names": context.probe.names,
             "params": [p.detach().cpu().clone() for p in context.probe.params]}
    atomic_write_bytes(folder / f"step={context.progress.step:012d}.pt", lambda tmp: torch.save(state, tmp))


def load_trajectory(folder: Path | None, names: list[str], up_to_step: int) -> list[dict]:
    points = []
    for path in sorted(folder.glob("step=*.pt")) if folder is not None and folder.is_dir() else []:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["names"] == names and state["step"] <= up_to_step:
            points.append(state)
    return points


@ANALYSES.register("pca", PCA, "Li et al. 2018 Sec. 7: the training trajectory on its top-2 PCA plane",
                   periodic=False, collects_trajectory=True)
def pca(context: Context, **settings) -> Outcome:
    from runner.analysis import landscape

    s = PCA(**settings)
    probe = context.probe
    saved = load_trajectory(context.trajectory_dir(), probe.names, context.progress.step)
    if len(saved) < TRAJECTORY_MIN:
        raise ValueError(f"analysis=pca needs at least {TRAJECTORY_MIN} parameter snapshots saved along training "
                         f"in {context.trajectory_dir()}; this run has {len(saved)}: train it with analysis=pca "
                         "(snapshots every analysis.pca.snapshot_every_epochs epochs or snapshot_every_steps steps)")
    trajectory = [[t.to(p.device, p.dtype) for t, p in zip(state["params"], probe.params)] for state in saved]
    found = landscape.pca_directions(trajectory, probe.params)
    coords = np.asarray(found["trajectory"], dtype=float)
    span = lambda c: (c.min(), c.max())  # noqa: E731
    (x0, x1), (y0, y1) = span(np.append(coords[:, 0], 0.0)), span(np.append(coords[:, 1], 0.0))
    pad_x, pad_y = s.margin * max(x1 - x0, 1e-12), s.margin * max(y1 - y0, 1e-12)
    xs = np.linspace(x0 - pad_x, x1 + pad_x, s.points)
    ys = np.linspace(y0 - pad_y, y1 + pad_y, s.points)
    sets = context.sets(s.samples, s.seed, s.batch_size)
    arrays = landscape.landscape_2d(probe, probe.params, found["d1"], found["d2"], sets, xs, ys, bn=s.bn,
                                    progress=context.show_progress)
    arrays["trajectory"] = coords
    arrays["trajectory_steps"] = np.asarray([state["step"] for state in saved])
    arrays["explained_variance_ratio"] = np.asarray(found["explained_variance_ratio"], dtype=float)
    ratio = arrays["explained_variance_ratio"]
    title = _title(s, context, f"PCA of {len(saved)} snapshots: {100 * ratio[0]:.1f}% + {100 * ratio[1]:.1f}%")
    outcome = _grid_outcome({k: v for k, v in arrays.items() if k.endswith(("_loss", "_acc")) or k in ("x", "y")},
                            xs, ys, s, title, trajectory=coords, info={"snapshots": len(saved)})
    outcome.arrays = arrays
    outcome.scalars = {"explained_variance_1": float(ratio[0]), "explained_variance_2": float(ratio[1])}
    return outcome


# ------------------------------------------------------------------------------------------------ curvature

@dataclass
class Hessian(Subsets):
    top_k: int = 3
    iterations: int = 20          # Lanczos steps (full reorthogonalization)
    trace_samples: int = 20       # Hutchinson probes (0: no trace)
    method: str = "auto"          # HVP: forward_over_reverse, double_backward, or auto (the first, else the second)

    def check(self):
        check(1 <= self.top_k <= self.iterations, "top_k", self.top_k, f"1..iterations ({self.iterations})")
        check(2 <= self.iterations <= 1000, "iterations", self.iterations, "2..1000")
        check(0 <= self.trace_samples <= 100000, "trace_samples", self.trace_samples, "0..100000")
        check(self.method in ("auto", "forward_over_reverse", "double_backward"), "method", self.method,
              "auto, forward_over_reverse, double_backward")


@ANALYSES.register("hessian", Hessian, "Hessian eigenvalues (Lanczos), trace (Hutchinson), edge of stability",
                   periodic=True)
def hessian(context: Context, **settings) -> Outcome:
    from runner.analysis import curvature

    s = Hessian(**settings)
    probe = context.exact_probe
    data = context.sets(s.samples, s.seed, s.batch_size, splits=("train",))["train"]
    hvp = curvature.hvp_function(probe, probe.params, data, context.experiment.objective, method=s.method)
    top = curvature.top_eigenvalues(hvp, probe.params, k=s.top_k, iterations=s.iterations, seed=s.seed)
    scalars = {"lambda_max": top["lambda_max"], "lambda_min": top["lambda_min"],
               "eos_ratio": curvature.edge_of_stability(top["lambda_max"], context.lr)}
    for i, value in enumerate(top["top"][1:], start=2):
        scalars[f"lambda_{i}"] = value
    if s.trace_samples:
        trace = curvature.hutchinson_trace(hvp, probe.params, samples=s.trace_samples, seed=s.seed)
        scalars.update(trace=trace["trace"], trace_stderr=trace["stderr"])
    arrays = {"top": np.asarray(top["top"], dtype=float)}
    figures = {}
    curve = _curve_over_training(context, "hessian/lambda_max", scalars["lambda_max"])
    if curve is not None:
        arrays.update(curve)
        figures["_over_training"] = lambda path: _plot_lambda_over_training(curve, path, context)
    return Outcome(scalars=scalars, arrays=arrays, figures=figures,
                   info={"lr": context.lr, "iterations": top["iterations"], "samples": len(data),
                         "hvp": getattr(hvp, "method", s.method)})


def _curve_over_training(context: Context, key: str, now: float) -> dict | None:
    """The values of `key` logged during training (metrics.jsonl) up to this step, this one last, with the lr of
    each record; None when fewer than two points (no curve to draw)."""
    from runner.rundir import METRICS, read_jsonl

    if context.out_dir is None:
        return None
    steps, values, lrs = [], [], []
    for record in read_jsonl(context.out_dir.parent / METRICS):
        if isinstance(record.get(key), (int, float)) and record.get("step", 0) < context.progress.step:
            steps.append(record["step"])
            values.append(record[key])
            lrs.append(_lr_at(context, record))
    steps.append(context.progress.step)
    values.append(now)
    lrs.append(context.lr)
    if len(steps) < 2:
        return None
    return {"curve_steps": np.asarray(steps), "curve_lambda_max": np.asarray(values), "curve_lr": np.asarray(lrs)}


def _lr_at(context: Context, record: dict) -> float:
    """The learning rate of a record: its own `lr` when it has one, else the previous record's (the analysis
    columns share the training record of their step)."""
    from runner.rundir import METRICS, read_jsonl

    if isinstance(record.get("lr"), (int, float)):
        return float(record["lr"])
    earlier = [r["lr"] for r in read_jsonl(context.out_dir.parent / METRICS)
               if r.get("step", 0) <= record["step"] and isinstance(r.get("lr"), (int, float))]
    return float(earlier[-1]) if earlier else float("nan")


def _plot_lambda_over_training(curve: dict, path: Path, context: Context):
    from runner.analysis import plots

    lr = curve["curve_lr"]
    with np.errstate(divide="ignore"):
        threshold = np.where(lr > 0, 2.0 / np.where(lr > 0, lr, 1.0), np.nan)
    spec = context.experiment.spec
    title = (f"{spec.experiment} {spec.model.name}/{spec.optimizer.name} seed {spec.seed}: top Hessian eigenvalue "
             "over training\n(edge of stability, Cohen et al. 2021: GD is stable while lambda_max < 2/lr)")
    return plots.plot_curve(curve["curve_steps"], {"lambda_max": curve["curve_lambda_max"], "2/lr": threshold},
                            path, title, ylabel="lambda_max of the training loss", log=True)


@dataclass
class Sharpness(Subsets):
    rho: float = 0.05
    ascent_steps: int = 5          # the few-step ascent (sharpness/ascent); the one-step is sharpness/sam
    adaptive_rho: Optional[float] = 0.5   # ASAM's radius (null: no adaptive sharpness)
    eta: float = 0.01              # ASAM's T = |w| + eta

    def check(self):
        check(np.isfinite(self.rho) and self.rho > 0, "rho", self.rho, "> 0")
        check(1 <= self.ascent_steps <= 1000, "ascent_steps", self.ascent_steps, "1..1000")
        check(self.adaptive_rho is None or (np.isfinite(self.adaptive_rho) and self.adaptive_rho > 0),
              "adaptive_rho", self.adaptive_rho, "null or > 0")
        check(np.isfinite(self.eta) and self.eta >= 0, "eta", self.eta, ">= 0")


@ANALYSES.register("sharpness", Sharpness, "SAM sharpness max_{|e|<=rho} L(w+e) - L(w), one-step, ascent, ASAM",
                   periodic=True)
def sharpness(context: Context, **settings) -> Outcome:
    from runner.analysis import curvature

    s = Sharpness(**settings)
    probe, objective = context.exact_probe, context.experiment.objective
    data = context.sets(s.samples, s.seed, s.batch_size, splits=("train",))["train"]
    one = curvature.sam_sharpness(probe, probe.params, data, objective, rho=s.rho, steps=1)
    scalars = {"sam": one["sharpness"], "loss": one["loss"]}
    if s.ascent_steps > 1:
        scalars["ascent"] = curvature.sam_sharpness(probe, probe.params, data, objective, rho=s.rho,
                                                    steps=s.ascent_steps)["sharpness"]
    if s.adaptive_rho is not None:
        scalars["asam"] = curvature.sam_sharpness(probe, probe.params, data, objective, rho=s.adaptive_rho,
                                                  steps=1, adaptive=True, eta=s.eta)["sharpness"]
    return Outcome(scalars=scalars, info={"samples": len(data)})
