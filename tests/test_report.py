"""Sweep report: run discovery, grouping by signature, mean/std/Student-t CI over completed seeds, the CLI's
outputs (markdown, CSV, report folder, figures) and its one-line exit-2 errors.

The report reads real run directories: a module fixture runs a tiny sweep (2 optimizers x 3 seeds on the
bundled digits data) through the CLI once, another one a diverging and a failing run, a third SAM over three
rho (also under another experiment) for the labels. Expected numbers are
computed from each run's summary.json with numpy/scipy, independently of the report's code. Tests that need
a state no run leaves behind (a run still running, an interrupted one) copy a real run and change it.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import yaml
from omegaconf import OmegaConf

from runner.report import Stat, describe, drop_duplicates, find_runs, group_runs, main, summarize, t_975
from runner.spec import ADDED_KEYS
from runner.signature import IGNORED_KEYS, flatten, group_config, signature

try:
    from tests.conftest import runner_process
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from conftest import runner_process

ROOT = Path(__file__).resolve().parents[1]
TINY = ("trainer.epochs=2", "model.hidden=[16]", "logger=none", "trainer.progress=false")
OPTIMIZERS = ("sgd", "adamw")
SEEDS = (0, 1, 2)


# ------------------------------------------------------------------------------------------ real run dirs

@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real sweep `optimizer=sgd,adamw seed=0,1,2` (tiny, 2 epochs): 2 configs x 3 completed seeds."""
    cwd = tmp_path_factory.mktemp("report_sweep")
    out = runner_process(cwd, "-m", f"optimizer={','.join(OPTIMIZERS)}", f"seed={','.join(map(str, SEEDS))}",
                         *TINY, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    root = cwd / "multirun" / "default"
    assert len(summaries(root)) == 6, sorted(root.rglob("*"))
    return root


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """A real sweep with lr=1e6: on digits the run diverges, on mnist (corrupt files: they pass the up-front check
    of the sweep, then fail to load) it fails."""
    cwd = tmp_path_factory.mktemp("report_broken")
    root = cwd / "broken"
    raw = cwd / "nodata" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"not an idx file")
    out = runner_process(cwd, "-m", "dataset=digits,mnist", "optimizer.lr=1e6", f"dataset.root={cwd / 'nodata'}",
                         "dataset.download=false", f"hydra.sweep.dir={root}", *TINY, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]  # a sweep with failed jobs exits 1
    return root


@pytest.fixture(scope="module")
def sam_sweep(tmp_path_factory) -> Path:
    """Real SAM sweeps: `optimizer.rho=0.02,0.05,0.1 seed=0,1` (experiment default, same TINY settings as `sweep`),
    and `+experiment=sam_cifar optimizer.rho=0.02,0.05` shrunk to digits/mlp; returns the `multirun` folder."""
    cwd = tmp_path_factory.mktemp("report_sam")
    out = runner_process(cwd, "-m", "optimizer=sam", "optimizer.rho=0.02,0.05,0.1", "seed=0,1", *TINY, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    out = runner_process(cwd, "-m", "+experiment=sam_cifar", "dataset=digits", "model=mlp", "optimizer.rho=0.02,0.05",
                         *TINY, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    root = cwd / "multirun"
    assert len(summaries(root / "default")) == 6 and len(summaries(root / "sam_cifar")) == 2
    return root


def summaries(root: Path) -> list[Path]:
    """The summary.json files of the runs in a sweep folder `root` (`<config folder>/seed=N`), each once: a
    symlink to a config folder (a readable alias of it) is not a run of its own."""
    return sorted(p for p in root.glob("*/seed=*/summary.json") if not p.parent.parent.is_symlink())


def runs_on_disk(root: Path) -> dict[str, list[dict]]:
    """optimizer name -> the runs under `root` (dir, summary, config), read with json/yaml, sorted by seed."""
    runs: dict[str, list[dict]] = {}
    for path in summaries(root):
        config = yaml.safe_load((path.parent / ".hydra" / "config.yaml").read_text())
        runs.setdefault(config["optimizer"]["name"], []).append(
            {"dir": path.parent, "summary": json.loads(path.read_text()), "config": config})
    return {k: sorted(v, key=lambda r: r["config"]["seed"]) for k, v in runs.items()}


def expected_stat(values: list[float]) -> Stat:
    """Mean, std (ddof=1) and the 95% CI half-width from scipy's t interval around the mean with scale=sem."""
    x = np.asarray(values, dtype=float)
    mean = float(np.mean(x))
    low, high = scipy.stats.t.interval(0.95, len(x) - 1, loc=mean, scale=scipy.stats.sem(x))
    return Stat(mean, float(np.std(x, ddof=1)), (high - low) / 2, len(x))


def copy_group(sweep: Path, optimizer: str, dest: Path) -> Path:
    """A writable copy (without checkpoints) of the sweep's config folder for `optimizer`; returns it."""
    (src,) = {r["dir"].parent for r in runs_on_disk(sweep)[optimizer]}
    shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    return dest / src.name


def edit_summary(run_dir: Path, edit) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    edit(summary)
    (run_dir / "summary.json").write_text(json.dumps(summary))


def rows_by_signature(rows: list[dict]) -> dict[str, dict]:
    return {row["signature"]: row for row in rows}


# ------------------------------------------------------------------------------------------------ signature

def test_signature_ignores_seed_paths_device_and_logger(compose):
    cfg = OmegaConf.to_container(compose(["logger=none"]), resolve=True)
    other = OmegaConf.to_container(compose(["seed=7", "dataset.root=/elsewhere", "dataset.download=true",
                                            "trainer.device=cuda", "trainer.progress=true",
                                            "trainer.checkpoint_every=5", "logger=wandb"]), resolve=True)
    other["hydra"] = {"run": {"dir": "x"}}
    assert cfg != other
    assert signature(cfg) == signature(other)
    assert len(signature(cfg)) == 8 and len(signature(cfg, length=12)) == 12
    assert {"seed", "logger", "hydra"} <= set(IGNORED_KEYS)


@pytest.mark.parametrize("override", ["optimizer.lr=0.2", "model.hidden=[256]", "trainer.epochs=4",
                                      "+experiment=sgd_cifar", "dataset=mnist", "optimizer=adamw"])
def test_signature_changes_with_any_other_key(compose, override):
    assert signature(compose([override])) != signature(compose([]))


def test_group_config_is_a_deep_copy_without_ignored_keys(compose):
    cfg = OmegaConf.to_container(compose(["optimizer=sam"]), resolve=True)
    group = group_config(cfg)
    assert "seed" not in group and "logger" not in group
    assert "root" not in group["dataset"] and "device" not in group["trainer"]
    # keys added later are left out at their old-behaviour values (runner.spec.ADDED_KEYS), the rest is kept
    added = {k.split(".", 1)[1] for k in ADDED_KEYS if k.startswith("optimizer.")}
    assert group["optimizer"] == {k: v for k, v in cfg["optimizer"].items() if k not in added}
    assert added <= set(cfg["optimizer"])
    assert "root" in cfg["dataset"] and "seed" in cfg  # input untouched
    assert signature(OmegaConf.create(cfg)) == signature(cfg)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == {
        "a.b": 1, "a.c.d": [1, 2], "e": None, "f": {}}


@pytest.mark.slow
def test_stored_signature_is_the_one_computed_from_the_saved_config(sweep):
    runs = [r for rs in runs_on_disk(sweep).values() for r in rs]
    for run in runs:
        assert run["summary"]["signature"] == signature(run["config"]) == run["dir"].parent.name.rsplit("-", 1)[-1]
    assert len({r["summary"]["signature"] for r in runs}) == 2


# ------------------------------------------------------------------------------------------------ statistics

def test_t_quantiles_match_the_textbook_table():
    for df, value in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (120, 1.980), (10**6, 1.960)):
        assert t_975(df) == pytest.approx(value, abs=1e-3), df
    assert all(t_975(df) > t_975(df + 1) for df in range(1, 60))
    for df in (0, -1):
        with pytest.raises(ValueError):
            t_975(df)


def test_describe_small_samples():
    assert describe([]) == Stat(None, None, None, 0)
    assert describe([0.5]) == Stat(0.5, 0.0, None, 1)
    assert describe([1.0, 2.0, 4.0]) == pytest.approx(expected_stat([1.0, 2.0, 4.0]))
    assert describe([1.0, 2.0, 4.0]).ci95 == pytest.approx(3.7946, abs=1e-4)  # 4.3027 * sqrt(7/3) / sqrt(3)


# ------------------------------------------------------------------------------------- grouping, real sweep

@pytest.mark.slow
def test_real_sweep_is_two_groups_of_three_seeds(sweep):
    runs = find_runs([sweep])
    assert len(runs) == 6
    groups = group_runs(runs)
    on_disk = runs_on_disk(sweep)
    assert len(groups) == 2
    for group in groups:
        (optimizer,) = {r.config["optimizer"]["name"] for r in group.runs}
        assert group.signature == on_disk[optimizer][0]["summary"]["signature"]
        assert sorted(r.summary["seed"] for r in group.runs) == list(SEEDS)
        assert group.counts() == {"completed": 3, "diverged": 0, "failed": 0, "interrupted": 0, "cancelled": 0,
                                  "other": 0}
        assert f"optimizer.name={optimizer}" in group.label.split()


@pytest.mark.slow
def test_sam_rows_are_labelled_by_rho_beside_sgd(sweep, sam_sweep, tmp_path, capsys):
    """rho exists for sam, not for sgd: it tells the sam rows apart, and the sgd row reads by its name only."""
    copy_group(sweep, "sgd", tmp_path)
    assert main([str(sam_sweep / "default"), str(tmp_path), "--columns", "group", "n", "--out", str(tmp_path / "out"),
                 "--no-figures"]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert sorted(lines) == sorted([
        "| optimizer.name=sam optimizer.rho=0.02 | 2 |", "| optimizer.name=sam optimizer.rho=0.05 | 2 |",
        "| optimizer.name=sam optimizer.rho=0.1 | 2 |", "| optimizer.name=sgd | 3 |"])


@pytest.mark.slow
def test_labels_tell_rows_of_several_experiments_and_optimizers_apart(sweep, sam_sweep):
    groups = group_runs(find_runs([sweep, sam_sweep]))
    assert len(groups) == 2 + 3 + 2
    labels = [g.label for g in groups]
    assert len(set(labels)) == len(labels)
    for group in groups:
        assert group.signature not in group.label, group.label  # told apart without the hash
        config = flatten(group.config)
        pairs = dict(item.split("=", 1) for item in group.label.split())
        assert pairs["optimizer.name"] == config["optimizer.name"]
        assert pairs["experiment"] == config["experiment"]
        if config["optimizer.name"] == "sam":
            assert pairs["optimizer.rho"] == str(config["optimizer.rho"]), group.label
        else:
            assert not any(key.startswith("optimizer.rho") for key in pairs), group.label
        # keys that only some optimizers have are not shown when they are equal among those optimizers
        assert "optimizer.betas" not in pairs and "optimizer.momentum" not in pairs, group.label


@pytest.mark.slow
def test_statistics_match_numpy_and_scipy(sweep):
    rows = rows_by_signature(summarize(group_runs(find_runs([sweep])), "test/acc"))
    for optimizer, runs in runs_on_disk(sweep).items():
        row = rows[runs[0]["summary"]["signature"]]
        summaries = [r["summary"] for r in runs]
        assert (row["n"], row["completed"]) == (3, 3)
        final_acc = [s["final"]["test/acc"] for s in summaries]
        assert np.std(final_acc) > 0, "seeds gave equal accuracies: the CI check would be vacuous"
        assert row["final_test/acc"] == pytest.approx(expected_stat(final_acc)), optimizer
        assert row["best_test/acc"] == pytest.approx(expected_stat([s["best"]["test/acc"] for s in summaries]))
        assert row["final_test/loss"] == pytest.approx(expected_stat([s["final"]["test/loss"] for s in summaries]))
        assert row["wall_s"] == pytest.approx(np.mean([s["wall_s"] for s in summaries]))
        assert row["passes"] == pytest.approx(np.mean([s["passes"] for s in summaries]))


@pytest.mark.slow
def test_incomplete_runs_are_counted_not_averaged(sweep, tmp_path):
    group = copy_group(sweep, "sgd", tmp_path)
    finals = [r["summary"]["final"]["test/acc"] for r in runs_on_disk(sweep)["sgd"]]
    running, failed, interrupted, cancelled = (group / f"seed={s}" for s in (10, 11, 12, 13))
    for src, dst in zip([*SEEDS, SEEDS[0]], (running, failed, interrupted, cancelled)):
        shutil.copytree(group / f"seed={src}", dst)
    (running / "summary.json").unlink()  # no summary yet: still running
    edit_summary(failed, lambda s: s.update(status="failed", seed=11))
    edit_summary(interrupted, lambda s: s.update(status="interrupted", seed=12))  # e.g. preempted, to be requeued
    edit_summary(cancelled, lambda s: s.update(status="cancelled", seed=13))      # scancel
    (row,) = summarize(group_runs(find_runs([tmp_path])))
    assert (row["n"], row["completed"], row["failed"], row["diverged"], row["interrupted"], row["cancelled"],
            row["other"]) == (7, 3, 1, 0, 1, 1, 1)
    assert row["final_test/acc"] == pytest.approx(expected_stat(finals))


@pytest.mark.slow
def test_real_diverged_and_failed_runs_are_counted_in_their_own_groups(sweep, broken):
    statuses = sorted(json.loads(p.read_text())["status"] for p in summaries(broken))
    assert statuses == ["diverged", "failed"]
    alone = rows_by_signature(summarize(group_runs(find_runs([sweep]))))
    rows = rows_by_signature(summarize(group_runs(find_runs([sweep, broken]))))
    assert len(rows) == 4
    for signature_, row in alone.items():
        assert rows[signature_]["final_test/acc"] == row["final_test/acc"]
    bad = [row for s, row in rows.items() if s not in alone]
    assert sorted((r["diverged"], r["failed"], r["completed"], r["n"]) for r in bad) == [(0, 1, 0, 1), (1, 0, 0, 1)]
    for row in bad:
        assert row["final_test/acc"] == Stat(None, None, None, 0) and row["wall_s"] is None


@pytest.mark.slow
def test_signature_from_summary_without_config_and_from_config_without_stored_one(sweep, tmp_path):
    group = copy_group(sweep, "sgd", tmp_path)
    edit_summary(group / "seed=1", lambda s: s.pop("signature"))  # recomputed from .hydra/config.yaml
    (group / "seed=2" / ".hydra" / "config.yaml").unlink()  # taken from summary.json
    runs = find_runs([tmp_path])
    assert [r.config for r in runs if r.path.name == "seed=2"] == [{}]
    (only,) = group_runs(runs)
    assert only.signature == runs_on_disk(sweep)["sgd"][0]["summary"]["signature"]
    assert only.counts()["completed"] == 3
    assert only.label == "default"  # one group: labelled by its experiment


@pytest.mark.slow
def test_copies_of_runs_count_once_with_a_warning(sweep, tmp_path, capsys):
    """The same sgd runs given three times (copies) are 3 seeds, not 9 with a CI of ±0."""
    copies = [copy_group(sweep, "sgd", tmp_path / name) for name in "abc"]
    assert main([*(str(c.parent) for c in copies), "--format", "csv", "--no-figures", "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    (row,) = csv.DictReader(io.StringIO(captured.out))
    finals = [r["summary"]["final"]["test/acc"] for r in runs_on_disk(sweep)["sgd"]]
    assert (int(row["n"]), int(row["completed"])) == (3, 3)
    got = [float(row[f"final_test/acc_{f}"]) for f in ("mean", "std", "ci95")] + [int(row["final_test/acc_n"])]
    assert got == pytest.approx(list(expected_stat(finals)))
    warning, done = captured.err.splitlines()
    prefix = "report: 6 duplicate runs of the same (config, seed) left out: "
    assert warning.startswith(prefix)
    # equal mtimes (copytree keeps them): the first found is kept
    assert sorted(warning.removeprefix(prefix).split(", ")) == sorted(
        str(c / f"seed={seed}") for c in copies[1:] for seed in SEEDS)
    assert done.startswith("report: 3 runs in 1 groups")


@pytest.mark.slow
def test_drop_duplicates_keeps_completed_else_newest_and_runs_without_seed(sweep, tmp_path):
    a, b, c = (copy_group(sweep, "sgd", tmp_path / name) for name in "abc")
    # seed 0: a is completed, b is interrupted but newer, c is still running (no summary; seed from its config)
    edit_summary(b / "seed=0", lambda s: s.update(status="interrupted"))
    os.utime(b / "seed=0" / "summary.json", (2e9, 2e9))
    (c / "seed=0" / "summary.json").unlink()
    # seed 1: nothing completed; the newest summary (b's) is kept
    for run, mtime in ((a, 2e9), (b, 2.1e9), (c, 1.9e9)):
        edit_summary(run / "seed=1", lambda s: s.update(status="failed"))
        os.utime(run / "seed=1" / "summary.json", (mtime, mtime))
    # seed 2: no seed in summary or config: never deduplicated
    for run in (a, b, c):
        edit_summary(run / "seed=2", lambda s: s.pop("seed"))
        config = yaml.safe_load((run / "seed=2" / ".hydra" / "config.yaml").read_text())
        del config["seed"]
        (run / "seed=2" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    runs = find_runs([tmp_path])
    kept, dropped = drop_duplicates(runs)
    assert sorted(r.path for r in dropped) == sorted([b / "seed=0", c / "seed=0", a / "seed=1", c / "seed=1"])
    assert sorted(r.path for r in kept) == sorted([a / "seed=0", b / "seed=1", a / "seed=2", b / "seed=2", c / "seed=2"])
    assert [r for r in runs if r in kept] == kept  # order kept
    assert {r.seed for r in kept} == {0, 1, None}


@pytest.mark.slow
def test_sharpness_in_summaries_becomes_a_column(sweep, tmp_path):
    """The trainer writes no sharpness; an analysis adds `sharpness/*` to a summary's final, so edit real ones."""
    group = copy_group(sweep, "sgd", tmp_path)
    for seed, top in zip(SEEDS, (10.0, 14.0, 12.0)):
        edit_summary(group / f"seed={seed}", lambda s, top=top: s["final"].update({"sharpness/hessian_top": top}))
    (row,) = summarize(group_runs(find_runs([tmp_path])))
    assert row["final_sharpness/hessian_top"] == pytest.approx(expected_stat([10.0, 14.0, 12.0]))
    assert row["final_sharpness/hessian_top"].mean == pytest.approx(12.0)


# ------------------------------------------------------------------------------------------------------ CLI

@pytest.mark.slow
def test_cli_csv_parses_and_figures_are_written(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sweep), "--format", "csv", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = rows_by_signature(list(csv.DictReader(io.StringIO(stdout))))
    assert len(rows) == 2
    for optimizer, runs in runs_on_disk(sweep).items():
        row = rows[runs[0]["summary"]["signature"]]
        want = expected_stat([r["summary"]["final"]["test/acc"] for r in runs])
        got = [float(row[f"final_test/acc_{f}"]) for f in ("mean", "std", "ci95")] + [int(row["final_test/acc_n"])]
        assert got == pytest.approx(list(want)), optimizer
        assert (int(row["completed"]), int(row["failed"]), int(row["diverged"]), int(row["other"])) == (3, 0, 0, 0)
    assert (out / "report.csv").read_text() == stdout
    assert "final_test/acc" in (out / "report.md").read_text()
    for name in ("curves.png", "bars.png", "cost.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (out / name).stat().st_size > 5000, name  # axes, curves and labels, not an empty canvas
    assert "cost.png" in (out / "report.md").read_text()


@pytest.mark.slow
def test_cli_markdown_default_out_and_columns(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    for optimizer in OPTIMIZERS:
        copy_group(sweep, optimizer, copy)
    assert main([str(copy), "--no-figures", "--columns", "group,completed", "final"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| group | completed | final_test/acc |"
    assert len(lines) == 4
    want = expected_stat([r["summary"]["final"]["test/acc"] for r in runs_on_disk(sweep)["sgd"]])
    assert 0.1 <= want.mean < 1  # shown with 4 decimals
    (sgd,) = [line for line in lines if "optimizer.name=sgd" in line]
    assert sgd.endswith(f" | 3 | {want.mean:.4f} ± {want.std:.4f} [±{want.ci95:.4f}] |")
    assert (copy / "report" / "report.md").exists() and not (copy / "report" / "curves.png").exists()
    # the report folder inside the sweep is not mistaken for a run on the next call
    assert main([str(copy), "--no-figures", "--metric", "test/loss"]) == 0
    assert len(find_runs([copy])) == 6


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line(tmp_path, sweep, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert "no runs found under" in one_line_error(capsys, [str(tmp_path / "empty")])
    err = one_line_error(capsys, [str(sweep), "--metric", "test/acc5"])
    assert "unknown metric" in err and "test/acc" in err and "train/loss" in err
    assert "unknown column" in one_line_error(capsys, [str(sweep), "--columns", "nope"])
    assert not (sweep / "report").exists()  # nothing written on bad input


UNWRITABLE = {
    "under a file": lambda tmp: tmp / "file" / "out",
    "a file": lambda tmp: tmp / "file",
    "under /proc": lambda tmp: Path("/proc/forbidden"),
    "read-only folder": lambda tmp: tmp / "ro",
    "under a read-only folder": lambda tmp: tmp / "ro" / "out",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", UNWRITABLE)
def test_unwritable_out_is_one_line_and_exit_2_before_the_table(sweep, tmp_path, capsys, case):
    if "read-only" in case and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    if case == "under /proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc")
    (tmp_path / "file").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o500)
    out = UNWRITABLE[case](tmp_path)
    try:
        assert main([str(sweep), "--out", str(out)]) == 2
    finally:
        (tmp_path / "ro").chmod(0o700)
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing half-done shown
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"report: cannot write {out}: "), captured.err
    assert not (tmp_path / "ro" / "out").exists()


@pytest.mark.slow
def test_out_file_that_cannot_be_written_is_one_line_and_exit_2(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "report.csv").mkdir(parents=True)  # the folder is writable, report.csv is not a file
    assert main([str(sweep), "--out", str(out), "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"report: cannot write {out / 'report.csv'}: Is a directory"]


def test_cli_subprocess_missing_dir(tmp_path):
    missing = tmp_path / "does-not-exist"
    proc = subprocess.run([sys.executable, "-m", "runner.report", str(missing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"report: no such directory: {missing}"]


@pytest.mark.slow
def test_partial_sweep_with_nothing_finished(sweep, tmp_path, capsys):
    group = copy_group(sweep, "sgd", tmp_path / "sweep")
    for seed in SEEDS:
        (group / f"seed={seed}" / "summary.json").unlink()
    (group / "seed=0" / "metrics.jsonl").write_text("")  # just started: nothing logged yet
    out = tmp_path / "out"
    assert main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    (row,) = summarize(group_runs(find_runs([tmp_path / "sweep"])))
    assert (row["n"], row["completed"], row["other"]) == (3, 0, 3)
    assert row["final_test/acc"] == Stat(None, None, None, 0) and row["wall_s"] is None
    assert (out / "curves.png").exists() and (out / "bars.png").exists()


@pytest.mark.slow
def test_metric_missing_from_summary_falls_back_on_metrics_jsonl(sweep, tmp_path):
    run_dir = copy_group(sweep, "sgd", tmp_path) / "seed=0"
    for other in SEEDS[1:]:
        shutil.rmtree(run_dir.parent / f"seed={other}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["test/loss"] for r in records if "test/loss" in r]
    accs = [r["test/acc"] for r in records if "test/acc" in r]
    assert len(set(losses)) > 1 and len(set(accs)) > 1, "min and max must differ for the test to tell them apart"

    def drop(summary):
        del summary["final"]["test/loss"], summary["best"]["test/acc"]

    edit_summary(run_dir, drop)
    (run,) = find_runs([tmp_path])
    assert run.final_value("test/loss") == pytest.approx(losses[-1])  # last logged value
    assert run.final_value("val/acc") is None
    assert run.best("test/loss") == pytest.approx(min(losses))  # lower is better
    assert run.best("test/acc") == pytest.approx(max(accs))  # higher is better
    (row,) = summarize(group_runs([run]), "test/loss")
    assert row["final_test/loss"] == pytest.approx(Stat(losses[-1], 0.0, None, 1))


# ------------------------------------------------------------------------- fake run dirs (fast, in-process)
# Run folders written here in the real on-disk format (.hydra/config.yaml composed from conf/, summary.json,
# metrics.jsonl), so these tests need no CLI run.

def fake_run(path: Path, config: dict, seed: int, acc: float = 0.9, status: str = "completed") -> Path:
    """A run folder of `config` (a composed, resolved config) and `seed`, with `acc` as its test accuracy."""
    config = {**config, "seed": seed}
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": 10 * e, "epoch": e, "test/acc": acc - 0.1 / e, "test/loss": 1.0 / e}) + "\n"
        for e in (1, 2)))
    (path / "summary.json").write_text(json.dumps({
        "status": status, "final": {"test/acc": acc, "test/loss": 0.5}, "best": {"test/acc": acc, "epoch": 2},
        "seed": seed, "epochs": 2, "steps": 20, "passes": 20, "wall_s": 1.5, "error": None,
        "signature": signature(config)}))
    return path


@pytest.fixture
def configs(compose):
    """`configs(*overrides)` -> the resolved config `python -m runner <overrides>` would run."""
    return lambda *overrides: OmegaConf.to_container(compose(list(overrides)), resolve=True)


def labels_of(root: Path, *label_keys: str) -> list[str]:
    groups = group_runs(find_runs([root]), list(label_keys)) if label_keys else group_runs(find_runs([root]))
    return [g.label for g in groups]


# The ad-hoc runs a user makes one after another, without a sweep: each changes one or two things.
AD_HOC = {
    "sgd": [],
    "sam": ["optimizer=sam"],
    "sam rho=0.1": ["optimizer=sam", "optimizer.rho=0.1"],
    "adamw": ["optimizer=adamw", "optimizer.lr=1e-3"],
    "cnn": ["model=cnn"],
}


def test_ad_hoc_runs_are_labelled_by_the_keys_that_tell_them_apart(configs, tmp_path):
    """Not every key that differs anywhere (~15 each: lr, momentum, betas, model widths, ...): the few that
    tell the groups apart, the option names first."""
    for i, (name, overrides) in enumerate(AD_HOC.items()):
        fake_run(tmp_path / f"run{i}", configs(*overrides), seed=0)
    assert labels_of(tmp_path) == [
        "model.name=mlp optimizer.name=sgd",
        "model.name=mlp optimizer.name=sam optimizer.rho=0.05",
        "model.name=mlp optimizer.name=sam optimizer.rho=0.1",
        "model.name=mlp optimizer.name=adamw",
        "model.name=cnn optimizer.name=sgd",
    ]


def test_a_preset_is_named_by_its_experiment_not_by_the_keys_it_sets(configs, tmp_path):
    fake_run(tmp_path / "a", configs("optimizer=sam"), seed=0)
    fake_run(tmp_path / "b", configs("+experiment=sam_cifar", "dataset=digits", "model=mlp"), seed=0)
    fake_run(tmp_path / "c", configs("+experiment=sam_cifar", "dataset=digits", "model=mlp", "optimizer.rho=0.1"), 0)
    assert labels_of(tmp_path) == ["experiment=default optimizer.rho=0.05", "experiment=sam_cifar optimizer.rho=0.05",
                                   "experiment=sam_cifar optimizer.rho=0.1"]


def test_groups_with_the_same_effective_config_are_told_apart_by_signature(configs, tmp_path):
    """sam over adamw ignores `momentum`: two such runs differ in their saved config only; the label says so by
    the signature instead of showing an unused value."""
    a = fake_run(tmp_path / "a", configs("optimizer=sam", "optimizer.base=adamw"), seed=0)
    b = fake_run(tmp_path / "b", configs("optimizer=sam", "optimizer.base=adamw", "optimizer.momentum=0.5"), seed=0)
    groups = group_runs(find_runs([tmp_path]))
    assert len(groups) == 2
    for group, run in zip(groups, (a, b)):
        assert group.label == f"[{group.signature}]" and group.runs[0].path == run


def test_a_wrappers_label_shows_the_lr_its_base_steps_with(configs, tmp_path):
    """`optimizer=sam 'optimizer.base={name:lion,lr:1e-4}'` saves sam's unused `lr: 0.05`: the label must not
    read `optimizer.lr=0.05`."""
    fake_run(tmp_path / "adamw", configs("optimizer=adamw", "optimizer.lr=1e-3"), seed=0)
    fake_run(tmp_path / "lion1", configs("optimizer=sam", "optimizer.base={name:lion,lr:1e-4}"), seed=0)
    fake_run(tmp_path / "lion3", configs("optimizer=sam", "optimizer.base={name:lion,lr:3e-4}"), seed=0)
    fake_run(tmp_path / "sgd", configs("optimizer=sam"), seed=0)
    labels = labels_of(tmp_path)
    assert not any("optimizer.lr=0.05" in label.split() and "lion" in label for label in labels), labels
    assert labels == ["optimizer.name=adamw optimizer.lr=0.001",
                      "optimizer.name=sam optimizer.base=lion optimizer.lr=0.0001",
                      "optimizer.name=sam optimizer.base=lion optimizer.lr=0.0003",
                      "optimizer.name=sam optimizer.base=sgd optimizer.lr=0.05"]
    assert labels_of(tmp_path, "optimizer.lr,optimizer.weight_decay,optimizer.momentum") == [
        "optimizer.lr=0.001 optimizer.weight_decay=0.01",
        "optimizer.lr=0.0001 optimizer.weight_decay=0.0005",  # lion takes sam's weight decay, not its momentum
        "optimizer.lr=0.0003 optimizer.weight_decay=0.0005",
        "optimizer.lr=0.05 optimizer.weight_decay=0.0005 optimizer.momentum=0.9"]


def test_effective_config_is_what_the_registry_hands_to_the_base_optimizer():
    """Oracle: the optimizer registry's own validation (`Wraps.validate_nested`). For every wrapper over every
    base it accepts, flat (`optimizer.base=adamw`) and nested (`optimizer.base={name: adamw, lr: ...}`) spelling,
    the effective config's shared keys are the values the optimizer that takes the step got, and only those."""
    from runner.config import ConfigError
    from runner.optim import OPTIMIZERS, SHARED, Wraps
    from runner.report import effective_config

    wrappers = [n for n in OPTIMIZERS.names() if issubclass(OPTIMIZERS.get(n).schema, Wraps)]
    # every wrapper over sgd and adamw, and sam and gsam over every optimizer (wrappers among them)
    pairs = [(w, b) for w in wrappers for b in ("sgd", "adamw")] + [(w, b) for w in ("sam", "gsam")
                                                                     for b in OPTIMIZERS.names()]
    checked = set()
    for (wrapper, base), nested in itertools.product(dict.fromkeys(pairs), (False, True)):
        node = yaml.safe_load((ROOT / "conf" / "optimizer" / f"{wrapper}.yaml").read_text())
        spelled = {"name": base, "lr": 0.0123, "weight_decay": 0.25} if nested else base
        config = {"optimizer": {**node, "base": spelled}, "model": {"name": "mlp"}}
        try:
            choice = OPTIMIZERS.validate(config["optimizer"])
        except ConfigError:  # not a base this wrapper takes (MoMo, a multi-pass method)
            continue
        stepper = choice  # the optimizer that takes the step (a wrapper's base may be a wrapper)
        while isinstance(stepper.params, Wraps):
            stepper = stepper.params.base
        effective = effective_config(config)
        assert effective["model"] == config["model"] and config["optimizer"]["base"] == spelled  # a copy
        got = {k: v for k, v in effective["optimizer"].items() if k in SHARED}
        want = {k: getattr(stepper.params, k) for k in SHARED if hasattr(stepper.params, k)}
        assert got == want, (wrapper, spelled)
        base_name = effective["optimizer"]["base"]
        assert (base_name if isinstance(base_name, str) else base_name["name"]) == base
        assert {k: v for k, v in effective["optimizer"].items() if k not in SHARED and k != "base"} == {
            k: v for k, v in node.items() if k not in SHARED and k != "base"}
        checked.add((wrapper, base, nested))
    assert {("sam", "lion", True), ("sam", "adamw", False), ("gsam", "sgd", True)} <= checked and len(checked) > 40
    # a plain optimizer, and an optimizer this code does not know, are left as they are
    for node in ({"name": "sgd", "lr": 0.1, "momentum": 0.9}, {"name": "gone", "lr": 1.0, "base": "sgd"}):
        assert effective_config({"optimizer": node}) == {"optimizer": node}


def test_label_option_chooses_the_keys_and_a_bad_key_is_one_line(configs, tmp_path, capsys):
    for i, (name, overrides) in enumerate(AD_HOC.items()):
        fake_run(tmp_path / "runs" / f"run{i}", configs(*overrides), seed=0)
    argv = [str(tmp_path / "runs"), "--no-figures", "--out", str(tmp_path / "out"), "--columns", "group"]
    assert main([*argv, "--label", "optimizer,optimizer.rho,model"]) == 0  # `optimizer`: short for optimizer.name
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| optimizer.name=sgd model.name=mlp |", "| optimizer.name=sam optimizer.rho=0.05 model.name=mlp |",
        "| optimizer.name=sam optimizer.rho=0.1 model.name=mlp |", "| optimizer.name=adamw model.name=mlp |",
        "| optimizer.name=sgd model.name=cnn |"]
    # keys that leave groups alike: the signature tells them apart
    groups = group_runs(find_runs([tmp_path / "runs"]), ["optimizer.lr"])
    assert [g.label for g in groups] == [f"optimizer.lr={lr} [{g.signature}]" if lr == 0.05 else f"optimizer.lr={lr}"
                                         for lr, g in zip((0.05, 0.05, 0.05, 0.001, 0.05), groups)]
    argv[argv.index("--out") + 1] = str(tmp_path / "bad")
    for bad in ("optimizer.nope", "optimizer.name,trainer.nope", ","):
        err = one_line_error(capsys, [*argv, "--label", bad])
        assert err.startswith("report: "), err
        if bad != ",":
            assert f"unknown label key(s) {bad.split(',')[-1]};" in err and "optimizer.rho" in err, err
    assert not (tmp_path / "bad").exists()  # nothing written on bad input


def test_accuracy_ci_is_clipped_to_0_1_and_each_bar_says_n(configs, tmp_path, monkeypatch):
    """Two seeds at 0.99 and 0.94: the Student-t half-width (t = 12.7) is 0.32, past accuracy 1.0."""
    import matplotlib.figure
    from matplotlib.container import ErrorbarContainer

    from runner.report import plot_bars

    fake_run(tmp_path / "runs" / "a0", configs(), seed=0, acc=0.99)
    fake_run(tmp_path / "runs" / "a1", configs(), seed=1, acc=0.94)
    fake_run(tmp_path / "runs" / "b0", configs("optimizer=adamw"), seed=0, acc=0.5)  # one seed: no interval
    fake_run(tmp_path / "runs" / "c0", configs("optimizer=sam"), seed=0, acc=0.7, status="failed")  # none completed
    groups = group_runs(find_runs([tmp_path / "runs"]))
    rows = summarize(groups)
    two = rows[0]["final_test/acc"]
    assert two.n == 2 and two.mean + two.ci95 > 1.0

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig))
    plot_bars(groups, rows, "test/acc", tmp_path / "bars.png")
    (ax,) = drawn[0].axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    (segment,) = bars[0].lines[2][0].get_segments()  # the first group's interval, the only one with two seeds
    assert sorted(segment[:, 0]) == pytest.approx([two.mean - two.ci95, 1.0])
    assert all(c.lines[2][0].get_segments()[0][:, 0].max() <= 1.0 for c in bars)
    assert ax.get_xlim()[1] <= 1.02
    texts = [t.get_text() for t in ax.texts]
    assert texts == [f"{two.mean:.4f} (n=2)", "0.5000 (n=1, no CI)", "n=0: no completed run"], texts


def test_ci_interval_is_clipped_only_for_accuracies_in_0_1():
    from runner.report import ci_interval, unit_interval

    two = describe([0.99, 0.94])
    assert ci_interval(two, bounded=True) == pytest.approx((two.mean - two.ci95, 1.0))
    assert ci_interval(Stat(0.2, 0.1, 0.5, 2), bounded=True) == pytest.approx((0.0, 0.7))
    assert ci_interval(Stat(0.9, 0.1, 0.3, 2)) == pytest.approx((0.6, 1.2))  # a loss is not clipped
    assert ci_interval(Stat(0.9, 0.0, None, 1), bounded=True) is None
    assert unit_interval("test/acc", [0.99, 0.94]) and unit_interval("test/balanced_acc", [0.5])
    assert not unit_interval("test/loss", [0.5]) and not unit_interval("test/acc", [97.5, 96.0])  # in percent


@pytest.mark.slow
def test_long_labels_give_no_layout_warning(configs, tmp_path, capsys):
    """matplotlib's "Tight layout not applied" warning reached stderr when group labels were long (every key
    that differs anywhere): the labels are short now, and a long one (`--label` with many keys) is wrapped."""
    import warnings

    from runner.report import select_columns, write_report

    for i, (name, overrides) in enumerate(AD_HOC.items()):
        for seed in (0, 1):
            fake_run(tmp_path / "runs" / f"run{i}" / f"seed={seed}", configs(*overrides), seed, acc=0.9 - 0.01 * seed)
    fake_run(tmp_path / "runs" / "preset", configs("+experiment=sam_cifar", "dataset=digits", "model=mlp"), seed=0)
    many = ("experiment,dataset.name,dataset.batch_size,model.name,model.hidden,loss.name,optimizer.name,"
            "optimizer.base,optimizer.rho,optimizer.lr,optimizer.momentum,optimizer.weight_decay,optimizer.betas,"
            "scheduler.name,trainer.epochs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
        assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
        assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out2"), "--label", many]) == 0
        groups = group_runs(find_runs([tmp_path / "runs"]))
        for group in groups:  # one unbreakable label, as long as a config folder's name
            group.label = "x" * 300 if group is groups[0] else " ".join([group.label] * 12)
        rows = summarize(groups)
        write_report(tmp_path / "out3", groups, rows, select_columns(rows, None, "test/acc"), "test/acc")
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    err = capsys.readouterr().err.splitlines()
    assert [line.split(";")[0] for line in err] == ["report: 11 runs in 6 groups"] * 2, err
    for out in ("out", "out2", "out3"):
        assert (tmp_path / out / "bars.png").stat().st_size > 5000


def test_a_summary_of_valid_json_with_wrong_types_is_an_unreadable_run(configs, tmp_path, capsys):
    """`"final": [...]`, `"best": "x"`, a summary that is a list or torn: counted (as other), named, never
    averaged; the other runs are reported."""
    from runner.rundir import RunDir
    from runner.run import check_owner

    config = configs()
    accs = (0.9, 0.8, 0.85)
    for seed, acc in enumerate(accs):
        fake_run(tmp_path / "runs" / f"seed={seed}", config, seed, acc=acc)
    broken = {"final": lambda s: s.update(final=[0.5]), "best": lambda s: s.update(best="x"),
              "seed": lambda s: s.update(seed="7"), "status": lambda s: s.update(status=["completed"])}
    for seed, (name, edit) in enumerate(broken.items(), start=3):
        edit_summary(fake_run(tmp_path / "runs" / f"seed={seed}", config, seed), edit)
    for seed, text in ((7, "[1, 2]"), (8, '{"status": "comp')):
        (fake_run(tmp_path / "runs" / f"seed={seed}", config, seed) / "summary.json").write_text(text)

    assert main([str(tmp_path / "runs"), "--format", "csv", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    (row,) = csv.DictReader(io.StringIO(captured.out))
    assert (int(row["n"]), int(row["completed"]), int(row["other"])) == (9, 3, 6)
    got = [float(row[f"final_test/acc_{f}"]) for f in ("mean", "std", "ci95")] + [int(row["final_test/acc_n"])]
    assert got == pytest.approx(list(expected_stat(list(accs))))
    note, done = captured.err.splitlines()
    assert note.startswith("report: 6 runs with an unreadable summary, counted as other, not averaged: ")
    for seed, why in ((3, '"final" is a list, not an object'), (4, '"best" is a string, not an object'),
                      (5, '"seed" is a string, not an integer or null'), (6, '"status" is a list, not a string'),
                      (7, "not a JSON object but a list"), (8, "summary.json is not JSON (torn or corrupt)")):
        assert f"{tmp_path / 'runs' / f'seed={seed}'} (" in note and why in note, (seed, note)
    assert done.startswith("report: 9 runs in 1 groups")

    # the rerun of such a run (python -m runner, a sweep): no summary to trust, no crash
    for seed in range(3, 9):
        record = RunDir(tmp_path / "runs" / f"seed={seed}", create=False)
        assert record.read_summary() is None
        check_owner(record, signature(config), seed)  # nothing read, nothing to refuse
    assert RunDir(tmp_path / "runs" / "seed=0", create=False).read_summary()["final"]["test/acc"] == 0.9


def test_a_metric_measured_once_per_run_sends_the_reader_to_the_bars(sweep, tmp_path):
    """A post-hoc analysis's number is in each run's analysis/<name>.json, not in metrics.jsonl: curves.png has no
    curve to draw and says where the number is (bars.png), not that no run has it."""
    from runner.report import no_curve

    group = copy_group(sweep, "sgd", tmp_path)
    groups = group_runs(find_runs([group]))
    assert no_curve(groups, "hessian/lambda_max") == "no completed runs with this metric"
    for run in group.glob("seed=*"):
        (run / "analysis").mkdir(exist_ok=True)
        (run / "analysis" / "hessian.json").write_text(json.dumps({"name": "hessian", "scalars": {"hessian/lambda_max": 1.5}}))
    groups = group_runs(find_runs([group]))
    assert "see bars.png" in no_curve(groups, "hessian/lambda_max")
    assert no_curve(groups, "test/acc_never_logged") == "no completed runs with this metric"
