"""Many devices when things go wrong (runner/launch.py, runner/run.py): a rank killed with kill -9, SIGTERM to the
job, the same run started twice. Each ends in one line and a record, and the same command resumes the run to the
uninterrupted 2-rank result. (A module of its own so that these waits run beside the equivalence tests of
tests/test_distributed.py on another pytest worker.)"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from test_distributed import final


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of worker `rank` of a run started as `parent`: the launcher's multiprocessing children (not its
    resource tracker) in start order, which is rank order (pids grow; the launcher starts local ranks 0..N-1 in turn).
    (Their RANK is set inside the child, after exec: /proc/<pid>/environ does not show it.)"""
    from pathlib import Path

    workers = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            workers.append(int(proc.name))
    workers.sort()
    return workers[rank] if rank < len(workers) else None


def started_until_checkpoint(tmp_path, args: list[str], run_dir) -> subprocess.Popen:
    """`python -m runner *args` started in the background, returned once its first checkpoint is written."""
    import time

    from conftest import cli_env, runner_cmd

    proc = subprocess.Popen(runner_cmd(*args, f"hydra.run.dir={run_dir}"), cwd=tmp_path, env=cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run_dir / "checkpoints" / "last.pt").exists():
        time.sleep(0.2)
    return proc


@pytest.mark.slow
def test_kill_9_of_one_rank_is_one_line_naming_it_and_the_rerun_resumes_to_the_uninterrupted_result(tmp_path):
    import signal

    from conftest import runner_process

    args = ["model=cnn", "model.width=4", "model.dropout=0.2", "trainer.epochs=12", "trainer.deterministic=true",
            "trainer.devices=2", "trainer.progress=false", "dataset.batch_size=64"]
    twin = runner_process(tmp_path, *args, f"hydra.run.dir={tmp_path / 'twin'}", timeout=900)
    assert twin.returncode == 0, twin.stderr[-3000:]
    run_dir = tmp_path / "killed"
    proc = started_until_checkpoint(tmp_path, args, run_dir)
    pid = _rank_pid(proc.pid, 1)
    assert pid is not None, "no rank 1 process found"
    os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    line = stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "rank 1 of 2" in line and "SIGKILL" in line, stderr[-3000:]
    assert "Traceback" not in line
    recorded = json.loads((run_dir / "summary.json").read_text())  # rank 0, stopped by the launcher, recorded it
    assert recorded["status"] in ("interrupted", "failed"), recorded
    rerun = runner_process(tmp_path, *args, f"hydra.run.dir={run_dir}", timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed, expected = final(run_dir), final(tmp_path / "twin")
    assert resumed[0]["resumed_from_epoch"] >= 1
    assert resumed[0]["final"] == expected[0]["final"]
    assert all(torch.equal(resumed[1][k], expected[1][k]) for k in expected[1])
    assert resumed[2] == expected[2]


@pytest.mark.slow
def test_sigterm_to_the_job_reaches_every_rank_is_recorded_and_the_rerun_resumes(tmp_path):
    """SIGTERM to `python -m runner trainer.devices=2` (what `kill`, `timeout` and SLURM send): torch's launcher passes
    it on to the workers, rank 0 records the run `interrupted`, the job says so in one line and exits 143, and no
    worker is left behind; the same command resumes it."""
    import signal

    from conftest import runner_process

    args = ["model=cnn", "model.width=4", "trainer.epochs=15", "trainer.devices=2", "trainer.progress=false"]
    run_dir = tmp_path / "run"
    proc = started_until_checkpoint(tmp_path, args, run_dir)
    workers = [_rank_pid(proc.pid, rank) for rank in (0, 1)]
    assert None not in workers, "the workers were not found"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    line = stderr.strip().splitlines()[-1]
    assert proc.returncode == 143 and line.startswith("interrupted (SIGTERM)") and "resumes" in line, stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # no rank left running
    rerun = runner_process(tmp_path, *args, f"hydra.run.dir={run_dir}", timeout=900)
    assert rerun.returncode == 0 and rerun.stderr.strip().splitlines()[-1].startswith("completed"), rerun.stderr[-2000:]
    assert final(run_dir)[0]["resumed_from_epoch"] >= 1


@pytest.mark.slow
def test_the_same_run_started_twice_is_refused_in_one_line_and_its_record_is_untouched(tmp_path):
    """A second `trainer.devices=2` job on a folder being trained: rank 0 finds the lock held; one line, exit 2, and
    no record is written over the running one (the worker's error file is read for its message)."""
    from conftest import runner_process

    import signal

    # long enough to be still training when the second job has started on any machine; stopped by SIGTERM after
    args = ["model=cnn", "model.width=4", "trainer.epochs=5000", "trainer.devices=2", "trainer.progress=false"]
    run_dir = tmp_path / "run"
    first = started_until_checkpoint(tmp_path, args, run_dir)
    second = runner_process(tmp_path, *args, f"hydra.run.dir={run_dir}", timeout=600)
    assert first.poll() is None, "the first job ended before the second one checked"
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.strip().splitlines()[-1] == f"error: {run_dir} is being trained by another process; skipped"
    assert not (run_dir / "summary.json").exists()
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 143 and stderr.strip().splitlines()[-1].startswith("interrupted"), stderr[-3000:]
    assert final(run_dir)[0]["status"] == "interrupted"  # the first job's own record, written by the first job
