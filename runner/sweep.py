"""Sweeps on Hydra's multirun: deterministic folders, per-run locks, a launch log, validation up front.

Layout: `multirun/<experiment>/<overrides without seed>-<signature>/seed=N`. The folder of a run is a function
of its config (Dora style: the signature hashes the resolved config minus seed, paths and logging), so the
same command run again finds its runs: completed ones are skipped, interrupted ones resume from their last
checkpoint. Different configurations never share a folder, even when two sweeps start in the same second;
two processes that reach the same run at once are kept apart by a lock file (the second skips it).

Hydra 1.3 skips `on_multirun_end` after a failed job, so failures are handled here instead: in a sweep a job
never raises; it records its status in summary.json and in the launch log, and the entry point exits non-zero
at the end when any job failed.
"""
import fcntl
import json
import os
import re
import uuid
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from runner.signature import signature

LAUNCH_ENV = "RUNNER_LAUNCH_ID"
_sweep_dirs: list[str] = []  # filled in the launching process by SweepCallback


def config_dir(override_dirname: str, *, _root_) -> str:
    """Folder name of one configuration: readable overrides (without seed) plus the config signature."""
    task = OmegaConf.masked_copy(_root_, [k for k in _root_ if k != "hydra"])
    name = re.sub(r"[^A-Za-z0-9=.,+_-]", "_", override_dirname or "default")[:120]
    return f"{name}-{signature(OmegaConf.to_container(task, resolve=True))}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("runner.config_dir", config_dir, replace=True)
    OmegaConf.register_new_resolver("runner.pid", os.getpid, replace=True)


class SweepCallback(Callback):
    """Remembers the sweep folder in the launching process (for the end-of-sweep tally)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        _sweep_dirs.append(str(config.hydra.sweep.dir))


def new_launch() -> str:
    """An id for this invocation, inherited by jobs in other processes (submitit, the GPU pool) via the env."""
    return os.environ.setdefault(LAUNCH_ENV, uuid.uuid4().hex[:12])


def launch_log(sweep_dir: str | Path, launch: str) -> Path:
    return Path(sweep_dir) / ".launches" / f"{launch}.jsonl"


def record_job(sweep_dir: str | Path, run_dir: str | Path, status: str, error: str | None = None) -> None:
    """Append this job's outcome to the launch log (one short line: appends of it are atomic)."""
    launch = os.environ.get(LAUNCH_ENV)
    if not launch:
        return
    path = launch_log(sweep_dir, launch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"run_dir": str(run_dir), "status": status, "error": error}) + "\n")


def tally() -> tuple[dict, list[str]] | None:
    """Statuses of this invocation's jobs, and the folders of the failed ones; None outside a sweep."""
    launch = os.environ.get(LAUNCH_ENV)
    if not _sweep_dirs or not launch:
        return None
    counts, failed = {}, []
    for sweep_dir in _sweep_dirs:
        path = launch_log(sweep_dir, launch)
        for line in path.read_text().splitlines() if path.exists() else []:
            job = json.loads(line)
            counts[job["status"]] = counts.get(job["status"], 0) + 1
            if job["status"] == "failed":
                failed.append(job["run_dir"])
    return counts, failed


class RunLock:
    """An exclusive, non-blocking lock on a run folder; released when the process dies (even by kill -9)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            self.file.close()
            self.file = None
            return False

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
