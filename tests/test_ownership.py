"""Whose record is whose (issue 20, part A): a run folder, a checkpoint and an analysis record each belong to one
run, and a full disk never leaves a line that claims a record it could not write.

- A folder whose summary and checkpoints are gone or torn still names its run in `.hydra/config.yaml`: another
  config or seed is refused there (one line, exit 2) before Hydra replaces that file, and the folder stays byte for
  byte as it was; the same config and seed resumes it.
- `analysis.checkpoint` must be a checkpoint of the run its numbers are filed under; a relative path is taken
  from the run directory.
- `interpolate`'s "already done" includes the second run's checkpoint (signature, seed, step).
- ENOSPC while a checkpoint is written: its temp file is deleted first, so the failed record fits; when even the
  record cannot be written, the one line says so instead of naming it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

try:
    from tests.conftest import cli_env, python_m, runner_process
except ImportError:
    from conftest import cli_env, python_m, runner_process

pytestmark = pytest.mark.slow  # adversary regressions: CLI runs on copies of shared runs (the full suite)

TINY = ("model.hidden=[16]", "trainer.progress=false", "logger=none")
STEPS_PER_EPOCH = 23  # digits, batch 64


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes (and every folder): what "left as it was" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished SGD runs of one config, seeds 0 (A) and 1 (B), 2 epochs each (checkpoints/prev.pt is epoch 1,
    last.pt epoch 2), made by one sweep. Tests work on copies."""
    root = tmp_path_factory.mktemp("owned")
    out = runner_process(root, "-m", "seed=0,1", "trainer.epochs=2", *TINY, f"hydra.sweep.dir={root / 'sweep'}")
    assert out.returncode == 0, out.stderr
    found = {seed: [p for p in (root / "sweep").glob(f"*/seed={seed}") if not p.parent.is_symlink()]
             for seed in (0, 1)}  # the sweep's folders (beside them: symlinks named by the overrides)
    assert all(len(f) == 1 for f in found.values()), found
    return {"A": found[0][0], "B": found[1][0]}


# ------------------------------------------------------------------ 1. another config's folder is never taken

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _no_summary_no_checkpoint(run: Path) -> None:  # killed -9 after a few records, before the first checkpoint
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints")


def _torn_summary(run: Path) -> None:
    _truncate(run / "summary.json")
    shutil.rmtree(run / "checkpoints")


def _truncated_checkpoints(run: Path) -> None:
    (run / "summary.json").unlink()
    for checkpoint in (run / "checkpoints").glob("*.pt"):
        _truncate(checkpoint)


def _torn_summary_checkpoints_intact(run: Path) -> None:  # the pre-flight read only the summary
    _truncate(run / "summary.json")


DAMAGE = {"no summary, no checkpoint": (_no_summary_no_checkpoint, ".hydra/config.yaml"),
          "torn summary": (_torn_summary, ".hydra/config.yaml"),
          "truncated checkpoints": (_truncated_checkpoints, ".hydra/config.yaml"),
          "torn summary, checkpoints intact": (_torn_summary_checkpoints_intact, "checkpoints/last.pt")}


@pytest.mark.parametrize("damage", DAMAGE)
def test_another_configs_run_is_refused_where_only_its_hydra_config_names_it(runs, tmp_path, damage):
    """A (sgd, seed 0) with its summary and checkpoints gone, torn or truncated; then a SAM seed-1 run into its
    folder: one line naming what says whose it is, exit 2, and every file as it was (metrics.jsonl and
    .hydra/config.yaml included: Hydra never started). Before the fix the run took the folder over (exit 0)."""
    damage_run, where = DAMAGE[damage]
    folder = copy_run(runs["A"], tmp_path / "D")
    damage_run(folder)
    before = snapshot(folder)
    out = runner_process(tmp_path, "optimizer=sam", "seed=1", "trainer.epochs=2", *TINY, f"hydra.run.dir={folder}")
    assert out.returncode == 2, out.stderr
    (line,) = lines(out.stderr)
    assert line.startswith("error: ") and "holds another run" in line and f"{where}:" in line, line
    assert "seed 0" in line and "seed 1" in line, line
    assert snapshot(folder) == before


def test_a_killed_run_of_the_same_config_and_seed_still_resumes(runs, tmp_path):
    """The same damage under A's own command: its .hydra/config.yaml names this config and seed, so the run starts
    over in its folder (no checkpoint is readable) and completes."""
    folder = copy_run(runs["A"], tmp_path / "D")
    _truncated_checkpoints(folder)
    out = runner_process(tmp_path, "seed=0", "trainer.epochs=2", *TINY, f"hydra.run.dir={folder}")
    assert out.returncode == 0, out.stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["status"], summary["seed"], summary["steps"]) == ("completed", 0, 2 * STEPS_PER_EPOCH)
    assert summary["signature"] == json.loads((runs["A"] / "summary.json").read_text())["signature"]
    assert [r["step"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())] == [
        STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


# --------------------------------------------------------------- 2. analysis.checkpoint belongs to its run

def analyze_main(*args) -> int:
    """`python -m runner.analyze *args` in process (`runner.analyze.main`, for speed): its exit code."""
    from hydra.core.global_hydra import GlobalHydra

    from runner.analyze import main

    GlobalHydra.instance().clear()
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


SHARPNESS = ("analysis=sharpness", "analysis.sharpness.samples=64", "analysis.sharpness.ascent_steps=1")
INTERPOLATE = ("analysis=interpolate", "analysis.interpolate.samples=64", "analysis.interpolate.alpha_points=3")


@pytest.mark.parametrize("how", ["analysis.checkpoint=<absolute path>", "the .pt file as the target"])
def test_another_runs_checkpoint_is_refused(runs, tmp_path, how):
    """B's checkpoint (seed 1) copied into A's checkpoints/ and analysed as A's: one line, exit 2, nothing filed
    under A. Before the fix its numbers went to A's analysis/ (exit 0)."""
    folder = copy_run(runs["A"], tmp_path / "A")
    foreign = folder / "checkpoints" / "from_b.pt"
    shutil.copy(runs["B"] / "checkpoints" / "last.pt", foreign)
    target = [folder, f"analysis.checkpoint={foreign}"] if how.startswith("analysis") else [foreign]
    out = python_m("runner.analyze", [*target, *SHARPNESS], cwd=tmp_path, env=cli_env(tmp_path))
    assert out.returncode == 2, out.stderr
    (line,) = lines(out.stderr)
    assert line.startswith("error: ") and "another run's checkpoint" in line and "seed 1" in line, line
    assert not (folder / "analysis").exists()


def test_a_relative_checkpoint_is_taken_from_its_run_directory(runs, tmp_path, monkeypatch, capsys, one_thread):
    """`analysis.checkpoint=checkpoints/prev.pt` from another working directory: A's epoch-1 checkpoint, not a
    path under the cwd (before the fix: "no checkpoint", exit 2); `interpolate`'s other_checkpoint likewise from
    the second run's directory."""
    folder = copy_run(runs["A"], tmp_path / "A")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = analyze_main(folder, "analysis.checkpoint=checkpoints/prev.pt", *SHARPNESS)
    assert code == 0, capsys.readouterr().err
    record = json.loads((folder / "analysis" / "sharpness.json").read_text())
    assert record["step"] == STEPS_PER_EPOCH and Path(record["checkpoint"]).resolve() == (
        folder / "checkpoints" / "prev.pt").resolve()

    b = copy_run(runs["B"], tmp_path / "B")  # (a path with `seed=1` in it is no value for an override)
    code = analyze_main(folder, f"analysis.other={b}", "analysis.interpolate.other_checkpoint=checkpoints/prev.pt",
                        *INTERPOLATE)
    assert code == 0, capsys.readouterr().err
    info = json.loads((folder / "analysis" / "interpolate.json").read_text())["info"]
    assert (info["other_step"], info["other_seed"]) == (STEPS_PER_EPOCH, 1)


# ------------------------------------------------------- 3. interpolate is redone when the other run changed

def test_interpolate_is_redone_when_the_other_runs_checkpoint_changed(runs, tmp_path, capsys, one_thread):
    """A -> B with B at epoch 1; then B "trains on" (its epoch-2 last.pt is back): the rerun recomputes (the record
    says step 46 of B), where before the fix it kept the epoch-1 numbers as "already done". Unchanged, it is
    skipped; B's checkpoint replaced by another seed's at the same step is not the same second run."""
    from runner.analysis import validate_plan
    from runner.analysis.schedule import same_other

    a = copy_run(runs["A"], tmp_path / "A")
    b = copy_run(runs["B"], tmp_path / "B")
    last = b / "checkpoints" / "last.pt"
    trained_on = last.read_bytes()
    shutil.copy(b / "checkpoints" / "prev.pt", last)  # B as it was after epoch 1
    assert analyze_main(a, f"analysis.other={b}", *INTERPOLATE) == 0, capsys.readouterr().err
    record = json.loads((a / "analysis" / "interpolate.json").read_text())
    assert (record["info"]["other_step"], record["info"]["other_seed"]) == (STEPS_PER_EPOCH, 1)

    last.write_bytes(trained_on)  # B trained on to epoch 2
    assert analyze_main(a, f"analysis.other={b}", *INTERPOLATE) == 0, capsys.readouterr().err
    record = json.loads((a / "analysis" / "interpolate.json").read_text())
    assert record["info"]["other_step"] == 2 * STEPS_PER_EPOCH

    plan = validate_plan({"interpolate": {"samples": 64, "alpha_points": 3}, "other": str(b)})
    (choice,) = plan.choices
    assert same_other(a / "analysis", choice, plan)  # nothing changed since: a rerun skips it
    shutil.copy(runs["A"] / "checkpoints" / "last.pt", last)  # same config and step, seed 0
    assert not same_other(a / "analysis", choice, plan)


# ------------------------------------------------------------------------------------------ 4. a full disk

def disk_full(monkeypatch, record_too: bool) -> None:
    """ENOSPC once a checkpoint's bytes are half written (the temp file is on disk); `record_too`: summary.json
    cannot be written either."""
    import torch

    from runner.rundir import RunDir

    def save(state, path):
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def write_summary(self, summary):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.summary_path))

    monkeypatch.setattr(torch, "save", save)
    if record_too:
        monkeypatch.setattr(RunDir, "write_summary", write_summary)


def test_a_full_disk_leaves_no_temp_file_and_a_failed_record(compose, tmp_path, monkeypatch, one_thread):
    """The checkpoint's temp file is deleted before the record is written (on a full disk it held the space the
    record needed); summary.json says failed with the error, and the line names it."""
    from runner.run import RunFailed, run

    disk_full(monkeypatch, record_too=False)
    with pytest.raises(RunFailed, match="No space left on device") as failed:
        run(compose(["trainer.epochs=1", *TINY]), tmp_path)
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert failed.value.unrecorded is None and f"the record: {tmp_path / 'summary.json'}" in failed.value.where


def test_a_record_that_cannot_be_written_is_not_claimed(compose, tmp_path, monkeypatch, one_thread):
    """Neither the checkpoint nor summary.json fits: RunFailed carries the training's error, and its line says no
    record was written (before the fix it named summary.json, which was not there)."""
    from runner.run import RunFailed, run

    disk_full(monkeypatch, record_too=True)
    with pytest.raises(RunFailed, match="No space left on device") as failed:
        run(compose(["trainer.epochs=1", *TINY]), tmp_path)
    assert not (tmp_path / "summary.json").exists()
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    assert "last.pt" in str(failed.value) and "summary.json" not in str(failed.value)  # the training's error
    assert failed.value.unrecorded is not None
    assert "no record was written" in failed.value.where and "summary.json," not in failed.value.where


FULL_DISK = """
import errno, os, runpy, sys
import torch
from runner.rundir import RunDir

def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
torch.save = full
RunDir.write_summary = full
sys.argv = ["runner", *sys.argv[1:]]
runpy.run_module("runner", run_name="__main__", alter_sys=True)
"""


def test_the_line_of_a_run_without_a_record_does_not_name_one(tmp_path):
    """The CLI's one line (exit 1) when neither checkpoint nor summary.json can be written: no `the record:`."""
    run = tmp_path / "run"
    out = runner_process(tmp_path, "trainer.epochs=1", *TINY, f"hydra.run.dir={run}",
                         prefix=[sys.executable, "-c", FULL_DISK])
    assert out.returncode == 1, out.stderr
    (line,) = lines(out.stderr)
    assert line.startswith("error: failed: ") and "No space left on device" in line, line
    assert "the record:" not in line and "no record was written" in line, line
    assert not (run / "summary.json").exists()


def test_adding_an_analysis_to_a_finished_run_honours_analysis_checkpoint(runs, tmp_path):
    """`python -m runner <the run's command> analysis=... analysis.checkpoint=...` on a finished run analyses the
    checkpoint named (before: always last.pt, silently), relative to the run directory, and refuses another run's
    checkpoint in one line with exit 2, filing nothing."""
    folder = copy_run(runs["A"], tmp_path / "A")
    command = ("trainer.epochs=2", *TINY, f"hydra.run.dir={folder}", *SHARPNESS)
    foreign = folder / "checkpoints" / "from_b.pt"
    shutil.copy(runs["B"] / "checkpoints" / "last.pt", foreign)
    out = runner_process(tmp_path, *command, "analysis.checkpoint=checkpoints/from_b.pt")
    assert out.returncode == 2, out.stderr
    (line,) = [x for x in lines(out.stderr) if not x.startswith("[")]
    assert "another run's checkpoint" in line and "seed 1" in line, line
    assert not (folder / "analysis").exists()
    out = runner_process(tmp_path, *command, "analysis.checkpoint=checkpoints/prev.pt")
    assert out.returncode == 0, out.stderr
    record = json.loads((folder / "analysis" / "sharpness.json").read_text())
    assert record["step"] == STEPS_PER_EPOCH and record["checkpoint"] == "checkpoints/prev.pt", record
