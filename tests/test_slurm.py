"""`launcher=slurm` against a real SLURM cluster (scripts/slurm_cluster.sh; CI starts one). Skipped where SLURM is
not installed or not running, except when RUNNER_REQUIRE_SLURM=1 (CI), where that is a failure.

Waits are short: tiny models, seconds per job. SLURM holds a requeued job about two minutes before it starts
again; the requeue test releases its jobs at once (`scontrol update StartTime=now`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

try:
    from tests.conftest import cli_env, python_m
except ImportError:
    from conftest import cli_env, python_m


def slurm_usable() -> str:
    """'' when a cluster answers, else why not."""
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (no sbatch)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    if out.returncode != 0 or not any(state in out.stdout for state in ("idle", "mix", "alloc", "completing")):
        return f"no SLURM cluster answers (sinfo: {out.stderr.strip() or out.stdout.strip()})"
    return ""


REASON = slurm_usable()
if REASON and os.environ.get("RUNNER_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"RUNNER_REQUIRE_SLURM=1 but {REASON}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(REASON), reason=REASON)]

CPU = ("launcher=slurm", "hydra.launcher.gpus_per_node=0", "logger=none", "trainer.progress=false")
SMALL = ("model.hidden=[16]",)


def runner(tmp_path: Path, *args, wait: bool = True, timeout: float = 600):
    cmd = [sys.executable, "-m", "runner", "-m", *CPU, *args]
    env = cli_env(tmp_path)
    if not wait:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return python_m("runner", cmd[3:], cwd=tmp_path, env=env, timeout=timeout)


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def runs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.glob("*/seed=*") if p.is_dir() and not p.parent.is_symlink())


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def array_tasks() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()


def test_an_array_completes_and_a_rerun_skips_it(tmp_path):
    first = runner(tmp_path, "seed=0,1,2", "trainer.epochs=2", *SMALL)
    assert first.returncode == 0 and last_line(first.stderr) == "sweep: 3 completed", first.stderr[-3000:]
    sweep = tmp_path / "multirun" / "default"
    assert [summary(d)["status"] for d in runs(sweep)] == ["completed"] * 3
    again = runner(tmp_path, "seed=0,1,2", "trainer.epochs=2", *SMALL)
    assert again.returncode == 0 and last_line(again.stderr) == "sweep: 3 skipped", again.stderr[-3000:]


def test_a_failing_job_is_tallied_and_exits_1(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"garbage")
    out = runner(tmp_path, "dataset=digits,mnist", f"dataset.root={tmp_path / 'data'}", "trainer.epochs=1", *SMALL)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert last_line(out.stderr).startswith("sweep: 1 completed, 1 failed; failed: "), out.stderr[-3000:]


def test_an_impossible_request_is_one_line_before_anything_is_submitted(tmp_path):
    for args, words in ((["hydra.launcher.gpus_per_node=1"], "no GPUs"),
                        (["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=4096"], "PartitionConfig"),
                        (["hydra.launcher.gpus_per_node=0", "hydra.launcher.mem_gb=100000"], "PartitionConfig"),
                        (["hydra.launcher.partition=nope"], "no partition nope")):
        out = python_m("runner", ["-m", "launcher=slurm", "seed=0,1", *args], cwd=tmp_path, env=cli_env(tmp_path),
                       timeout=120)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2 and len(lines) == 1 and words in lines[0], out.stderr[-2000:]
    assert not (tmp_path / "multirun").exists()


def test_scancel_of_one_task_is_recorded_and_tallied(tmp_path):
    proc = runner(tmp_path, "trainer.epochs=2,100000", *SMALL, wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len([t for t in array_tasks() if "_" in t]) < 2:
        time.sleep(0.5)
    long_task = [t for t in array_tasks() if t.endswith("_1")]
    assert long_task, "the array never ran"
    time.sleep(3)
    subprocess.run(["scancel", long_task[0]], check=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert last_line(stderr).startswith("sweep: 1 cancelled, 1 completed"), stderr[-3000:]
    statuses = sorted(summary(d)["status"] for d in runs(tmp_path / "multirun" / "default"))
    assert statuses == ["cancelled", "completed"]
    cancelled = [summary(d) for d in runs(tmp_path / "multirun" / "default") if summary(d)["status"] == "cancelled"]
    assert "CANCELLED" in cancelled[0]["error"]


EPOCHS = "trainer.epochs=400"  # ~50 s of training at idle: past the time-limit job's signal window on any machine


def release_requeued(folders: dict[Path, tuple[str, ...]], stop: threading.Event) -> None:
    """SLURM holds a requeued job two minutes (Reason=BeginTime) before it may start again: a scheduler's choice,
    not the runner's; release our requeued jobs at once (`scontrol update StartTime=now`, and the folder's extra
    settings once it has a checkpoint) so the test waits only for what the runner does."""
    while not stop.wait(0.5):
        listing = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r %Z"], capture_output=True, text=True).stdout
        for job, reason, workdir in (line.split(maxsplit=2) for line in listing.splitlines() if line.strip()):
            for folder, settings in folders.items():
                if reason == "BeginTime" and str(folder) in workdir:
                    # the settings once the job has a checkpoint to resume from (before, it starts over: again)
                    checkpointed = any(folder.glob("multirun/default/*/seed=*/checkpoints/last.pt"))
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now",
                                    *(settings if checkpointed else ())], capture_output=True)


def test_preemption_and_time_limits_requeue_and_resume_to_the_uninterrupted_result(tmp_path):
    """Two jobs and their uninterrupted twin at once: one job preempted with `scancel --signal=USR2` after its first
    checkpoint, one past its time limit (1 minute, USR2 40 s before it: SLURM sends it 20 to 50 s after the start,
    its time-limit check runs every 30 s; the job trains longer than that on any machine, so it is requeued; once it
    has a checkpoint its requeued job gets 10 minutes: one time-limit requeue that resumes is what is tested). Both resume from their checkpoints and
    end with the metrics and weights of the twin (deterministic, one thread)."""
    args = ("trainer.deterministic=true", "model=cnn", "model.width=8")
    preempted, timed, twin = tmp_path / "preempted", tmp_path / "timed", tmp_path / "twin"
    for folder in (preempted, timed, twin):
        folder.mkdir()
    stop = threading.Event()
    releaser = threading.Thread(target=release_requeued, args=({preempted: (), timed: ("TimeLimit=10",)}, stop), daemon=True)
    releaser.start()
    try:
        p = runner(preempted, EPOCHS, *args, wait=False)
        t = runner(timed, EPOCHS, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=40", *args,
                   wait=False)
        reference = twin / "run"
        reference_proc = subprocess.Popen([sys.executable, "-m", "runner", EPOCHS, *args, "logger=none",
                                           "trainer.progress=false", f"hydra.run.dir={reference}"], cwd=twin,
                                          env=cli_env(twin), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        checkpoint = None
        while time.monotonic() < deadline and checkpoint is None:
            found = list((preempted / "multirun").glob("default/*/seed=0/checkpoints/last.pt"))
            checkpoint = found[0] if found else None
            time.sleep(0.2)
        assert checkpoint is not None, "the preempted job never checkpointed"
        job = [line.split()[0] for line in subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True,
                                                          text=True).stdout.splitlines() if str(preempted) in line]
        subprocess.run(["scancel", "--signal=USR2", job[0]], check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (checkpoint.parent.parent / "summary.json").exists():
            time.sleep(0.2)
        interrupted = summary(checkpoint.parent.parent)
        assert interrupted["status"] == "interrupted" and "requeued" in interrupted["error"], interrupted
        _, stderr = reference_proc.communicate(timeout=900)
        assert reference_proc.returncode == 0, stderr[-2000:]
        for proc, folder in ((p, preempted), (t, timed)):
            _, stderr = proc.communicate(timeout=900)
            assert proc.returncode == 0 and last_line(stderr) == "sweep: 1 completed", stderr[-3000:]
            (run_dir,) = runs(folder / "multirun" / "default")
            resumed, expected = summary(run_dir), summary(reference)
            assert resumed["status"] == "completed" and resumed["resumed_from_epoch"] >= 1, resumed
            assert resumed["final"] == expected["final"]
            read = lambda d: [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")}
                              for x in (d / "metrics.jsonl").read_text().splitlines()]
            assert read(run_dir) == read(reference)
            a = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
            b = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["model"]
            assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        stop.set()
        releaser.join()


def test_a_two_task_job_trains_what_trainer_devices_2_trains_here(tmp_path):
    """`hydra.launcher.tasks_per_node=2`: each SLURM task is a rank (torch's env:// variables from SLURM's, by
    submitit's helper), `trainer.devices=2` is added (the run's identity), and the run equals the local 2-process
    one (float64; gloo on this CPU node)."""
    args = ("trainer.dtype=float64", "trainer.epochs=2", "dataset.batch_size=478")
    out = runner(tmp_path, "hydra.launcher.tasks_per_node=2", *args)
    assert out.returncode == 0 and last_line(out.stderr) == "sweep: 1 completed", out.stderr[-3000:]
    (run_dir,) = runs(tmp_path / "multirun" / "default")
    local = python_m("runner", ["trainer.devices=2", *args, "logger=none", "trainer.progress=false",
                                f"hydra.run.dir={tmp_path / 'local'}"], cwd=tmp_path, env=cli_env(tmp_path), timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    ours, theirs = summary(run_dir), summary(tmp_path / "local")
    assert ours["status"] == "completed" and ours["signature"] == theirs["signature"]
    for key, value in theirs["final"].items():
        assert abs(ours["final"][key] - value) <= 2e-6 * abs(value) + 1e-12, (key, ours["final"][key], value)
    a = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "local" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a if a[k].is_floating_point())
    assert (run_dir / "runner.log").read_text().count("step 4 epoch 1 ") == 1  # rank 0 alone writes the log
