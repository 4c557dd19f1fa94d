"""Sweeps end to end, through the real CLI (`python -m runner -m ...`) in a subprocess.

What is checked: a sweep survives failing and diverging jobs (statuses in summary.json, exit 1, a one-line
tally, report counts); a run killed with SIGKILL resumes to a bitwise-identical result; a finished sweep is
skipped when run again; concurrent sweeps and runs never share a folder; the submitit_local launcher works;
a corrupt last.pt falls back on prev.pt; the report's numbers match a hand computation; bad input exits 2
with one line before any job runs.

Everything runs on the bundled `digits` data (no download), on CPU, with a few tiny epochs. Helpers are local
to this file (tests/conftest.py belongs to another suite).
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import scipy.stats
import torch

try:
    from tests.conftest import TIMEOUT, cli_env, python_m, runner_cmd
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from conftest import TIMEOUT, cli_env, python_m, runner_cmd


# ------------------------------------------------------------------------------------------------- helpers

def cli(tmp_path: Path, *args, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m runner *args` in tmp_path, to completion."""
    return python_m("runner", runner_cmd(*args)[3:], cwd=tmp_path, env=cli_env(tmp_path), timeout=timeout)


def ok(result, what: str = "runner") -> None:
    """Assert exit 0, showing the tail of the output otherwise."""
    code = result.returncode
    if code != 0:
        raise AssertionError(f"{what} exited {code}\n--- stdout\n{result.stdout[-3000:]}\n"
                             f"--- stderr\n{result.stderr[-3000:]}")


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def run_dirs(sweep: Path) -> list[Path]:
    """The run folders of a sweep: `<sweep>/<signature>/seed=N` (not again through the readable-name symlinks)."""
    return sorted(p for p in sweep.glob("*/seed=*") if p.is_dir() and not p.parent.is_symlink())


def the_run(sweep: Path) -> Path:
    dirs = run_dirs(sweep)
    assert len(dirs) == 1, dirs
    return dirs[0]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def untimed(records: list[dict]) -> list[dict]:
    """Metric records without their wall-clock fields (the only ones two identical runs may differ in)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return state["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"weights differ in {name}"


def same_result(resumed: dict, twin: dict) -> None:
    """Two summaries of the same training: every number that does not measure time is equal (==)."""
    for key in ("status", "final", "best", "epochs", "steps", "passes", "signature", "seed"):
        assert resumed[key] == twin[key], key


def report_csv(args: list[str], tmp_path: Path) -> dict[str, dict]:
    """`python -m runner.report *args --format csv` -> rows by signature."""
    out = python_m("runner.report", [*args, "--format", "csv", "--no-figures", "--out", tmp_path / "report"],
                   cwd=tmp_path, env=cli_env(tmp_path), timeout=TIMEOUT)
    ok(out, "runner.report")
    return {row["signature"]: row for row in csv.DictReader(io.StringIO(out.stdout))}


def signature_of(run_dir: Path) -> str:
    """The signature is the name of a run's config folder (`<sweep>/<signature>/seed=N`)."""
    return run_dir.parent.name


# ------------------------------------------------------------------ 1. failing and diverging jobs in a sweep

@pytest.mark.slow
def test_sweep_records_failed_and_diverged_jobs_and_exits_1(tmp_path):
    sweep = tmp_path / "sweep"
    raw = tmp_path / "nodata" / "MNIST" / "raw"  # MNIST files that are there (the preflight passes) but garbage
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x01garbage" * 8)
    result = cli(tmp_path, "-m", "dataset=digits,mnist", "optimizer.lr=0.05,1e8", "optimizer.momentum=0",
                 "scheduler=constant", f"dataset.root={tmp_path / 'nodata'}", "trainer.epochs=2",
                 f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1, result.stderr[-3000:]

    dirs = run_dirs(sweep)
    assert len(dirs) == 4, dirs
    statuses = {}
    for d in dirs:
        assert (d / "summary.json").is_file(), f"no summary.json in {d}"
        config = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
        dataset = config["dataset"]["name"]
        lr = "1e8" if config["optimizer"]["lr"] == 1e8 else "0.05"
        statuses[dataset, lr] = (summary(d)["status"], d)
    assert {k: v[0] for k, v in statuses.items()} == {
        ("digits", "0.05"): "completed", ("digits", "1e8"): "diverged",
        ("mnist", "0.05"): "failed", ("mnist", "1e8"): "failed"}

    # it really diverged: a non-finite training loss, recorded as such
    diverged = summary(statuses["digits", "1e8"][1])
    loss = float(diverged["final"]["train/loss"])
    assert not math.isfinite(loss)
    # it really trained: the completed job learned something
    assert summary(statuses["digits", "0.05"][1])["final"]["test/acc"] > 0.5
    # the failed jobs say why: missing MNIST files are a config error (one line, no traceback)
    for lr in ("0.05", "1e8"):
        error = summary(statuses["mnist", lr][1])["error"]
        assert "mnist" in error and "nodata" in error and "\n" not in error, error

    tally = last_line(result.stderr)
    assert tally.startswith("sweep: "), tally
    assert "1 completed" in tally and "1 diverged" in tally and "2 failed" in tally, tally
    assert all(str(statuses["mnist", lr][1]) in tally for lr in ("0.05", "1e8"))  # the failed folders are named

    rows = report_csv([str(sweep)], tmp_path)
    expected = {"completed": {("digits", "0.05")}, "diverged": {("digits", "1e8")},
                "failed": {("mnist", "0.05"), ("mnist", "1e8")}}
    assert len(rows) == 4
    for key, (_, d) in statuses.items():
        row = rows[signature_of(d)]
        assert int(row["n"]) == 1
        for status, keys in expected.items():
            assert int(row[status]) == (key in keys), (key, status, row)
    completed_row = rows[signature_of(statuses["digits", "0.05"][1])]
    assert float(completed_row["final_test/acc_mean"]) == summary(statuses["digits", "0.05"][1])["final"]["test/acc"]


# ----------------------------------------------------------------------- 2. SIGKILL mid-training, then rerun

# the CNN (with BatchNorm buffers to restore) takes ~0.3 s an epoch on one CPU thread: time enough to kill it
KILL_ARGS = ("-m", "seed=0", "model=cnn", "trainer.epochs=6", "trainer.deterministic=true")


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_the_identical_result(tmp_path, spawn):
    killed_sweep, twin_sweep = tmp_path / "killed", tmp_path / "twin"
    twin = spawn("twin", *KILL_ARGS, f"hydra.sweep.dir={twin_sweep}")  # uninterrupted, alongside
    victim = spawn("victim", *KILL_ARGS, f"hydra.sweep.dir={killed_sweep}")

    deadline = time.monotonic() + TIMEOUT
    logged = 0
    while time.monotonic() < deadline and victim.proc.poll() is None:
        files = [f for f in killed_sweep.glob("*/seed=0/metrics.jsonl") if not f.parent.parent.is_symlink()]
        logged = len(files[0].read_text().splitlines()) if files else 0
        if logged >= 2:
            break
        time.sleep(0.005)
    assert victim.proc.poll() is None, f"the run ended before it could be killed:\n{victim.stderr[-2000:]}"
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL

    run_dir = the_run(killed_sweep)
    assert not (run_dir / "summary.json").exists()  # killed: no summary
    lines_at_kill = len(metrics(run_dir))
    assert 2 <= lines_at_kill < 6

    rerun = cli(tmp_path, *KILL_ARGS, f"hydra.sweep.dir={killed_sweep}")
    ok(rerun, "rerun")
    assert twin.wait() == 0, twin.stderr[-3000:]
    twin_dir = the_run(twin_sweep)
    assert the_run(killed_sweep) == run_dir  # the same command found the same folder

    resumed, reference = summary(run_dir), summary(twin_dir)
    assert resumed["status"] == "completed"
    assert reference["resumed_from_epoch"] is None
    assert isinstance(resumed["resumed_from_epoch"], int)
    # the epoch-N checkpoint is written just after the epoch-N metrics line: N-1 or N
    assert 1 <= resumed["resumed_from_epoch"] <= lines_at_kill
    same_result(resumed, reference)

    records, twin_records = metrics(run_dir), metrics(twin_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]  # truncated on resume, nothing twice
    assert [r["train/loss"] for r in records] == [r["train/loss"] for r in twin_records]
    assert untimed(records) == untimed(twin_records)
    assert_same_weights(weights(run_dir), weights(twin_dir))


# ------------------------------------------------------------- 3 and 7. a small finished sweep (two seeds)

TWO_SEED_ARGS = ("trainer.epochs=2", "trainer.deterministic=true", "trainer.checkpoint_every=1")


@pytest.fixture(scope="module")
def two_seed_sweep(tmp_path_factory):
    """`-m seed=0,1 trainer.epochs=2`, run once for the tests that read, rerun or copy it (never change it)."""
    root = tmp_path_factory.mktemp("two_seeds")
    sweep = root / "sweep"
    result = cli(root, "-m", "seed=0,1", *TWO_SEED_ARGS, f"hydra.sweep.dir={sweep}")
    ok(result, "sweep")
    assert last_line(result.stderr) == "sweep: 2 completed"
    return root, sweep


@pytest.mark.slow
def test_rerunning_a_finished_sweep_retrains_nothing(two_seed_sweep):
    root, sweep = two_seed_sweep
    dirs = run_dirs(sweep)
    assert len(dirs) == 2

    def snapshot():
        files = [d / "summary.json" for d in dirs] + [d / "metrics.jsonl" for d in dirs] + \
                [d / "checkpoints" / "last.pt" for d in dirs]
        return {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}

    before = snapshot()
    result = cli(root, "-m", "seed=0,1", *TWO_SEED_ARGS, f"hydra.sweep.dir={sweep}")
    ok(result, "rerun")
    assert last_line(result.stderr) == "sweep: 2 skipped"
    assert run_dirs(sweep) == dirs
    assert snapshot() == before
    assert all(summary(d)["status"] == "completed" for d in dirs)


def test_report_matches_a_hand_computation(two_seed_sweep, capsys):
    from runner import report

    root, sweep = two_seed_sweep
    accs = [summary(d)["final"]["test/acc"] for d in run_dirs(sweep)]
    assert len(accs) == 2
    mean = sum(accs) / 2
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (2 - 1))  # sample std, ddof=1
    low, high = scipy.stats.t.interval(0.95, 1, loc=mean, scale=std / math.sqrt(2))  # Student t, 1 dof
    ci95 = (high - low) / 2

    assert report.main([str(sweep), "--format", "csv", "--no-figures", "--out", str(root / "report")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1  # two seeds of one experiment: one group
    row = rows[0]
    assert (int(row["n"]), int(row["completed"]), int(row["diverged"]), int(row["failed"])) == (2, 2, 0, 0)
    assert int(row["final_test/acc_n"]) == 2
    assert float(row["final_test/acc_mean"]) == pytest.approx(mean, abs=1e-12)
    assert float(row["final_test/acc_std"]) == pytest.approx(std, abs=1e-12)
    assert float(row["final_test/acc_ci95"]) == pytest.approx(ci95, rel=1e-9, abs=1e-12)
    assert row["signature"] == signature_of(run_dirs(sweep)[0])


# ------------------------------------------------------------------------- 4. concurrent sweeps and runs

@pytest.mark.slow
def test_two_sweeps_started_together_keep_their_runs_apart(tmp_path, spawn):
    sweep = tmp_path / "sweep"
    common = ("scheduler=constant", "trainer.epochs=2", f"hydra.sweep.dir={sweep}")
    jobs = {lr: spawn(f"lr{lr}", "-m", f"optimizer.lr={lr}", *common) for lr in (0.05, 0.1)}
    for lr, job in jobs.items():
        assert job.wait() == 0, job.stderr[-3000:]
        assert last_line(job.stderr) == "sweep: 1 completed"  # each tallies its own job only

    dirs = run_dirs(sweep)
    assert len(dirs) == 2 and dirs[0].parent != dirs[1].parent
    by_lr = {metrics(d)[0]["lr"]: d for d in dirs}
    assert set(by_lr) == {0.05, 0.1}
    for lr, d in by_lr.items():
        names = [p.name for p in sweep.iterdir() if p.is_symlink() and p.resolve() == d.parent.resolve()]
        assert names == [f"optimizer.lr={lr},scheduler=constant,trainer.epochs=2-{d.parent.name}"]  # readable name
        records = metrics(d)
        assert [r["epoch"] for r in records] == [1, 2]  # one run's lines, not interleaved with the other's
        assert all(r["lr"] == lr for r in records)  # constant schedule: every line is this run's
        assert summary(d)["status"] == "completed"


@pytest.mark.slow
def test_two_single_runs_in_the_same_second_get_their_own_folders(tmp_path, spawn):
    jobs = [spawn(f"single{i}", "trainer.epochs=1") for i in range(2)]
    for job in jobs:
        assert job.wait() == 0, job.stderr[-3000:]
    dirs = sorted(p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir())
    assert len(dirs) == 2, dirs  # outputs/<date>/<time>-<pid>
    assert {int(d.name.rsplit("-", 1)[1]) for d in dirs} == {job.pid for job in jobs}
    for d in dirs:
        assert summary(d)["status"] == "completed"
        assert len(metrics(d)) == 1


# ------------------------------------------------------------------------------------- 5. submitit_local

@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local", "pool"])
def test_process_launchers_run_a_sweep(tmp_path, launcher):
    """submitit's local executor (the SLURM code path) and the local pool (one process per GPU, here CPU)."""
    if launcher == "submitit_local":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    extra = ["hydra.launcher.workers=2"] if launcher == "pool" else []
    sweep = tmp_path / "sweep"
    result = cli(tmp_path, "-m", f"launcher={launcher}", *extra, "seed=0,1", "trainer.epochs=1",
                 f"hydra.sweep.dir={sweep}")
    ok(result, f"{launcher} sweep")
    assert last_line(result.stderr) == "sweep: 2 completed"
    dirs = run_dirs(sweep)
    assert [d.name for d in dirs] == ["seed=0", "seed=1"]
    assert all(summary(d)["status"] == "completed" for d in dirs)


# ----------------------------------------------------------------- 6. corrupt last.pt, readable prev.pt

@pytest.mark.slow
def test_corrupt_last_checkpoint_resumes_from_prev(two_seed_sweep, tmp_path):
    """A copy of the finished two-seed sweep, its seed=0 run made to look killed with a torn last.pt."""
    _, original = two_seed_sweep
    sweep = tmp_path / "sweep"
    shutil.copytree(original, sweep, symlinks=True)
    run_dir = [d for d in run_dirs(sweep) if d.name == "seed=0"][0]
    reference, reference_metrics, reference_weights = summary(run_dir), metrics(run_dir), weights(run_dir)
    assert reference["status"] == "completed" and reference["epochs"] == 2
    prev = torch.load(run_dir / "checkpoints" / "prev.pt", map_location="cpu", weights_only=True)
    prev_epoch = prev["progress"]["epoch"]
    assert prev_epoch == 1  # checkpoint_every=1: last.pt at epoch 2, prev.pt at epoch 1

    # as if killed while writing the final checkpoint: last.pt torn, no summary.json
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"garbage")

    result = cli(tmp_path, "-m", "seed=0", *TWO_SEED_ARGS, f"hydra.sweep.dir={sweep}")
    ok(result, "rerun")
    assert last_line(result.stderr) == "sweep: 1 completed"
    assert "cannot read checkpoint" in result.stdout + result.stderr  # the corrupt file is reported
    assert [d.relative_to(sweep) for d in run_dirs(sweep)] == [d.relative_to(original) for d in run_dirs(original)]
    resumed = summary(run_dir)
    assert resumed["status"] == "completed"
    assert resumed["resumed_from_epoch"] == prev_epoch
    same_result(resumed, reference)
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert untimed(records) == untimed(reference_metrics)
    assert_same_weights(weights(run_dir), reference_weights)


# ---------------------------------------------------------------------------------------- 8. bad input

def test_bad_sweep_value_exits_2_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(tmp_path, "-m", "optimizer.lr=0.1,abc", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "optimizer.lr" in lines[0], result.stderr
    assert not sweep.exists()
    assert not (tmp_path / "multirun").exists()


# `python -c SHIM args...` = `python -m runner args...` where hydra_submitit_launcher cannot be found
NO_SUBMITIT = """
import importlib.util, runpy
_find_spec = importlib.util.find_spec
def find_spec(name, *args, **kwargs):
    if name == "hydra_plugins.hydra_submitit_launcher" or name.startswith("hydra_plugins.hydra_submitit_launcher."):
        return None
    return _find_spec(name, *args, **kwargs)
importlib.util.find_spec = find_spec
runpy.run_module("runner", run_name="__main__", alter_sys=True)
"""


def test_slurm_launcher_without_the_extra_says_how_to_install_it(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-c", NO_SUBMITIT, *runner_cmd("-m", "launcher=slurm", "seed=0,1",
                                                          f"hydra.sweep.dir={sweep}")[3:]]
    result = subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and "launcher=slurm" in lines[0], result.stderr
    assert not sweep.exists()
