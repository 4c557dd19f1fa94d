"""Errors of `python -m runner.analyze` (and their kin in `python -m runner`) are one clear line, never a traceback:
a run whose checkpoint cannot be rebuilt, a read-only run folder, a bad `--device`, a signal between runs or jobs,
PCA without enough snapshots (refused up front) or with a torn one (skipped), a garbage `trainer.resume`.

Signals are sent by a `sitecustomize` hook (as in test_signals.py) on the Nth entry to a named function, so each
phase is hit exactly, however loaded the machine is.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_env, python_m, runner_process

pytestmark = pytest.mark.slow  # adversary regressions: CLI runs on copies of shared runs (the full suite)

TINY = ("model.hidden=[16]", "trainer.progress=false", "logger=none")
PCA = ("analysis=pca", "analysis.pca.points=4", "analysis.pca.samples=256")
TRAINED = (*TINY, "trainer.epochs=4", *PCA)  # 4 epochs: 4 parameter snapshots
SHARPNESS = ("analysis=sharpness", "analysis.sharpness.samples=64", "analysis.sharpness.ascent_steps=1")


def analyze_cli(tmp_path: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return python_m("runner.analyze", args, cwd=tmp_path, env=env or cli_env(tmp_path))


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished tiny run with 4 PCA snapshots; tests copy it (shutil.copytree) and damage the copy."""
    root = tmp_path_factory.mktemp("trained")
    out = runner_process(root, *TRAINED, f"hydra.run.dir={root / 'run'}")
    assert out.returncode == 0, out.stderr
    return root / "run"


def copy(run: Path, to: Path, **config) -> Path:
    """A copy of `run`; `config` (group -> {key: value}) is written into its checkpoint's stored config."""
    shutil.copytree(run, to)
    if config:
        path = to / "checkpoints" / "last.pt"
        state = torch.load(path, weights_only=True)
        for group, values in config.items():
            state["config"][group].update(values)
        torch.save(state, path)
    return to


# ------------------------------------------------------------------------------- runs that cannot be rebuilt

def test_a_run_whose_checkpoint_cannot_be_rebuilt_is_one_line_and_the_others_go_on(trained, tmp_path):
    """A stored config that is invalid now, and one that does not match the weights stored with it: each one line
    naming the run; the run after them is analysed; a tally ends the output; exit 1."""
    invalid = copy(trained, tmp_path / "invalid", optimizer={"lr": "banana"})
    mismatch = copy(trained, tmp_path / "mismatch", model={"hidden": [32]})
    good = copy(trained, tmp_path / "good")
    out = analyze_cli(tmp_path, invalid, mismatch, good, *SHARPNESS)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    said = lines(out.stderr)
    assert [line for line in said if line.startswith(f"{invalid}:")] == [
        f"{invalid}: cannot rebuild the run from {invalid}/checkpoints/last.pt: invalid config: optimizer.lr='banana' "
        "(allowed: a value of type float); skipped"]
    [line] = [line for line in said if line.startswith(f"{mismatch}:")]
    assert "does not match" in line and "size mismatch" in line and line.endswith("; skipped"), line
    assert any(line.startswith(f"{good}: step 92: sharpness/") for line in said), out.stderr
    assert (good / "analysis" / "sharpness.json").exists()
    assert not (invalid / "analysis" / "sharpness.json").exists()
    assert said[-1] == f"analyze: 1 analysed, 2 failed; not analysed: {invalid} {mismatch}"


# ----------------------------------------------------------------------------------- read-only run folders

@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` and everything in it read-only, also for root (who ignores permission bits): `chattr +i`."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(folder)],
                                                            capture_output=True).returncode != 0:
            pytest.skip("root writes into read-only folders and `chattr +i` does not work here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)
        return
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_a_read_only_run_is_one_line_and_exit_2_for_analyze_and_for_a_rerun(trained, tmp_path):
    run = copy(trained, tmp_path / "ro")
    (run / ".lock").unlink()  # the lock is made by the first process that opens it
    before = tree(run)
    with read_only(run):
        analysed = analyze_cli(tmp_path, run, *SHARPNESS)
        rerun = runner_process(tmp_path, *TRAINED, f"hydra.run.dir={run}")
    for out in (analysed, rerun):
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        [line] = lines(out.stderr)
        assert line.startswith("error: ") and f"{run} is read-only" in line, line
    assert "cannot write its analysis" in analysed.stderr and "cannot write the run" in rerun.stderr
    assert tree(run) == before


def test_a_file_where_the_run_folder_should_be_is_one_line_and_exit_2(tmp_path):
    """`hydra.run.dir=<a file>/run`: no permission bits involved, so this holds for root too."""
    (tmp_path / "file").write_text("x")
    out = runner_process(tmp_path, *TINY, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert lines(out.stderr) == [f"error: cannot write the run into {tmp_path / 'file' / 'run'}: "
                                 f"{tmp_path / 'file'} is a file, not a folder"]


def test_a_lock_that_cannot_be_opened_is_one_line_and_the_others_go_on(trained, tmp_path, monkeypatch, capsys,
                                                                       one_thread):
    """The OSError of opening a run's lock (a folder made read-only after the checks) is that run's one line, in
    process."""
    from hydra.core.global_hydra import GlobalHydra

    from runner.analyze import main
    from runner.sweep import RunLock

    stuck, good = copy(trained, tmp_path / "stuck"), copy(trained, tmp_path / "good")
    acquire = RunLock.acquire

    def failing(self):
        if self.path.parent == stuck:
            raise PermissionError(13, "Permission denied", str(self.path))
        return acquire(self)

    monkeypatch.setattr(RunLock, "acquire", failing)
    GlobalHydra.instance().clear()
    assert main([str(stuck), str(good), *SHARPNESS]) == 1
    said = lines(capsys.readouterr().err)
    assert f"{stuck}: cannot write into it (PermissionError: [Errno 13] Permission denied: '{stuck}/.lock'); " \
           "skipped" in said, said
    assert (good / "analysis" / "sharpness.json").exists()
    assert said[-1] == f"analyze: 1 analysed, 1 failed; not analysed: {stuck}"


# -------------------------------------------------------------------------------------------------- --device

@pytest.mark.parametrize("device, says", [("banana", "--device='banana' (allowed: auto, cpu, cuda, cuda:N"),
                                          ("cuda:99", "--device=")])
def test_a_bad_device_is_one_line_and_exit_2_before_any_work(trained, tmp_path, capsys, device, says):
    """Checked first: the line is about the device, not about the run that does not exist."""
    from hydra.core.global_hydra import GlobalHydra

    from runner.analyze import main

    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "missing"), *SHARPNESS, "--device", device])
    [line] = lines(capsys.readouterr().err)
    assert exit_.value.code == 2 and line.startswith("error: ") and says in line, line


# ------------------------------------------------------------------------------- signals between runs or jobs

def with_signal(tmp_path: Path, module: str, at: str, *args, call: int = 1, name: str = "SIGTERM"):
    """`python -m <module> *args` whose `call`-th entry into `at` (module:function) sends it the signal `name`
    (tests/test_signals.py's hook)."""
    from tests.test_signals import run_with_signal

    return run_with_signal(tmp_path, at, *args, name=name, call=call, module=module)


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_between_runs_of_analyze_says_what_was_analysed(trained, tmp_path, name, code):
    first, second = copy(trained, tmp_path / "first"), copy(trained, tmp_path / "second")
    out = with_signal(tmp_path, "runner.analyze", "runner.sweep:RunLock.acquire", first, second, *SHARPNESS,
                      call=2, name=name)
    assert out.returncode == code and "Traceback" not in out.stderr, out.stderr
    said = lines(out.stderr)
    assert said[-1] == (f"interrupted ({'SIGTERM' if name == 'SIGTERM' else 'Ctrl-C'}): runs so far: 1 analysed; "
                        "the analyses finished are kept, the same command does the rest"), out.stderr
    assert [line for line in said if line.startswith("interrupted")] == said[-1:]
    assert (first / "analysis" / "sharpness.json").exists()
    assert not (second / "analysis" / "sharpness.json").exists()


SWEEP = ("-m", "seed=0,1", "trainer.epochs=1", *TINY)
BETWEEN_JOBS = {  # where the signal arrives -> the tally the line gives
    "second-job-start": ("runner.sweep:readable_name", 2, "1 completed, 1 not started"),
    "first-job-recorded": ("runner.sweep:record_job", 1, "1 completed, 1 not run"),
    "final-tally": ("runner.sweep:tally", 1, "2 completed"),
}


@pytest.mark.parametrize("case", sorted(BETWEEN_JOBS))
def test_a_signal_between_sweep_jobs_is_one_line_with_the_tally(tmp_path, case):
    at, call, counts = BETWEEN_JOBS[case]
    out = with_signal(tmp_path, "runner", at, *SWEEP, call=call)
    assert out.returncode == 143 and "Traceback" not in out.stderr, out.stderr
    said = [line for line in lines(out.stderr) if not line.startswith("[")]  # the jobs' log lines start with a date
    assert said == [f"interrupted (SIGTERM): the sweep stopped; jobs so far: {counts}; the same command skips "
                    "finished runs and resumes the rest"], out.stderr
    runs = sorted((tmp_path / "multirun").rglob("seed=*"))
    assert runs and all((run / "summary.json").is_file() for run in runs), runs  # no half-made folder


# ------------------------------------------------------------------------------------------------------- PCA

def test_pca_with_fewer_snapshots_than_it_needs_is_refused_up_front(tmp_path):
    out = runner_process(tmp_path, *TINY, "trainer.epochs=4", *PCA, "analysis.pca.snapshot_every_epochs=5")
    assert out.returncode == 2 and lines(out.stderr) == [
        "error: analysis=pca needs at least 3 parameter snapshots and this run would save 1 "
        "(analysis.pca.snapshot_every_epochs=5 of trainer.epochs=4, and one at the end): use "
        "analysis.pca.snapshot_every_epochs<=1"], out.stderr
    assert not (tmp_path / "run").exists()


def test_the_snapshot_count_refused_is_the_one_the_training_loop_would_save(compose):
    """Oracle: the training loop's own Cadence, run over every epoch (and step) of a run."""
    from runner.analysis import validate_plan
    from runner.analysis.methods import TRAJECTORY_MIN, check_snapshots
    from runner.config import ConfigError
    from runner.train import Cadence, TrainerConfig

    defaults = dict(compose(["analysis=pca"]).analysis.pca)
    node = lambda **pca: {"pca": {**defaults, **pca}}  # noqa: E731
    for total in range(1, 8):
        for every in range(1, 9):
            due = Cadence(every_epochs=every, at_end=True)
            saved = sum(due.due(step=e * 10, epoch=e, epoch_end=True, final=e == total) for e in range(1, total + 1))
            plan = validate_plan(node(snapshot_every_epochs=every))
            refused = pytest.raises(ConfigError) if saved < TRAJECTORY_MIN else contextlib.nullcontext()
            with refused:
                check_snapshots(plan, TrainerConfig(epochs=total))
            due = Cadence(every_steps=every, at_end=True)
            saved = sum(due.due(step=s, epoch=0, epoch_end=False, final=s == total) for s in range(1, total + 1))
            plan = validate_plan(node(snapshot_every_epochs=None, snapshot_every_steps=every))
            refused = pytest.raises(ConfigError) if saved < TRAJECTORY_MIN else contextlib.nullcontext()
            with refused:
                check_snapshots(plan, TrainerConfig(steps=total))


def test_a_torn_snapshot_is_skipped_with_a_warning_and_too_few_fail_clearly(trained, tmp_path, capsys, caplog,
                                                                            one_thread):
    """One torn snapshot of 4: skipped (a warning naming it, counted in pca.json). Two: the analysis fails in one
    line saying so, without torch's advice to load unsafely, and no `done` line."""
    from hydra.core.global_hydra import GlobalHydra

    from runner.analyze import main

    run = copy(trained, tmp_path / "run")
    snapshots = sorted((run / "analysis" / "trajectory").glob("step=*.pt"))
    assert len(snapshots) == 4
    snapshots[1].write_bytes(snapshots[1].read_bytes()[:300])  # torn mid-write
    GlobalHydra.instance().clear()
    assert main([str(run), *PCA, "--force"]) == 0, capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(snapshots[1].name in message and "skipped" in message for message in warned), warned
    info = json.loads((run / "analysis" / "pca.json").read_text())["info"]
    assert info["snapshots"] == 3 and info["skipped_snapshots"] == [snapshots[1].name]

    snapshots[0].write_text("not a snapshot")
    GlobalHydra.instance().clear()
    capsys.readouterr()
    assert main([str(run), *PCA, "--force"]) == 1
    said = [line for line in lines(capsys.readouterr().err) if line.startswith(f"{run}:")]  # not `done`
    assert len(said) == 1 and said[0].startswith(f"{run}: analysis pca failed: ValueError: analysis=pca needs at "
                                                 "least 3"), said
    assert f"2 unreadable: {snapshots[0].name}, {snapshots[1].name}" in said[0]
    assert "weights_only" not in caplog.text + said[0]


# ----------------------------------------------------------------------------------------- trainer.resume

def test_resume_from_a_garbage_file_is_exactly_one_line(tmp_path):
    """A pickle torch's safe loader warns about (protocol 4): the warning is not printed, only the error."""
    garbage = tmp_path / "garbage.pt"
    with open(garbage, "wb") as f:
        pickle.dump({"not": "a checkpoint"}, f, protocol=4)
    out = runner_process(tmp_path, *TINY, "trainer.epochs=1", f"trainer.resume={garbage}")
    assert out.returncode == 2, out.stderr
    assert lines(out.stderr) == [f"error: trainer.resume={garbage}: cannot read checkpoint {garbage} "
                                 "(UnpicklingError): corrupt, truncated or not a runner checkpoint"], out.stderr
    assert not (tmp_path / "run").exists()
