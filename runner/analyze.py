"""Post-hoc analyses of saved runs: `python -m runner.analyze <run_dir|glob> [...] analysis=<name> [analysis.x=y]`.

    python -m runner.analyze outputs/2026-11-27/12-00-00-123 analysis=landscape_1d
    python -m runner.analyze <run_dir> analysis=interpolate analysis.other=<run_dir_b>
    python -m runner.analyze 'multirun/sam_cifar/**/seed=*' analysis=[hessian,sharpness] --device cuda

Each run is rebuilt from its checkpoint (`analysis.checkpoint`: last, best or a path; the config comes from the
checkpoint itself) and analysed at that point; the files go to `<run_dir>/analysis/`. A run whose analysis with
the same settings at the same checkpoint step exists is skipped, as sweeps skip finished runs (`--force` redoes
it). Everything is checked before the first analysis starts (the runs and their checkpoints, the analysis
names and settings, the second run of `interpolate`): bad input is one line and exit 2; an analysis that fails
is one line per run and exit 1 at the end.
"""
from __future__ import annotations

import argparse
import glob
import logging
import re
import sys
from pathlib import Path

from runner.cli import fail

log = logging.getLogger("runner.analyze")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runner.analyze", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="+", help="run directories, .pt checkpoints or quoted globs, then "
                                                   "analysis=<name> and analysis.<key>=<value> overrides")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the run's trainer.device "
                                                        "when available, else the CPU)")
    parser.add_argument("--force", action="store_true", help="redo analyses already done with the same settings")
    args = parser.parse_args(argv)
    args.overrides = [t for t in args.targets if is_override(t)]
    args.targets = [t for t in args.targets if not is_override(t)]
    if not args.targets:
        parser.error("name at least one run directory (or a glob)")
    return args


OVERRIDE = re.compile(r"[+~]{0,2}[A-Za-z_][A-Za-z0-9_.]*=.*", re.DOTALL)


def is_override(argument: str) -> bool:
    """`analysis.x=1` is an override; `multirun/x/<sig>/seed=0` (a sweep's run folder: its name holds `=`), an
    existing path or a glob that matches something are targets. Keys are dotted names, paths have a `/`."""
    if Path(argument).exists() or (any(ch in argument for ch in "*?[") and glob.glob(argument, recursive=True)):
        return False
    return OVERRIDE.fullmatch(argument) is not None


def compose_plan(overrides: list[str]):
    """The `analysis` node from the config tree plus the overrides, validated into a Plan (ConfigError)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from runner.analysis import ANALYSES, validate_plan
    from runner.cli import CONF_DIR
    from runner.config import ConfigError

    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key != "analysis" and not key.startswith("analysis."):
            raise ConfigError(key, message=f"{override}: only analysis=... and analysis.<key>=... apply here (a run's "
                                           "own config comes from its checkpoint)")
    if not any(o.split("=", 1)[0].lstrip("+") == "analysis" for o in overrides):
        raise ConfigError("analysis", message="choose an analysis: analysis=<name> or analysis=[<name>,...] ("
                                              + ", ".join(ANALYSES.names()) + ")")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=overrides)
        node = OmegaConf.to_container(cfg.analysis, resolve=True)
    except HydraException as e:
        text = str(e).splitlines()[0]
        if "analysis" in text and ("Could not find" in text or "not found" in text):
            text = f"unknown analysis in {' '.join(overrides)}; available: {', '.join(ANALYSES.names())}"
        raise ConfigError("analysis", message=text) from None
    except Exception as e:  # an interpolation or a missing value
        raise ConfigError("analysis", message=f"invalid analysis config: {str(e).splitlines()[0]}") from None
    plan = validate_plan(node)
    if plan is None:
        raise ConfigError("analysis", message="no analysis chosen: analysis=<name> (" + ", ".join(ANALYSES.names()) + ")")
    return plan


def expand(targets: list[str]) -> list[Path]:
    """Run directories (or .pt files) named by the targets; a glob (recursive `**`) that matches none is an error,
    as is a path that does not exist. Matches that are not run directories are left out."""
    from runner.config import ConfigError
    from runner.rundir import is_run_dir

    runs: list[Path] = []
    for target in targets:
        if any(ch in target for ch in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(target, recursive=True))]
            found = [p for p in matches if p.is_dir() and is_run_dir(p)]
            if not found:
                raise ConfigError("targets", message=f"{target} matches no run directory")
            runs.extend(found)
        else:
            path = Path(target)
            if not path.exists():
                raise ConfigError("targets", message=f"{target}: no such run directory or checkpoint")
            if path.is_file() and not is_run_dir(path.parent.parent):
                raise ConfigError("targets", message=f"{target} is not in a run directory's checkpoints/ (the "
                                                     "analysis is written into the run directory): give that")
            runs.append(path)
    unique, seen = [], set()
    for run in runs:
        if run.resolve() not in seen:
            seen.add(run.resolve())
            unique.append(run)
    return unique


def checkpoint_of(run: Path, which: str) -> Path:
    """The checkpoint file a run is analysed at; ConfigError when there is none."""
    from runner.config import ConfigError
    from runner.rundir import RunDir

    if run.is_file():
        return run
    record = RunDir(run, create=False)
    path = {"last": record.checkpoint_path, "best": record.best_checkpoint_path}.get(which, Path(which))
    if not path.is_file():
        hint = " (train with trainer.save_best=true)" if which == "best" else ""
        raise ConfigError("analysis.checkpoint", message=f"{run}: no checkpoint {path}{hint}: nothing to analyse")
    return path


def check_inputs(plan, runs: list[Path]) -> dict[Path, dict]:
    """Before any work: every run has a readable checkpoint; `interpolate`'s second run matches each run's model."""
    from runner.config import ConfigError
    from runner.experiment import read_checkpoint

    states = {}
    for run in runs:
        path = checkpoint_of(run, plan.checkpoint)
        try:
            states[run] = read_checkpoint(path)
        except ValueError as e:
            raise ConfigError("analysis.checkpoint", message=f"{run}: {e}") from None
    from runner.analysis.methods import TRAJECTORY_MIN

    for choice in plan.choices:
        if choice.entry.capabilities.get("collects_trajectory"):
            for run in runs:
                run_dir = run.parent.parent if run.is_file() else run
                found = len(list((run_dir / "analysis" / "trajectory").glob("step=*.pt")))
                if found < TRAJECTORY_MIN:
                    raise ConfigError("analysis", message=(
                        f"{run}: analysis={choice.name} needs at least {TRAJECTORY_MIN} parameter snapshots saved "
                        f"along training (analysis/trajectory/), it has {found}: train the run with analysis=pca"))
    needs_other = [c for c in plan.choices if c.entry.capabilities.get("needs_other")]
    if needs_other:
        other = Path(plan.other)
        if not other.exists():
            raise ConfigError("analysis.other", message=f"analysis.other={plan.other}: no such run or checkpoint")
        which = needs_other[0].params.other_checkpoint
        try:
            other_state = read_checkpoint(checkpoint_of(other, which))
        except ValueError as e:
            raise ConfigError("analysis.other", message=f"analysis.other={plan.other}: {e}") from None
        other_model = (other_state.get("config") or {}).get("model")
        for run, state in states.items():
            model = (state.get("config") or {}).get("model")
            if other_model is not None and model is not None and other_model != model:
                raise ConfigError("analysis.other", message=(
                    f"analysis.other={plan.other} holds another model than {run}: {other_model} vs {model}; "
                    "interpolation needs the same architecture"))
    return states


def analyze_runs(plan, runs: list[Path], device: str | None, force: bool) -> int:
    from runner.analysis import outcome_line
    from runner.experiment import load_run
    from runner.run import analyze_with_dashboard

    from runner.rundir import RunDir
    from runner.sweep import RunLock

    failures = 0
    for run in runs:
        run_dir = run.parent.parent if run.is_file() else run
        lock = RunLock(run_dir)  # not beside a process that trains (or analyses) this run
        if not lock.acquire():
            failures += 1
            print(f"{run_dir}: busy (another process trains or analyses it); skipped", file=sys.stderr)
            continue
        try:
            RunDir(run_dir, create=False).remove_stale_temporaries()  # of a killed analysis
            experiment, progress = load_run(run, plan.checkpoint, device=device)
            checkpoint = str(checkpoint_of(run, plan.checkpoint))
            done = analyze_with_dashboard(experiment, progress, plan, RunDir(run_dir, create=False), checkpoint,
                                          skip_done=not force)
            metrics, errors = done["analysis"], done["analysis_errors"]
        finally:
            lock.release()
        print(outcome_line(run_dir, progress.step, metrics), file=sys.stderr)
        for name, error in errors.items():
            failures += 1
            print(f"{run_dir}: analysis {name} failed: {error} (traceback in {run_dir / 'runner.log'})",
                  file=sys.stderr)
    return failures


def main(argv: list[str] | None = None) -> int:
    from runner.config import ConfigError

    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        plan = compose_plan(args.overrides)
        runs = expand(args.targets)
        check_inputs(plan, runs)
        if args.device is not None:
            from runner.experiment import resolve_device
            resolve_device(args.device)
    except ConfigError as e:
        fail(str(e))
    from runner.signals import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM like Ctrl-C: one line, exit 143; finished analyses stay, none half-written
        failures = analyze_runs(plan, runs, args.device, args.force)
    return 1 if failures else 0


if __name__ == "__main__":
    from runner.signals import exit_code, ignore, install, signal_name

    install()  # Ctrl-C works even when the shell started us with SIGINT ignored (`nohup ... &`)
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        ignore()
        print(f"interrupted ({signal_name(e)}): analyses finished before it are kept; the same command does the rest",
              file=sys.stderr)
        sys.exit(exit_code(e))
