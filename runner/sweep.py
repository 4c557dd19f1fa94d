"""Sweeps on Hydra's multirun: deterministic folders, per-run locks, a launch log, validation up front.

Layout: `multirun/<experiment>/<signature>/seed=N`, and beside it a symlink named by the overrides that reached
it (`optimizer=sam,optimizer.rho=0.1-<signature> -> <signature>`). The folder of a run is a function of its
resolved config only (Dora style: the signature hashes the resolved config minus seed, paths and logging), not
of how the overrides were spelled, so any command that means the same config finds its runs: completed ones are
skipped, interrupted ones resume from their last checkpoint. (Runs made when folders were named
`<overrides>-<signature>` are found again: such a folder is used where it exists.) Different configurations
never share a folder; two processes that reach the same run at once are kept apart by a lock (the second skips).

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
_sweep_dirs: list[str] = []  # filled in the launching process by SweepCallback and the preflight
_expected_jobs: list[int] = []  # the number of jobs the preflight composed (empty when it did not run)
started_run_dir: list[str] = []  # a single run's folder, once Hydra has chosen it


def readable_name(override_dirname: str, sig: str) -> str:
    """`<overrides without seed>-<signature>`, the name people read (a symlink to the signature folder)."""
    return f"{re.sub(r'[^A-Za-z0-9=.,+_-]', '_', override_dirname or 'default')[:120]}-{sig}"


def config_dir(override_dirname: str, *, _root_) -> str:
    """Folder name of one configuration: its signature (or the legacy `<overrides>-<signature>` folder of the
    same config, where one exists in the sweep folder)."""
    task = OmegaConf.masked_copy(_root_, [k for k in _root_ if k != "hydra"])
    sig = signature(OmegaConf.to_container(task, resolve=True))
    try:
        sweep_dir = Path(str(_root_.hydra.sweep.dir))
    except Exception:  # composed without Hydra's node (tests): no legacy folder to look for
        return sig
    if not (sweep_dir / sig).exists() and sweep_dir.is_dir():
        legacy = sorted(p.name for p in sweep_dir.glob(f"*-{sig}") if p.is_dir() and not p.is_symlink())
        if legacy:
            return legacy[0]
    return sig


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("runner.config_dir", config_dir, replace=True)
    OmegaConf.register_new_resolver("runner.pid", os.getpid, replace=True)


class SweepCallback(Callback):
    """Remembers, in the launching process, the sweep folder (for the end-of-sweep tally) or the single run's
    folder (so an interruption before the run starts can tell what it left: runner.app.interrupted)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        expect(sweep_dirs=[str(config.hydra.sweep.dir)])

    def on_run_start(self, config, **kwargs) -> None:
        started_run_dir[:] = [str(Path(str(config.hydra.run.dir)).resolve())]  # `now` is cached: Hydra's own dir


def expect(sweep_dirs=(), jobs: int | None = None) -> None:
    """Tell the tally where this launch's jobs write their records (jobs of `+experiment=a,b` land under
    different `multirun/<experiment>` folders) and how many jobs there are."""
    _sweep_dirs.extend(str(Path(d).resolve()) for d in sweep_dirs if str(Path(d).resolve()) not in _sweep_dirs)
    if jobs is not None:
        _expected_jobs[:] = [jobs]


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


def tally(multirun: bool) -> tuple[dict, list[str]] | None:
    """Statuses of this invocation's jobs (every sweep folder they landed in), and the folders of the failed
    ones; jobs the preflight composed that never reported count as `lost` (failed). None outside a sweep."""
    launch = os.environ.get(LAUNCH_ENV)
    if not multirun or not launch:
        return None
    counts, failed, seen = {}, [], set()
    for sweep_dir in _sweep_dirs:
        path = launch_log(sweep_dir, launch)
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                job = json.loads(line)
            except ValueError:
                continue
            seen.add(job["run_dir"])
            counts[job["status"]] = counts.get(job["status"], 0) + 1
            if job["status"] in ("failed", "cancelled"):
                failed.append(job["run_dir"])
    expected = _expected_jobs[0] if _expected_jobs else None
    if expected is not None and expected > len(seen):
        counts["lost"] = expected - len(seen)
        failed.append(f"{counts['lost']} job(s) that never reported")
    elif expected is None and not seen:
        failed.append("no job reported")
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
