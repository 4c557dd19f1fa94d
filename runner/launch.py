"""`trainer.devices=N`: the run's N processes, started by torch's own elastic launcher (the engine of `torchrun`),
from inside the job, so that a run or a sweep (`-m`) of many-device runs is launched from the shell like any other.

The job's process validates the config and starts N workers on this machine (c10d rendezvous on a free local port;
gloo on the CPU, nccl on CUDA, one GPU per worker); each worker runs `runner.run.run` as one rank of the group
(runner/cluster.py): rank 0 writes the run directory, the others train their part. The job returns rank 0's
summary. A worker that fails ends the others (the launcher stops the group) and the run is recorded by rank 0 as
`failed` or `interrupted`; the one line names the rank. Ctrl-C or SIGTERM to the job reaches every worker (the
launcher passes it on); rank 0 records the run as `interrupted` and the same command resumes it. `torchrun --nproc-per-node=N -m runner ...` starts the same
ranks from outside instead.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import torch

from runner.config import ConfigError
from runner.signals import Interrupted, install

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format


def launch(cfg, run_dir, devices: int, device: torch.device) -> dict:
    """Run `cfg` over `devices` processes; rank 0's summary."""
    from omegaconf import OmegaConf
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from runner.run import RunBusy, RunFailed

    if device.type == "cuda" and torch.cuda.device_count() < devices:
        raise ConfigError("trainer.devices", message=(
            f"trainer.devices={devices} but this machine has {torch.cuda.device_count()} CUDA devices"))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=f"runner-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    container = OmegaConf.to_container(cfg, resolve=False)
    logging.getLogger(__name__).info("training on %d processes (%s)", devices, device.type)
    try:
        results = elastic_launch(config, worker)(container, str(run_dir))
    except SignalException as e:  # Ctrl-C or SIGTERM here: the launcher passed it on to the workers and waited
        raise Interrupted("SIGTERM") if e.sigval == signal.SIGTERM else KeyboardInterrupt() from None
    except ChildFailedError as e:
        # the root cause: a worker killed by a signal (kill -9, the OOM killer) before one whose collective broke
        killed = [(r, f) for r, f in e.failures.items() if f.exitcode is not None and f.exitcode < 0]
        rank, failure = min(killed, key=lambda item: item[0]) if killed else e.get_first_failure()
        message = _failure_line(failure)
        if message.startswith("RunBusy"):
            raise RunBusy(message.split(":", 1)[-1].strip()) from None
        error = RankFailed(f"rank {rank} of {devices}: {message}")
        raise RunFailed(Path(run_dir), error, _record_failure(cfg, Path(run_dir), error)) from None
    finally:
        install()  # the launcher put its own SIGINT/SIGTERM handlers in place: ours again
    return results[0]


class RankFailed(RuntimeError):
    """A worker process of a many-device run ended with an error (or a signal)."""


def _record_failure(cfg, run_dir: Path, error: Exception) -> OSError | None:
    """A failed record, unless rank 0 wrote one (`failed`, or `interrupted` when the launcher stopped it after
    another rank died): when rank 0 itself was killed, nobody else did. Returns what kept it from disk, if any."""
    from runner.rundir import RunDir
    from runner.run import _write_failure
    from runner.signature import signature
    from runner.spec import validate

    record = RunDir(run_dir, create=False)
    if not run_dir.is_dir() or (record.read_summary() or {}).get("status") in ("failed", "interrupted"):
        return None
    spec = validate(cfg)
    return _write_failure(record, spec, signature(spec.resolved), error)


def _failure_line(failure) -> str:
    """The telling line of a worker's failure: its exception's last line, or how it ended (a signal)."""
    message = failure.message
    if isinstance(message, dict):  # the worker's error file: {"message": "<Type>: <text>", "extraInfo": {...}}
        message = message.get("message", "")
    message = str(message)
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if lines and "Signal" not in lines[-1] and "exitcode" not in lines[-1]:
        return lines[-1]
    if failure.exitcode is not None and failure.exitcode < 0:
        import signal

        return f"killed by {signal.Signals(-failure.exitcode).name}"
    return lines[-1] if lines else f"exit code {failure.exitcode}"


def worker(config: dict, run_dir: str) -> dict:
    """One rank: the same `run` (runner/run.py), in the process group the launcher's environment describes."""
    from omegaconf import OmegaConf

    from runner.run import run

    rank = int(os.environ.get("RANK", "0"))
    _log_to(run_dir, rank)
    return run(OmegaConf.create(config), run_dir)


def _log_to(run_dir: str, rank: int) -> None:
    """Rank 0 logs as the job does (the run's runner.log and stderr); the others their warnings to stderr."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    formatter = logging.Formatter(LOG_FORMAT if rank == 0 else f"[rank {rank}]{LOG_FORMAT}")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console)
    if rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(run_dir) / "runner.log")
        file.setFormatter(formatter)
        root.addHandler(file)
