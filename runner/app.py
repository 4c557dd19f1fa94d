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
    from runner.run import ForeignRunDir, RunBusy, failed_summary, run  # after Hydra parsed the command line

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
        if summary.get("skipped"):
            print(f"already {summary['status']}: {run_dir}", file=sys.stderr)
        return summary["status"]

    sweep_dir = hydra_cfg.sweep.dir
    try:
        summary = run(cfg, run_dir)
        status = "skipped" if summary.get("skipped") else summary["status"]
        log.info("%s: %s", status, run_dir)
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
    except Exception as e:  # recorded in summary.json by run(); the sweep goes on
        status = "failed"
        log.exception("failed: %s: %s", run_dir, e)
    record_job(sweep_dir, run_dir, status)
    return status


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


def sweep_exit_code() -> int:
    """After a sweep: one line of counts, and 1 if any job failed."""
    outcome = tally()
    if outcome is None:
        return 0
    counts, failed = outcome
    line = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"sweep: {line}" + (f"; failed: {' '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0

