"""The Hydra application around `runner.run.run(cfg, run_dir)`; `python -m runner` starts it.

Single run: bad input is one line and exit 2; a training error is recorded in summary.json and re-raised.
Sweep (`-m`): every job's config is validated before the first job starts; a job never stops the sweep (its
status goes to summary.json and the launch log); the process exits 1 at the end if any job failed.
"""
import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.cli import CONF_DIR, fail
from runner.config import ConfigError
from runner.signals import deferred
from runner.sweep import record_job, register_resolvers, tally

log = logging.getLogger("runner")
JOB_NAME = "runner"  # hydra.job.name in conf/config.yaml: names the run's log file
register_resolvers()


def task(cfg: DictConfig) -> str:
    """One job: a plain module-level function, so launchers in other processes can pickle it."""
    from runner.run import ForeignRunDir, RunBusy, RunFailed, failed_summary, run  # after Hydra parsed argv

    from runner.cluster import export_slurm_ranks

    export_slurm_ranks()  # a SLURM job with several tasks: each task is a rank
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if os.environ.get("RANK", "0") != "0":  # another rank (torchrun, SLURM tasks): rank 0's folder, its records
        from runner.run import join_cluster

        for handler in list(logging.getLogger().handlers):  # rank 0 writes the run's log
            if isinstance(handler, logging.FileHandler):
                logging.getLogger().removeHandler(handler)
        run_dir = Path(join_cluster(cfg).broadcast(None))
        return run(cfg, run_dir)["status"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # rank 0 of one: the others learn the folder from it
        from runner.run import join_cluster

        join_cluster(cfg).broadcast(str(run_dir))
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            summary = run(cfg, run_dir)
        except ConfigError as e:
            if not (run_dir / "metrics.jsonl").exists():  # nothing trained: leave no run dir behind
                remove_failed_start(run_dir)
            fail(str(e))
        except RunBusy as e:
            fail(str(e))
        except RunFailed as e:  # recorded in summary.json (or said why not), the traceback in runner.log
            fail(f"failed: {e} ({e.where})", code=1)
        print(outcome(summary, run_dir), file=sys.stderr)
        if summary.get("analysis_errors"):
            fail(analysis_failure(summary, run_dir), code=1)
        return summary["status"]

    sweep_dir = hydra_cfg.sweep.dir
    try:
        link_readable_name(run_dir, hydra_cfg.job.override_dirname)
        summary = run(cfg, run_dir)
        status = "skipped" if summary.get("skipped") else summary["status"]
        log.info("%s", outcome(summary, run_dir))
        if summary.get("analysis_errors"):
            status = "failed"
            log.error("%s", analysis_failure(summary, run_dir))
    except KeyboardInterrupt:  # the sweep stops here; this job is counted, and a folder it only began is removed
        with deferred():
            record_job(sweep_dir, run_dir, "interrupted" if not remove_failed_start(run_dir) else "not started")
        raise
    except RunBusy as e:
        status = "busy"
        log.warning("%s", e)
    except ForeignRunDir as e:  # another run's folder: its record stays as it is
        status = "failed"
        log.error("failed: %s", e)
    except ConfigError as e:
        status = "failed"
        failed_summary(run_dir, str(e))
        log.error("failed: %s: %s", run_dir, e)
    except RunFailed as e:  # recorded in summary.json by run(); the sweep goes on
        status = "failed"
        log.error("failed: %s: %s (traceback in its runner.log)", run_dir, e)
    with deferred():  # a signal now stops the sweep after this job's status is recorded
        record_job(sweep_dir, run_dir, status)
    return status


def outcome(summary: dict, run_dir: Path) -> str:
    """The line a run ends with: status, the headline metric, where it is; then, when it was analysed, the line
    `python -m runner.analyze` prints (the analyses' numbers)."""
    from runner.analysis import outcome_line

    status = f"already {summary['status']}" if summary.get("skipped") else summary["status"]
    final = summary.get("final") or {}
    shown = [f"{k}={final[k]:.4g}" for k in ("test/acc", "test/loss", "train/loss")
             if isinstance(final.get(k), float)][:2]
    done = sorted({key.split("/")[0] for key in summary.get("analysis") or {}})
    analysed = f" (analysis: {', '.join(done)} in {run_dir / 'analysis'})" if done else ""
    numbers = f"\n{outcome_line(run_dir, summary.get('steps'), summary['analysis'])}" if summary.get("analysis") else ""
    return f"{status}: {' '.join(shown) or 'no metrics'} -> {run_dir}{analysed}{numbers}"


def analysis_failure(summary: dict, run_dir: Path) -> str:
    """The line for analyses that failed on a run whose training is recorded (and kept)."""
    errors = summary["analysis_errors"]
    names = ",".join(errors)
    first = next(iter(errors.values()))
    return (f"analysis failed: {first} (the run itself is {summary['status']}; retry with python -m runner.analyze "
            f"{run_dir} analysis=[{names}]; traceback in runner.log)")


def link_readable_name(run_dir: Path, override_dirname: str) -> None:
    """Beside a sweep run's config folder (named by its signature), a symlink named by the overrides that
    reached it: `optimizer=sam-<sig> -> <sig>`. Identity comes from the config; the name is for people."""
    from runner.sweep import readable_name

    config_dir = run_dir.parent
    link = config_dir.parent / readable_name(override_dirname, config_dir.name)
    if link.name == config_dir.name or link.exists() or link.is_symlink():
        return
    try:
        link.symlink_to(config_dir.name, target_is_directory=True)
    except OSError:  # another job made it first, or the file system has no symlinks: the name is optional
        pass


def remove_failed_start(run_dir: Path) -> bool:
    """Delete the folder of a run that failed (or was interrupted) before training, but only when it holds nothing
    except what this start put there (Hydra's .hydra/ and log, the run lock): `hydra.run.dir` may name a folder with
    the user's files in it (even `.`), and those must survive a typo on the command line. True if removed."""
    ours = {".hydra", f"{JOB_NAME}.log", ".lock"}
    if run_dir.is_dir() and all(p.name in ours for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        outputs = Path.cwd() / "outputs"  # the default layout outputs/<date>/<time>: drop what is left empty
        for parent in (run_dir.parent, run_dir.parent.parent):
            if parent.resolve().is_relative_to(outputs.resolve()):
                try:
                    parent.rmdir()
                except OSError:
                    break
        return True
    return False


main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task)


def interrupted(error: BaseException, argv: list[str]) -> tuple[str, int]:
    """The one line and exit code for Ctrl-C or SIGTERM, true to what was left on disk whenever it arrived:
    during start-up (nothing recorded; a folder holding only what the start made is removed), during a run (its
    summary.json says `interrupted`), or while a finished or interrupted run was being resumed or analysed (its
    record is as it was). A sweep adds the tally of its jobs."""
    from runner.rundir import RunDir
    from runner.signals import exit_code, signal_name
    from runner.sweep import started_run_dir

    head = f"interrupted ({signal_name(error)})"
    if any(a in ("-m", "--multirun") for a in argv):
        outcome = tally(multirun=True)
        jobs = dict(outcome[0]) if outcome else {}
        if "lost" in jobs:  # jobs that never reported: the signal stopped the sweep before them
            jobs["not run"] = jobs.pop("lost")
        counts = ", ".join(f"{n} {status}" for status, n in sorted(jobs.items()))
        done = f"; jobs so far: {counts}" if counts else "; no job had started"
        return f"{head}: the sweep stopped{done}; the same command skips finished runs and resumes the rest", \
            exit_code(error)
    run_dir = Path(started_run_dir[0]) if started_run_dir else None
    if run_dir is None or not run_dir.is_dir():
        return f"{head} before the run started: nothing was recorded", exit_code(error)
    if remove_failed_start(run_dir):
        return f"{head} before training started: nothing was recorded ({run_dir} removed)", exit_code(error)
    status = (RunDir(run_dir, create=False).read_summary() or {}).get("status")
    if status == "interrupted":
        return f"{head}: the run is recorded as interrupted in {run_dir}; the same command resumes it", \
            exit_code(error)
    if status in ("completed", "diverged"):  # the record was written just before the signal arrived
        return f"{head}: the record in {run_dir} says {status}; the same command does what was left", exit_code(error)
    kept = f"status {status}" if status else "no summary yet; its checkpoints are kept"
    return f"{head}: {run_dir} is as it was ({kept}); the same command resumes it", exit_code(error)


def sweep_exit_code(argv: list[str]) -> int:
    """After a sweep: one line of counts, and 1 if any job failed or never reported."""
    outcome = tally(multirun=any(a in ("-m", "--multirun") for a in argv))
    if outcome is None:
        return 0
    counts, failed = outcome
    line = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"sweep: {line}" + (f"; failed: {' '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0

