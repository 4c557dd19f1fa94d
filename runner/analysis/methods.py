"""The registered analyses: one schema (its YAML's fields, checked once) and one function each.

landscape_1d, landscape_2d  Li et al. 2018 filter-normalized random slices (runner/analysis/landscape.py)
interpolate                 linear path between this run and `analysis.other` (Goodfellow et al. 2015)
pca                         Li et al. 2018 Sec. 7: the plane of the training trajectory's top two PCA directions
hessian                     top-k / smallest eigenvalues (Lanczos), trace (Hutchinson), edge-of-stability ratio
                            (lambda_max over the optimizer's own threshold at the lr of the last step taken)
hessian_density             eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019, PyHessian)
sharpness                   SAM sharpness, one-step and by ascent, and its adaptive (ASAM) form

Conventions, shared: landscapes report plain float32 cross-entropy and accuracy (the numbers of `train/loss`,
`test/loss`, comparable across objectives) on fixed seeded subsets without augmentation; curvature and
sharpness use the run's training objective (what the optimizer minimizes) without weight decay, in fp32,
BN in eval mode (running statistics), on the training subset; hessian_density the same, but of the plain
cross-entropy by default (its `loss: objective` gives the objective's). Landscapes save their directions in their
.npz (`landscape.load_directions`); their statistics are relative to the checkpoint's own loss (evaluated on its own
when the grid has no point at 0) and count the grid points whose loss is not finite.
"""
from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from runner import paramspace
from runner.analysis import ANALYSES, Context, Outcome
from runner.config import Checked, check

log = logging.getLogger(__name__)

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


def _title(settings, context: Context, extra: str = "", sets: dict | None = None) -> str:
    """Two lines: the run and step; the settings, with the number of samples each split really has (`sets`: the
    evaluation sets used, e.g. "1437 train / 360 test samples"; the configured `samples` is only a cap)."""
    spec = context.experiment.spec
    counts = (" / ".join(f"{len(data)} {split}" for split, data in sets.items()) + " samples" if sets
              else f"{settings.samples or 'all'} samples/split")
    parts = [f"{spec.experiment} {spec.model.name}/{spec.optimizer.name} seed {spec.seed}",
             f"step {context.progress.step}", f"BN {settings.bn}", f"{counts}, seed {settings.seed}"]
    return ", ".join(parts[:2]) + "\n" + ", ".join(parts[2:] + ([extra] if extra else []))


def _landscape_scalars(arrays: dict, center: dict[str, float]) -> dict:
    """Numbers a report can compare, per split: the loss at the checkpoint (`center`: "<split>_loss" -> its loss),
    the largest rise above it within the slice, and how many grid points have a non-finite loss. A NaN anywhere
    makes the rise NaN, an inf (and no NaN) makes it inf: a slice that diverges somewhere never reports a
    rise of 0."""
    out = {}
    for key, values in arrays.items():
        if key.endswith("_loss"):
            split, values = key[:-5], np.asarray(values, dtype=float)
            out[f"{split}_loss_center"] = float(center[key])
            out[f"{split}_loss_max_rise"] = float(np.max(values) - center[key])  # np.max propagates NaN
            out[f"{split}_loss_nonfinite"] = int(np.count_nonzero(~np.isfinite(values)))
    return out


def _checkpoint_losses(context: Context, arrays: dict, index, sets: dict, s, name: str
                       ) -> tuple[dict[str, float], dict]:
    """The loss of each split at the checkpoint itself (coordinate 0): the grid's own point `index` when the grid
    has it (None: it does not, e.g. an even number of points over a symmetric range, or a range without 0), else
    one more evaluation at w. Returns (losses, info for the json); logs one line when the grid has non-finite
    points or no centre."""
    info = {}
    if index is not None:
        center = {k: float(v[index]) for k, v in arrays.items() if k.endswith("_loss")}
    else:  # the grid's own evaluation at w, with the grid's BN mode
        probe = context.probe
        buffers = probe.buffers_at(probe.params, s.bn, sets.get("train"))
        center = {f"{split}_loss": probe.evaluate(probe.params, data, buffers)["loss"] for split, data in sets.items()}
        info["center"] = ("the grid has no point at the checkpoint (coordinate 0); the statistics are relative to "
                          "its own loss, evaluated separately")
        log.info("%s: %s", name, info["center"])
    bad = {k[:-5]: int(np.count_nonzero(~np.isfinite(v))) for k, v in arrays.items() if k.endswith("_loss")}
    bad = {split: n for split, n in bad.items() if n}
    if bad:
        total = next(iter(arrays[k] for k in arrays if k.endswith("_loss"))).size
        info["nonfinite"] = (", ".join(f"{split}: {n} of {total}" for split, n in bad.items())
                             + " grid points have a non-finite loss (max_rise is then nan or inf)")
        log.warning("%s: %s", name, info["nonfinite"])
    return center, info


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
    title = _title(s, context, f"{s.normalization}-normalized direction", sets)
    center = int(np.argmin(np.abs(xs)))
    losses, info = _checkpoint_losses(context, arrays, center if xs[center] == 0 else None, sets, s, "landscape_1d")
    figures = {"": lambda path: plots.plot_1d(arrays, path, title)}
    arrays = {**arrays, **landscape.direction_arrays(probe.names, {"x": direction})}
    return Outcome(scalars=_landscape_scalars(arrays, losses), arrays=arrays, figures=figures,
                   info={"bn": s.bn, **info})


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
    cx, cy = int(np.argmin(np.abs(xs))), int(np.argmin(np.abs(ys)))
    losses, info = _checkpoint_losses(context, arrays, (cy, cx) if xs[cx] == 0 and ys[cy] == 0 else None, sets, s,
                                      "landscape_2d")
    outcome = _grid_outcome(arrays, xs, ys, s, _title(s, context, f"{s.normalization}-normalized directions", sets),
                            info=info)
    outcome.scalars = _landscape_scalars(arrays, losses)
    outcome.arrays = {**arrays, **landscape.direction_arrays(probe.names, {"x": d1, "y": d2})}
    return outcome


def _grid_outcome(arrays: dict, xs, ys, s, title: str, trajectory=None, info: dict | None = None) -> Outcome:
    """The figures of a 2-D grid (contours per split, the train surface) and its arrays; no scalars (the caller's)."""
    from runner.analysis import plots

    scalars = {}
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
    other_checkpoint: str = "last"  # of analysis.other when it is a run directory: last, best or a path (from it)

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
    title = _title(s, context, f"0 = this run, 1 = {Path(context.plan.other).name}", sets)
    scalars = {"distance": distance}
    for key, values in arrays.items():  # the barrier: the largest rise above the straight line between ends
        if key.endswith("_loss") and np.all(np.isfinite(values)):
            line = np.interp(alphas, [alphas[0], alphas[-1]], [values[0], values[-1]])
            scalars[f"{key[:-5]}_barrier"] = float(np.max(values - line))
    return Outcome(scalars=scalars, arrays=arrays, figures={"": lambda path: plots.plot_1d(arrays, path, title)},
                   info={"bn": s.bn, "other": str(context.plan.other), "other_step": other_progress.step,
                         "other_signature": other.signature, "other_seed": other.spec.seed})


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


def check_snapshots(plan, trainer) -> None:
    """Before any work: a pca whose run would save fewer than TRAJECTORY_MIN snapshots (one every
    `snapshot_every_epochs` epochs and one at the end) is refused (ConfigError), where the config alone tells the
    count: an epoch cadence with `trainer.epochs`, or a step cadence with `trainer.steps`."""
    from runner.config import ConfigError

    for choice in plan.choices:
        if not choice.entry.capabilities.get("collects_trajectory"):
            continue
        every_epochs, every_steps = choice.params.snapshot_every_epochs, choice.params.snapshot_every_steps
        if every_epochs and not every_steps and trainer.steps is None:
            key, every, total, unit = "snapshot_every_epochs", every_epochs, trainer.epochs, "epochs"
        elif every_steps and not every_epochs and trainer.steps is not None:
            key, every, total, unit = "snapshot_every_steps", every_steps, trainer.steps, "steps"
        else:
            continue
        count = -(-total // every)  # ceil: at every multiple of `every`, and at the end
        if count >= TRAJECTORY_MIN:
            continue
        fits = (total - 1) // (TRAJECTORY_MIN - 1)  # the longest interval that gives TRAJECTORY_MIN snapshots
        fix = f"analysis.{choice.name}.{key}<={fits}" if fits >= 1 else f"trainer.{unit}>={TRAJECTORY_MIN}"
        raise ConfigError(f"analysis.{choice.name}.{key}", message=(
            f"analysis={choice.name} needs at least {TRAJECTORY_MIN} parameter snapshots and this run would save "
            f"{count} (analysis.{choice.name}.{key}={every} of trainer.{unit}={total}, and one at the end): "
            f"use {fix}"))


def save_trajectory_point(context: Context) -> None:
    """During training: this step's trainable parameters into analysis/trajectory/step=<N>.pt (atomic)."""
    from runner.rundir import atomic_write_bytes

    folder = context.trajectory_dir()
    if folder is None:
        return
    state = {"step": context.progress.step, "epoch": context.progress.epoch, "names": context.probe.names,
             "params": [p.detach().cpu().clone() for p in context.probe.params]}
    atomic_write_bytes(folder / f"step={context.progress.step:012d}.pt", lambda tmp: torch.save(state, tmp))


def load_trajectory(folder: Path | None, names: list[str], up_to_step: int) -> tuple[list[dict], list[str]]:
    """The snapshots of this model up to `up_to_step`, and the names of those that cannot be read (a torn or
    corrupt file; read as checkpoints are, runner.experiment.load_safely), each with a warning naming it."""
    from runner.experiment import load_safely

    points, bad = [], []
    for path in sorted(folder.glob("step=*.pt")) if folder is not None and folder.is_dir() else []:
        try:
            state = load_safely(path, "snapshot")
            if not (isinstance(state, dict) and isinstance(state.get("params"), list)
                    and isinstance(state.get("step"), int)):
                raise ValueError(f"{path} is not a runner parameter snapshot")
        except ValueError as e:
            log.warning("analysis pca: %s; skipped", e)
            bad.append(path.name)
            continue
        if state.get("names") == names and state["step"] <= up_to_step:
            points.append(state)
    return points, bad


@ANALYSES.register("pca", PCA, "Li et al. 2018 Sec. 7: the training trajectory on its top-2 PCA plane",
                   periodic=False, collects_trajectory=True)
def pca(context: Context, **settings) -> Outcome:
    from runner.analysis import landscape

    s = PCA(**settings)
    probe = context.probe
    saved, bad = load_trajectory(context.trajectory_dir(), probe.names, context.progress.step)
    if len(saved) < TRAJECTORY_MIN:
        unreadable = f" readable ones ({len(bad)} unreadable: {', '.join(bad)})" if bad else ""
        raise ValueError(f"analysis=pca needs at least {TRAJECTORY_MIN} parameter snapshots saved along training "
                         f"in {context.trajectory_dir()}; this run has {len(saved)}{unreadable}: train it with "
                         "analysis=pca (snapshots every analysis.pca.snapshot_every_epochs epochs or "
                         "snapshot_every_steps steps)")
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
    title = _title(s, context, f"PCA of {len(saved)} snapshots: {100 * ratio[0]:.1f}% + {100 * ratio[1]:.1f}%",
                   sets)
    outcome = _grid_outcome({k: v for k, v in arrays.items() if k.endswith(("_loss", "_acc")) or k in ("x", "y")},
                            xs, ys, s, title, trajectory=coords,
                            info={"snapshots": len(saved), "skipped_snapshots": bad})
    outcome.arrays = {**arrays, **landscape.direction_arrays(probe.names, {"x": found["d1"], "y": found["d2"]})}
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
    work = context.work("hessian", s.iterations + s.trace_samples, "Hessian-vector products", f"on {len(data)} samples")
    hvp = curvature.hvp_function(probe, probe.params, data, context.experiment.objective, method=s.method)
    top = curvature.top_eigenvalues(work.counting(hvp), probe.params, k=s.top_k, iterations=s.iterations, seed=s.seed)
    scalars = {"lambda_max": top["lambda_max"], "lambda_min": top["lambda_min"]}
    rule, eos = _edge_of_stability(context, top["lambda_max"])
    if eos["eos_ratio"] is not None:
        scalars["eos_ratio"] = eos["eos_ratio"]
    for i, value in enumerate(top["top"][1:], start=2):
        scalars[f"lambda_{i}"] = value
    info = {"lr": eos["lr"], "edge_of_stability": eos}
    if len(top["top"]) < s.top_k:
        info["top_k"] = f"top_k={s.top_k}: {len(top['top'])} eigenvalues returned: {top['note']}"
        log.warning("hessian: %s", info["top_k"])
    if s.trace_samples:
        trace = curvature.hutchinson_trace(work.counting(hvp), probe.params, samples=s.trace_samples, seed=s.seed)
        scalars.update(trace=trace["trace"], trace_stderr=trace["stderr"])
    arrays = {"top": np.asarray(top["top"], dtype=float), "ritz_values": top["ritz"], "ritz_weights": top["weights"]}
    figures = {"": lambda path: _plot_ritz(top, scalars, s, len(data), path, context)}
    curve = _curve_over_training(context, "hessian/lambda_max", scalars["lambda_max"], eos["lr"])
    if curve is not None:
        arrays.update(curve)
        figures["_over_training"] = lambda path: _plot_lambda_over_training(curve, path, context, rule)
    return Outcome(scalars=scalars, arrays=arrays, figures=figures,
                   info={**info, "iterations": top["iterations"], "samples": len(data),
                         "hvp": getattr(hvp, "method", s.method)})


def _step_lr(context: Context) -> tuple[float | None, str]:
    """(the learning rate of the last step taken, "") or (None, why there is none). Not the lr the optimizer holds
    now: that is the schedule's value for the next step, 0 at the end of a cosine schedule."""
    lr = getattr(context.progress, "last_step_lr", None)
    if lr is not None and lr > 0:
        return float(lr), ""
    if context.progress.step == 0:
        return None, "no step taken yet, so no learning rate to compare lambda_max with"
    if lr is None:
        return None, (f"the checkpoint does not record the learning rate of its last step (written before the runner "
                      f"recorded it); the lr it holds, {context.lr:.4g}, is the schedule's value for a next step "
                      "(0 at the end of a cosine schedule), so no ratio is given")
    return None, f"the last step's learning rate was {lr:g}"


def _edge_of_stability(context: Context, lambda_max: float):
    """(the optimizer's stability rule, the json's `edge_of_stability`): its threshold formula (runner/optim:
    `stability`, declared by each optimizer; a wrapper's is its base's), the lr of the last step, the threshold
    and eos_ratio = lambda_max / threshold (None, with `no_ratio` saying why, where there is none)."""
    from runner.optim import stability

    rule = stability(context.experiment.spec.optimizer)
    lr, why = _step_lr(context)
    eos = {**rule.describe(), "lr": lr, "threshold": None, "eos_ratio": None}
    if rule.factor is None:
        eos["no_ratio"] = rule.note
    elif lr is None:
        eos["no_ratio"] = why
    else:
        eos["threshold"], eos["eos_ratio"] = rule.threshold(lr), rule.ratio(lambda_max, lr)
    return rule, eos


def _caption(context: Context) -> str:
    spec = context.experiment.spec
    return f"{spec.experiment} {spec.model.name}/{spec.optimizer.name} seed {spec.seed}, step {context.progress.step}"


def _plot_ritz(top: dict, scalars: dict, s: Hessian, samples: int, path: Path, context: Context):
    from runner.analysis import plots

    trace = (f", trace {scalars['trace']:.4g} ± {scalars['trace_stderr']:.2g} ({s.trace_samples} probes)"
             if "trace" in scalars else "")
    title = (f"{_caption(context)}: Hessian Ritz values of one Lanczos run ({top['iterations']} steps)\n"
             f"training objective without weight decay, BN eval, {samples} train samples, seed {s.seed}\n"
             f"lambda_max {scalars['lambda_max']:.4g}, lambda_min {scalars['lambda_min']:.4g}{trace}")
    return plots.plot_ritz(top["ritz"], top["weights"], path, title, top_k=len(top["top"]))


def _curve_over_training(context: Context, key: str, now: float, lr_now: float | None = None) -> dict | None:
    """The values of `key` logged during training (metrics.jsonl) up to this step, this one last, with the lr of
    each record (this one's: `lr_now`, the last step's, nan when unknown); None when fewer than two points (no
    curve to draw)."""
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
    lrs.append(float("nan") if lr_now is None else lr_now)
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


def _plot_lambda_over_training(curve: dict, path: Path, context: Context, rule):
    """lambda_max against the step, with the optimizer's own stability threshold (`rule`, runner/optim's
    `Stability`) as a dashed line labelled with its formula; without one (adaptive methods) the title says why."""
    from runner.analysis import plots

    spec = context.experiment.spec
    title = (f"{spec.experiment} {spec.model.name}/{spec.optimizer.name} seed {spec.seed}: top Hessian eigenvalue "
             "over training")
    series = {"lambda_max": curve["curve_lambda_max"]}
    threshold = None
    if rule.factor is not None:
        lr = np.asarray(curve["curve_lr"], dtype=float)
        threshold = f"{rule.formula}, {rule.rule}"
        series[threshold] = np.where(lr > 0, rule.factor / np.where(lr > 0, lr, 1.0), np.nan)
        text = (f"edge of stability, Cohen et al. 2021: stable while lambda_max < {rule.formula}, {rule.rule}"
                + (f"; {rule.note}" if rule.note else ""))
    else:
        text = f"{spec.optimizer.name}: {rule.note}"
    title += "\n" + "\n".join(textwrap.wrap(f"({text})", 90))
    return plots.plot_curve(curve["curve_steps"], series, path, title, ylabel="lambda_max of the training loss",
                            log=True, threshold=threshold)


@dataclass
class HessianDensity(Subsets):
    probes: int = 3               # n_v: Rademacher start vectors; the density is the mean of their quadratures
    iterations: int = 90          # Lanczos steps per probe (full reorthogonalization): the quadrature's nodes
    sigma: float = 0.01           # Gaussian broadening, standard deviation as a fraction of the spectrum's width
    grid_points: int = 10000      # the density's grid over [lambda_min, lambda_max] +- 5 broadening sigmas
    loss: str = "plain"           # plain: cross-entropy (the measured train/loss); objective: the training loss
    method: str = "auto"          # HVP: forward_over_reverse, double_backward, or auto

    def check(self):
        from runner.analysis.curvature import DENSITY_PAD, METHODS

        check(1 <= self.probes <= 10000, "probes", self.probes, "1..10000")
        check(2 <= self.iterations <= 1000, "iterations", self.iterations, "2..1000")
        check(bool(np.isfinite(self.sigma)) and 0 < self.sigma <= 1, "sigma", self.sigma,
              "a finite fraction of the spectrum's width in (0, 1]")
        # grid spacing <= sigma / 2, so the broadened density is resolved (and sums to 1 on the grid)
        needed = int(np.ceil(2 * (1 + 2 * DENSITY_PAD * self.sigma) / self.sigma)) + 1
        check(needed <= self.grid_points <= 1_000_000, "grid_points", self.grid_points,
              f"{needed}..1000000 (two points per broadening sigma={self.sigma:g} of the width)")
        check(self.loss in ("plain", "objective"), "loss", self.loss, "plain, objective")
        check(self.method in METHODS, "method", self.method, ", ".join(METHODS))


@ANALYSES.register("hessian_density", HessianDensity,
                   "Hessian eigenvalue density, stochastic Lanczos quadrature (Ghorbani et al. 2019)", periodic=True)
def hessian_density(context: Context, **settings) -> Outcome:
    """Ghorbani, Krishnan & Xiao 2019, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
    Density": the spectral density of the Hessian by stochastic Lanczos quadrature (`curvature.slq`: `probes`
    Rademacher starts, `iterations` Lanczos steps each with full reorthogonalization, as PyHessian's `density()`),
    broadened by a Gaussian of `sigma` x the spectrum's width (`curvature.gaussian_density`).

    Conventions: the Hessian of the plain cross-entropy (the measured `train/loss`, not the training objective:
    label smoothing or a regularizing loss would shift the spectrum; `loss: objective` asks for the objective's),
    weight decay excluded; BN in eval mode (running statistics) and no dropout, as `hessian`; fp32 (float64 in
    float64 runs); a seeded training subset of `samples`. Cost: probes x iterations HVPs over that subset.
    """
    from runner.analysis import curvature, plots

    s = HessianDensity(**settings)
    probe = context.exact_probe
    data = context.sets(s.samples, s.seed, s.batch_size, splits=("train",))["train"]
    objective = context.experiment.objective if s.loss == "objective" else None
    loss = f"training objective {context.experiment.spec.loss.name} (no weight decay)" if objective is not None \
        else "plain cross-entropy"
    n = sum(p.numel() for p in probe.params)
    work = context.work("hessian_density", s.probes * min(s.iterations, n), "Hessian-vector products",
                        f"on {len(data)} samples")  # at most: a probe stops early on breakdown
    hvp = curvature.hvp_function(probe, probe.params, data, objective, method=s.method)
    found = curvature.slq(work.counting(hvp), probe.params, probes=s.probes, iterations=s.iterations, seed=s.seed)
    grid, sigma_abs = curvature.spectral_grid(found["nodes"], s.sigma, s.grid_points)
    density = curvature.gaussian_density(found["nodes"], found["weights"], grid, sigma_abs)
    scalars = {k: found[k] for k in ("lambda_max", "lambda_min", "negative_mass", "trace")}
    if s.probes > 1:
        scalars["trace_stderr"] = found["trace_stderr"]
    arrays = {"nodes": found["nodes"], "weights": found["weights"], "steps": found["steps"], "grid": grid,
              "density": density}
    steps = sorted({int(k) for k in found["steps"]})
    info = {"parameters": found["dimension"], "samples": len(data), "probes": s.probes,
            "steps": steps[0] if len(steps) == 1 else steps, "sigma_abs": sigma_abs,
            "second_moment": found["second_moment"], "negative_tolerance": found["negative_tolerance"],
            "loss": loss, "bn": "eval", "hvp": getattr(hvp, "method", s.method)}
    n_steps = str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
    title = (f"{_caption(context)}: Hessian eigenvalue density by SLQ (Ghorbani et al. 2019)\n"
             f"{len(data)} train samples, {s.probes} probe{'s' if s.probes != 1 else ''} x {n_steps} Lanczos steps, "
             f"sigma = {s.sigma:g} x width = {sigma_abs:.3g}\n{loss}, BN eval, {found['dimension']:,} parameters")
    stats = {"lambda_min": found["lambda_min"], "lambda_max": found["lambda_max"],
             "negative mass": found["negative_mass"], "trace": found["trace"]}
    return Outcome(scalars=scalars, arrays=arrays, info=info,
                   figures={"": lambda path: plots.plot_density(grid, density, path, title, nodes=found["nodes"],
                                                                stats=stats)})


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
    passes = 1 + (s.ascent_steps if s.ascent_steps > 1 else 0) + (s.adaptive_rho is not None)
    work = context.work("sharpness", passes, "gradient passes", f"on {len(data)} samples")
    one = curvature.sam_sharpness(probe, probe.params, data, objective, rho=s.rho, steps=1)
    work.update()
    scalars = {"sam": one["sharpness"], "loss": one["loss"]}
    if s.ascent_steps > 1:
        scalars["ascent"] = curvature.sam_sharpness(probe, probe.params, data, objective, rho=s.rho,
                                                    steps=s.ascent_steps)["sharpness"]
        work.update(s.ascent_steps)
    if s.adaptive_rho is not None:
        scalars["asam"] = curvature.sam_sharpness(probe, probe.params, data, objective, rho=s.adaptive_rho,
                                                  steps=1, adaptive=True, eta=s.eta)["sharpness"]
        work.update()
    return Outcome(scalars=scalars, info={"samples": len(data)})
