"""When analyses run: on the training loop's step clock, at the end of training, and post hoc.

- During training (`AnalysisCallback`): scalar analyses (hessian, sharpness) every `analysis.every_steps` /
  `every_epochs`; their numbers join that step's record in metrics.jsonl and the dashboard. PCA saves a parameter
  snapshot at its own cadence. Nothing is written or modified but the record and the snapshots.
- At the end (`analyze`, called by runner/run.py after the final checkpoint is written, so a failing analysis
  never costs the training): every chosen analysis runs once more on the final weights and writes
  `analysis/<name>.{json,npz,png}`; the scalars go into one more record at the final step.
- Post hoc (`python -m runner.analyze`, and a rerun of a finished run with analyses added): the same `analyze`
  on an experiment rebuilt by `load_run`; analyses already done with the same settings at that checkpoint step (and,
  for `interpolate`, with the second run's checkpoint as it is now) are skipped.
An analysis that raises is reported (its error in the returned dict and in the log), never a training failure.
"""
from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from runner.analysis import Context, Plan, is_done, run_analysis
from runner.train import Cadence, Callback, Progress

log = logging.getLogger(__name__)


class AnalysisCallback(Callback):
    """One analysis on the step clock during training (the end-of-training run is `analyze`'s)."""

    def __init__(self, choice, plan: Plan, out_dir: Path | None, total_steps: int, cache: dict):
        self.choice, self.plan, self.out_dir, self.total, self.cache = choice, plan, out_dir, total_steps, cache
        caps = choice.entry.capabilities
        self.snapshots = bool(caps.get("collects_trajectory"))
        if self.snapshots:
            self.cadence = Cadence(every_steps=choice.params.snapshot_every_steps,
                                   every_epochs=choice.params.snapshot_every_epochs, at_end=True)
        elif caps.get("periodic"):
            self.cadence = Cadence(every_steps=plan.every_steps, every_epochs=plan.every_epochs, at_end=False)
        else:
            self.cadence = Cadence(at_end=False)  # end-of-training only: run by `analyze`

    def __call__(self, experiment, progress: Progress) -> dict:
        context = Context(experiment, progress, self.plan, self.out_dir, sets_cache=self.cache)
        if self.snapshots:
            from runner.analysis.methods import save_trajectory_point

            save_trajectory_point(context)
            return {}
        if progress.step >= self.total and self.plan.at_end:
            return {}  # the end-of-training run (after the final checkpoint) computes it
        try:
            return run_analysis(self.choice, context, write=False)
        except Exception as e:  # a diagnostic never stops training
            log.warning("analysis %s failed at step %d: %s", self.choice.name, progress.step, _one_line(e))
            return {}


def callbacks(experiment, out_dir: Path | None) -> list[Callback]:
    """The training-time callbacks of the experiment's analysis plan (none without one)."""
    plan = experiment.spec.analysis
    if plan is None:
        return []
    total = experiment.spec.trainer.total_steps(len(experiment.task.train))
    cache: dict = {}
    warn_end_only(plan)
    return [AnalysisCallback(choice, plan, out_dir, total, cache) for choice in plan.choices]


def warn_end_only(plan: Plan) -> str:
    """With `analysis.every_steps` / `every_epochs` set: one warning line naming the chosen analyses that the cadence
    does not reach (their registry entry is not `periodic`: landscapes, interpolation run only at the end of
    training and post hoc; PCA snapshots follow their own `snapshot_every_*`). Returns the line ("" if none)."""
    cadence = " and ".join(f"analysis.{key}={getattr(plan, key)}" for key in ("every_steps", "every_epochs")
                           if getattr(plan, key))
    if not cadence:
        return ""
    end_only = [c.name for c in plan.choices if not c.entry.capabilities.get("periodic")]
    if not end_only:
        return ""
    periodic = [c.name for c in plan.choices if c.entry.capabilities.get("periodic")]
    line = (f"{cadence} applies to {', '.join(periodic)} only; " if periodic else f"{cadence} has no effect: ") + (
        f"{', '.join(end_only)} run{'s' if len(end_only) == 1 else ''} only at the end of training (and post hoc)"
        + (" (pca saves snapshots every analysis.pca.snapshot_every_*)" if "pca" in end_only else ""))
    log.warning(line)
    return line


def analyze(experiment, progress: Progress, plan: Plan, out_dir: Path, checkpoint_name: str = "end of training",
            skip_done: bool = False, show_progress: bool | None = None, logger=None,
            post_hoc: bool = False) -> tuple[dict, dict]:
    """Run every analysis of `plan` at the experiment's current point and write its files into `out_dir`.
    Returns (metrics `<name>/<key>`, errors name -> one line). `skip_done`: leave analyses whose record with the
    same settings at this step, and the same second run (`same_other`), exists (their numbers come from the record)."""
    from runner.rundir import read_json

    show = sys.stderr.isatty() if show_progress is None else show_progress
    context = Context(experiment, progress, plan, out_dir, show_progress=show)
    context.checkpoint_name = checkpoint_name
    metrics, errors = {}, {}
    for choice in plan.choices:
        if skip_done and is_done(out_dir, choice, plan, progress.step) and same_other(out_dir, choice, plan):
            log.info("analysis %s: already done at step %d with these settings; skipped", choice.name, progress.step)
            metrics.update((read_json(out_dir / f"{choice.name}.json") or {}).get("scalars", {}))
            continue
        try:
            found = run_analysis(choice, context, write=True)
        except Exception as e:
            errors[choice.name] = _one_line(e)
            log.error("analysis %s failed: %s", choice.name, errors[choice.name])
            with open(out_dir.parent / "runner.log", "a") as f:
                f.write("".join(traceback.format_exception(e)))
            continue
        metrics.update(found)
        if logger is not None:
            logger.log_analysis(choice.name, found, sorted(out_dir.glob(f"{choice.name}*.png")),
                                None if post_hoc else progress.step)
    return metrics, errors


def same_other(out_dir: Path, choice, plan: Plan) -> bool:
    """For an analysis of two runs (`interpolate`): the record was made with the second run as it is now, the same
    signature, seed and step of its checkpoint (`analysis.other` may have trained on, or its checkpoint been
    replaced, since). True for analyses of one run; False when the record or the checkpoint does not say."""
    from runner.rundir import read_json

    if not choice.entry.capabilities.get("needs_other"):
        return True
    info = (read_json(out_dir / f"{choice.name}.json") or {}).get("info") or {}
    now = other_identity(plan.other, getattr(choice.params, "other_checkpoint", "last"))
    return now is not None and now == (info.get("other_signature"), info.get("other_seed"), info.get("other_step"))


def other_identity(other: str, which: str) -> tuple | None:
    """(signature, seed, step) of the checkpoint `load_run(other, which)` would load, or None when unreadable."""
    from runner.experiment import read_checkpoint
    from runner.rundir import RunDir
    from runner.signature import signature

    path = Path(other)
    if path.is_dir():
        record = RunDir(path, create=False)
        path = {"last": record.checkpoint_path, "best": record.best_checkpoint_path}.get(which, path / which)
    try:
        state = read_checkpoint(path)
    except (ValueError, OSError):
        return None
    config = state.get("config")  # what the analysis's Experiment.signature hashes
    sig = signature(config) if isinstance(config, dict) else state.get("signature")
    return sig, state.get("seed"), (state.get("progress") or {}).get("step")


def _one_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
