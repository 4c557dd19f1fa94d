"""The Hydra application around `runner.run.run(cfg, run_dir)`; `python -m runner` starts it.

Single run: bad input is one line and exit 2; a training error is recorded in summary.json and re-raised.
Sweep (`-m`): every job's config is validated before the first job starts; a job never stops the sweep (its
status goes to summary.json and the launch log); the process exits 1 at the end if any job failed.
"""
import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.cli import CONF_DIR, fail
from runner.config import ConfigError
from runner.sweep import record_job, register_resolvers, tally

log = logging.getLogger("runner")
register_resolvers()


def task(cfg: DictConfig) -> str:
    """One job: a plain module-level function, so launchers in other processes can pickle it."""
    from runner.run import ForeignRunDir, RunBusy, RunFailed, failed_summary, run  # after Hydra parsed argv

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            summary = run(cfg, run_dir)
        except ConfigError as e:
            if not (run_dir / "metrics.jsonl").exists():  # nothing trained: leave no run dir behind
                remove_failed_start(run_dir)
            fail(str(e))
        except RunBusy as e:
            fail(str(e))
        except RunFailed as e:  # recorded in summary.json, the traceback in runner.log
            fail(f"failed: {e} (the record: {run_dir}/summary.json, traceback in runner.log)", code=1)
        print(outcome(summary, run_dir), file=sys.stderr)
        if summary.get("analysis_errors"):
            fail(analysis_failure(summary, run_dir), code=1)
        return summary["status"]

    sweep_dir = hydra_cfg.sweep.dir
    link_readable_name(run_dir, hydra_cfg.job.override_dirname)
    try:
        summary = run(cfg, run_dir)
        status = "skipped" if summary.get("skipped") else summary["status"]
        log.info("%s", outcome(summary, run_dir))
        if summary.get("analysis_errors"):
            status = "failed"
            log.error("%s", analysis_failure(summary, run_dir))
    except KeyboardInterrupt:
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
    record_job(sweep_dir, run_dir, status)
    return status


def outcome(summary: dict, run_dir: Path) -> str:
    """The line a run ends with: status, the headline metric, where it is."""
    status = f"already {summary['status']}" if summary.get("skipped") else summary["status"]
    final = summary.get("final") or {}
    shown = [f"{k}={final[k]:.4g}" for k in ("test/acc", "test/loss", "train/loss")
             if isinstance(final.get(k), float)][:2]
    done = sorted({key.split("/")[0] for key in summary.get("analysis") or {}})
    analysed = f" (analysis: {', '.join(done)} in {run_dir / 'analysis'})" if done else ""
    return f"{status}: {' '.join(shown) or 'no metrics'} -> {run_dir}{analysed}"


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


def remove_failed_start(run_dir: Path) -> None:
    """Delete the folder of a run that failed before training, but only when it holds nothing except what this
    start put there (Hydra's .hydra/ and log, the run lock): `hydra.run.dir` may name a folder with the user's
    files in it (even `.`), and those must survive a typo on the command line."""
    ours = {".hydra", f"{HydraConfig.get().job.name}.log", ".lock"}
    if run_dir.is_dir() and all(p.name in ours for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        outputs = Path.cwd() / "outputs"  # the default layout outputs/<date>/<time>: drop what is left empty
        for parent in (run_dir.parent, run_dir.parent.parent):
            if parent.resolve().is_relative_to(outputs.resolve()):
                try:
                    parent.rmdir()
                except OSError:
                    break


main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task)


def sweep_exit_code(argv: list[str]) -> int:
    """After a sweep: one line of counts, and 1 if any job failed or never reported."""
    outcome = tally(multirun=any(a in ("-m", "--multirun") for a in argv))
    if outcome is None:
        return 0
    counts, failed = outcome
    line = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"sweep: {line}" + (f"; failed: {' '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0

