"""Post-hoc analyses of saved runs: `python -m runner.analyze <run_dir|glob> [...] analysis=<name> [analysis.x=y]`.

    python -m runner.analyze outputs/2026-11-27/12-00-00-123 analysis=landscape_1d
    python -m runner.analyze <run_dir> analysis=interpolate analysis.other=<run_dir_b>
    python -m runner.analyze 'multirun/sam_cifar/**/seed=*' analysis=[hessian,sharpness] --device cuda

Each run is rebuilt from its checkpoint (`analysis.checkpoint`: last, best or a path, relative to the run directory,
of that run: another run's checkpoint is refused; the config comes from the checkpoint itself) and analysed at that
point; the files go to `<run_dir>/analysis/`. A run whose analysis with the same settings at the same checkpoint
step exists is skipped, as sweeps skip finished runs (`--force` redoes it). Everything is checked before the first
analysis starts (the device, the runs, that their folders can be written and their checkpoints read, the analysis
names and settings, the second run of `interpolate`): bad input is one line and exit 2. A run that cannot be rebuilt
(its checkpoint's config invalid now, or not its weights' config) or whose analysis fails is one line naming it; the
others go on (with several runs a last line tallies them), and the command exits 1. Ctrl-C or SIGTERM: one line with
the tally so far, exit 130 / 143.
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
    """The checkpoint file a run is analysed at (`which`: last, best, or a path; a relative path is taken from the
    run directory, not from the current one); ConfigError when there is none."""
    from runner.config import ConfigError
    from runner.rundir import RunDir

    if run.is_file():
        return run
    record = RunDir(run, create=False)
    path = {"last": record.checkpoint_path, "best": record.best_checkpoint_path}.get(which, run / Path(which))
    if not path.is_file():
        hint = " (train with trainer.save_best=true)" if which == "best" else ""
        raise ConfigError("analysis.checkpoint", message=f"{run}: no checkpoint {path}{hint}: nothing to analyse")
    return path


def check_inputs(plan, runs: list[Path]) -> dict[Path, dict]:
    """Before any work: every run can be written into and has a readable checkpoint; `interpolate`'s second run
    matches each run's model."""
    from runner.config import ConfigError
    from runner.experiment import read_checkpoint
    from runner.rundir import unwritable

    states = {}
    for run in runs:
        run_dir = run.parent.parent if run.is_file() else run
        problem = unwritable(run_dir)  # the lock, analysis/ and runner.log are written there
        if problem:
            raise ConfigError("targets", message=f"{run}: cannot write its analysis into {run_dir}: {problem}")
        path = checkpoint_of(run, plan.checkpoint)
        try:
            states[run] = read_checkpoint(path)
        except ValueError as e:
            raise ConfigError("analysis.checkpoint", message=f"{run}: {e}") from None
        check_belongs(run, path, states[run])
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


def check_belongs(run: Path, path: Path, state: dict) -> None:
    """The checkpoint is of the run its numbers are filed under (signature and seed, as the run's summary, else
    its checkpoints, else its .hydra/config.yaml name them): another run's checkpoint is refused (ConfigError)."""
    from runner.config import ConfigError
    from runner.run import owners
    from runner.rundir import RunDir
    from runner.signature import signature

    run_dir = run.parent.parent if run.is_file() else run
    sig = state.get("signature")
    if sig is None and isinstance(state.get("config"), dict):
        sig = signature(state["config"])
    for other_sig, other_seed, where in owners(RunDir(run_dir, create=False), read_checkpoints=True):
        if (None not in (sig, other_sig) and sig != other_sig) or (
                None not in (state.get("seed"), other_seed) and state.get("seed") != other_seed):
            raise ConfigError("analysis.checkpoint", message=(
                f"{path} is another run's checkpoint (signature {sig}, seed {state.get('seed')}) than {run_dir} "
                f"({where}: signature {other_sig}, seed {other_seed}): its numbers would be filed under the wrong "
                "run; analyse that run's folder instead (a relative analysis.checkpoint is taken from the run "
                "directory)"))


#: The runs this command has been through (run directory -> analysed, failed or busy), for the tally and the line
#: an interruption prints; None before the first analysis starts.
finished: dict[Path, str] | None = None


def analyze_runs(plan, runs: list[Path], device: str | None, force: bool) -> int:
    """Analyse the runs one after another. A run that cannot be analysed (busy, its checkpoint's config invalid or
    not matching its weights, an analysis that fails) is one line naming it, and the others go on; with several
    runs a last line tallies them. Returns the number of runs not analysed in full."""
    global finished
    finished = {}
    for run in runs:
        run_dir = run.parent.parent if run.is_file() else run
        finished[run_dir] = analyze_one(plan, run, run_dir, device, force)
    if len(runs) > 1:
        print(f"analyze: {tally()}", file=sys.stderr)
    return sum(status != "analysed" for status in finished.values())


def tally() -> str:
    """`2 analysed, 1 failed; not analysed: <run_dir> ...` over the runs done so far."""
    counts: dict[str, int] = {}
    for status in (finished or {}).values():
        counts[status] = counts.get(status, 0) + 1
    missed = [str(run_dir) for run_dir, status in (finished or {}).items() if status != "analysed"]
    line = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return line + (f"; not analysed: {' '.join(missed)}" if missed else "")


def analyze_one(plan, run: Path, run_dir: Path, device: str | None, force: bool) -> str:
    """One run's analyses and its lines on stderr; returns analysed, failed or busy."""
    from runner.analysis import outcome_line
    from runner.experiment import load_run
    from runner.run import analyze_with_dashboard
    from runner.rundir import RunDir
    from runner.sweep import RunLock

    lock = RunLock(run_dir)  # not beside a process that trains (or analyses) this run
    try:
        if not lock.acquire():
            print(f"{run_dir}: busy (another process trains or analyses it); skipped", file=sys.stderr)
            return "busy"
    except OSError as e:
        print(f"{run_dir}: cannot write into it ({one_line(e)}); skipped", file=sys.stderr)
        return "failed"
    try:
        checkpoint = plan.checkpoint
        try:
            checkpoint = str(checkpoint_of(run, plan.checkpoint))  # the file load_run reads (relative: from the run)
            RunDir(run_dir, create=False).remove_stale_temporaries()  # of a killed analysis
            experiment, progress = load_run(run, plan.checkpoint, device=device)
        except ValueError as e:  # the checkpoint's config is invalid (ConfigError), or not its weights' config
            print(f"{run_dir}: cannot rebuild the run from {checkpoint}: {one_line(e, kind=False)}; skipped",
                  file=sys.stderr)
            return "failed"
        except Exception as e:
            print(f"{run_dir}: cannot rebuild the run from {checkpoint}: {one_line(e)}{traceback_to(run_dir, e)}; "
                  "skipped", file=sys.stderr)
            return "failed"
        try:
            done = analyze_with_dashboard(experiment, progress, plan, RunDir(run_dir, create=False), checkpoint,
                                          skip_done=not force)
        except Exception as e:
            print(f"{run_dir}: analysis failed: {one_line(e)}{traceback_to(run_dir, e)}", file=sys.stderr)
            return "failed"
    finally:
        lock.release()
    metrics, errors = done["analysis"], done["analysis_errors"]
    if metrics or not errors:  # not `done` when nothing was
        print(outcome_line(run_dir, progress.step, metrics), file=sys.stderr)
    for name, error in errors.items():
        print(f"{run_dir}: analysis {name} failed: {error} (traceback in {run_dir / 'runner.log'})", file=sys.stderr)
    return "failed" if errors else "analysed"


def one_line(error: BaseException, kind: bool = True) -> str:
    """The error's first line, after its type's name (`kind`)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if kind else lines[0]


def traceback_to(run_dir: Path, error: BaseException) -> str:
    """Append the traceback to the run's runner.log; returns the words that point there ("" if it cannot)."""
    import traceback

    try:
        with open(run_dir / "runner.log", "a") as f:
            f.write("".join(traceback.format_exception(error)))
    except OSError:
        return ""
    return f" (traceback in {run_dir / 'runner.log'})"


def interrupted(error: BaseException) -> tuple[str, int]:
    """The line and exit code for Ctrl-C or SIGTERM: what was analysed before it (kept: every file is written
    atomically) and that the same command does the rest."""
    from runner.signals import exit_code, signal_name

    head = f"interrupted ({signal_name(error)})"
    if finished is None:
        return f"{head} before any analysis started: nothing was written", exit_code(error)
    done = f"runs so far: {tally()}" if finished else "in the first run"
    return f"{head}: {done}; the analyses finished are kept, the same command does the rest", exit_code(error)


def main(argv: list[str] | None = None) -> int:
    from runner.config import ConfigError

    global finished
    finished = None
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.device is not None:
            from runner.experiment import resolve_device
            resolve_device(args.device, option="--device")
        plan = compose_plan(args.overrides)
        runs = expand(args.targets)
        check_inputs(plan, runs)
    except ConfigError as e:
        fail(str(e))
    from runner.signals import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM like Ctrl-C: one line, exit 143; finished analyses stay, none half-written
        failures = analyze_runs(plan, runs, args.device, args.force)
    return 1 if failures else 0


if __name__ == "__main__":
    from runner.signals import exit_now, ignore, install

    install()  # Ctrl-C works even when the shell started us with SIGINT ignored (`nohup ... &`)
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt as e:
        ignore()
        line, code = interrupted(e)
        print(line, file=sys.stderr)
    exit_now(code)
