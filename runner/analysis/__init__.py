"""Analyses: loss landscapes, Hessian spectra and sharpness of a run, during training and post hoc.

The `analysis` config group chooses them; options combine as a list and share a cadence:

    python -m runner analysis=landscape_2d                                   # at the end of training
    python -m runner analysis=[hessian,sharpness] analysis.every_steps=500   # also every 500 steps, as metrics
    python -m runner.analyze <run_dir> analysis=landscape_1d                 # post hoc, from the checkpoint

Each option is one YAML `conf/analysis/<name>.yaml` holding its settings under its own name (so a list merges
into one node) plus the shared keys: `every_steps`, `every_epochs`, `at_end` (when during training), `other`
(the second run of `interpolate`) and `checkpoint` (post hoc: last, best or a path). The `analysis` node is not
part of the run's identity (conf/config.yaml excludes it from the signature): adding an analysis to a finished
run analyses its checkpoint and never retrains it.

An analysis is a function `(context, **settings) -> Outcome` registered in `ANALYSES`. Its scalars are logged
as `<name>/<key>` (into metrics.jsonl and the dashboard during training, so curvature over training is a curve
and a report column); at the end of training and post hoc its settings and numbers go to
`analysis/<name>.json`, its arrays to `analysis/<name>.npz` and its figures to `analysis/<name>*.png`. The json
is written last and names the checkpoint step, so an existing json with the same settings means "done".
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from runner.config import Choice, ConfigError, Registry, check

ANALYSES = Registry("analysis")

#: Keys of the `analysis` node shared by every option (the rest are the options, one sub-node each).
SHARED_KEYS = ("every_steps", "every_epochs", "at_end", "other", "checkpoint")


@dataclass(frozen=True)
class Plan:
    """The validated `analysis` node: the chosen analyses and when they run."""
    choices: tuple[Choice, ...]
    every_steps: Optional[int] = None
    every_epochs: Optional[int] = None
    at_end: bool = True
    other: Optional[str] = None
    checkpoint: str = "last"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.choices]


def validate_plan(node: dict | None) -> Plan | None:
    """Check the `analysis` node (None or empty: no analysis); raises ConfigError naming the key."""
    if not node:
        return None
    if not isinstance(node, dict):
        raise ConfigError("analysis", node, "analysis=<name> or analysis=[<name>,...] (" + ", ".join(ANALYSES.names()) + ")")
    shared = {k: node[k] for k in SHARED_KEYS if k in node and node[k] is not None}
    for key in ("every_steps", "every_epochs"):
        value = shared.get(key)
        check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
              f"analysis.{key}", value, "null or an integer >= 1")
    check(isinstance(shared.get("at_end", True), bool), "analysis.at_end", shared.get("at_end"), "true or false")
    choices = []
    for name, sub in node.items():
        if name in SHARED_KEYS:
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f"analysis.{name}", sub, "analysis options " + ", ".join(ANALYSES.names()))
        if sub.get("name", name) != name:
            raise ConfigError(f"analysis.{name}.name", sub.get("name"), name)
        choices.append(ANALYSES.validate({"name": name, **sub}, prefix=f"analysis.{name}"))
    if not choices:
        return None
    plan = Plan(tuple(choices), **{k: v for k, v in shared.items()})
    for choice in choices:
        needs = choice.entry.capabilities.get("needs_other")
        if needs and not plan.other:
            raise ConfigError("analysis.other", message=(
                f"analysis={choice.name} needs the second run: analysis.other=<run_dir or .pt file>"))
    return plan


# ------------------------------------------------------------------------------------------------- context

@dataclass
class Outcome:
    """What an analysis produced: scalars (logged as `<name>/<key>`), arrays (.npz), figure makers, settings."""
    scalars: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, Callable[[Path], Any]] = field(default_factory=dict)  # suffix -> plot(path)
    info: dict = field(default_factory=dict)  # extra numbers/settings for the json (e.g. the BN mode used)


class Context:
    """What an analysis sees: the experiment at its current point (never modified), the progress, and helpers
    for the fixed evaluation subsets, the Probe and the run's saved trajectory."""

    def __init__(self, experiment, progress, plan: Plan, out_dir: Path | None, show_progress: bool = False,
                 sets_cache: dict | None = None):
        from runner.analysis.probe import Probe

        self.experiment, self.progress, self.plan, self.out_dir = experiment, progress, plan, out_dir
        self.show_progress = show_progress  # True: bars; False: a start line and heartbeats (runner/heartbeat.py)
        self._works: list = []
        self.probe = Probe(experiment.model, experiment.autocast())
        self.exact_probe = Probe(experiment.model)  # no autocast: curvature in fp32
        self._sets: dict = {} if sets_cache is None else sets_cache  # shared across calls during training

    @property
    def device(self):
        return self.experiment.device

    @property
    def lr(self) -> float:
        return float(self.experiment.optimizer.param_groups[0]["lr"])

    def sets(self, samples: int | None, seed: int, batch_size: int, splits: tuple[str, ...] | None = None) -> dict:
        """The fixed evaluation subsets (cached per settings; resident on the device)."""
        from runner.analysis.probe import evaluation_sets

        key = (samples, seed, batch_size, splits)
        if key not in self._sets:
            self._sets[key] = evaluation_sets(self.experiment.task, samples, seed, batch_size, splits)
        return self._sets[key]

    def work(self, what: str, total: int, unit: str, detail: str = ""):
        """A `runner.heartbeat.Work` for the analysis's loop (a bar, or a start line and heartbeats), closed when
        the analysis returns or raises."""
        from runner.heartbeat import Work

        self._works.append(Work(what, total, unit=unit, detail=detail, show=self.show_progress))
        return self._works[-1]

    def close_work(self) -> None:
        while self._works:
            self._works.pop().close()

    def trajectory_dir(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "trajectory"


def outcome_line(run_dir: Path, step: int | None, metrics: dict) -> str:
    """The line that reports a run's analyses (`python -m runner.analyze`, and `python -m runner analysis=...`, on a
    finished run too): `<run_dir>: step N: <name>/<key>=<value> ... -> <run_dir>/analysis`, keys sorted."""
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, float))
    return f"{run_dir}: step {step}: {shown or 'done'} -> {Path(run_dir) / 'analysis'}"


def settings_of(choice: Choice, plan: Plan) -> dict:
    """What the analysis record names as its settings (compared by `is_done`): the option's parameters, and the
    second run for analyses that need one."""
    settings = {"name": choice.name, **dataclasses.asdict(choice.params)}
    if choice.entry.capabilities.get("needs_other"):
        settings["other"] = str(Path(plan.other).resolve()) if plan.other else None
    return settings


def run_analysis(choice: Choice, context: Context, write: bool) -> dict[str, float]:
    """Run one analysis; returns its scalars as `<name>/<key>` metrics. `write`: also its files in out_dir."""
    start = time.perf_counter()
    try:
        outcome: Outcome = choice.build(context)
    finally:
        context.close_work()
    elapsed = time.perf_counter() - start
    metrics = {f"{choice.name}/{k}": float(v) for k, v in outcome.scalars.items()}
    if write and context.out_dir is not None:
        write_outcome(choice, context, outcome, metrics, elapsed)
    return metrics


def write_outcome(choice: Choice, context: Context, outcome: Outcome, metrics: dict, elapsed: float) -> list[Path]:
    """Arrays, then figures, then the json (last: its presence marks the analysis done)."""
    from runner.rundir import atomic_write_bytes

    out, name = context.out_dir, choice.name
    out.mkdir(parents=True, exist_ok=True)
    if outcome.arrays:
        atomic_write_bytes(out / f"{name}.npz", lambda tmp: _save_npz(tmp, outcome.arrays))
    figures = []
    for suffix, plot in outcome.figures.items():
        path = out / f"{name}{suffix}.png"
        atomic_write_bytes(path, lambda tmp: plot(Path(tmp)))
        figures.append(path)
    record = {"name": name, "settings": settings_of(choice, context.plan), "step": context.progress.step,
              "epoch": context.progress.epoch, "checkpoint": getattr(context, "checkpoint_name", "end of training"),
              "scalars": metrics, "info": outcome.info, "seconds": round(elapsed, 3),
              "arrays": sorted(outcome.arrays), "figures": [p.name for p in figures],
              "signature": context.experiment.signature, "seed": context.experiment.spec.seed}
    text = json.dumps(_json_safe(record), indent=2, sort_keys=True)
    atomic_write_bytes(out / f"{name}.json", lambda tmp: Path(tmp).write_text(text))
    return figures


def _save_npz(tmp, arrays: dict) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temp name
        np.savez(f, **arrays)


def _json_safe(value):
    from runner.rundir import _json_safe as safe

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return safe(value)


def is_done(out_dir: Path, choice: Choice, plan: Plan, step: int) -> bool:
    """An analysis with the same settings already done at this checkpoint step (post hoc reruns skip it)."""
    from runner.rundir import read_json

    record = read_json(out_dir / f"{choice.name}.json")
    return bool(record) and record.get("settings") == _json_safe(settings_of(choice, plan)) and record.get("step") == step


from runner.analysis import methods  # noqa: E402,F401  (registers the analyses)
