"""Sweep report: run discovery, grouping by signature, mean/std/Student-t CI over completed seeds, the CLI's
outputs (markdown, CSV, report folder, figures) and its one-line exit-2 errors. Fake sweeps are written to
tmp_path, so the tests are fast and need no training."""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from runner.report import Stat, describe, find_runs, group_runs, main, summarize, t_975
from runner.signature import IGNORED_KEYS, flatten, group_config, signature

ROOT = Path(__file__).resolve().parents[1]
T_DF2 = 4.303  # t_{0.975} with 2 degrees of freedom

BASE = {
    "seed": 0,
    "experiment": "mnist_sam",
    "dataset": {"name": "mnist", "root": "/data/mnist", "download": True, "batch_size": 128},
    "model": {"name": "mlp", "hidden": 128},
    "loss": {"name": "cross_entropy"},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "scheduler": {"name": "cosine"},
    "trainer": {"epochs": 3, "device": "cpu", "progress": False},
    "logger": {"name": "jsonl", "every": 10},
}
SAM = {"name": "sam", "lr": 0.1, "rho": 0.05}

# Final test/acc, final test/loss, best test/acc, wall_s and passes of the three completed seeds per config.
ACC = {"sgd": [0.90, 0.92, 0.94], "sam": [0.95, 0.96, 0.98]}
LOSS = {"sgd": [0.30, 0.28, 0.25], "sam": [0.20, 0.18, 0.15]}
BEST = {"sgd": [0.91, 0.92, 0.95], "sam": [0.95, 0.97, 0.98]}
WALL = {"sgd": [10.0, 11.0, 12.0], "sam": [20.0, 22.0, 24.0]}


def make_config(optimizer: str = "sgd", seed: int = 0, **changes) -> dict:
    cfg = copy.deepcopy(BASE)
    cfg["seed"] = seed
    cfg["optimizer"] = copy.deepcopy(SAM) if optimizer == "sam" else cfg["optimizer"]
    cfg.update(changes)
    return cfg


def write_run(path: Path, cfg: dict, status: str | None = "completed", acc: float = 0.9, loss: float = 0.3,
              best: float | None = None, wall_s: float = 10.0, passes: int = 6, store_signature: bool = True,
              extra_final: dict | None = None, epochs: int = 3) -> Path:
    """A fake run dir: .hydra/config.yaml, overrides.yaml, metrics.jsonl and (unless status is None) summary."""
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), path / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"seed={cfg['seed']}"]), path / ".hydra" / "overrides.yaml")
    with open(path / "metrics.jsonl", "w") as f:
        for epoch in range(1, epochs + 1):  # linear ramp up to the final accuracy
            f.write(json.dumps({"step": 10 * epoch, "epoch": epoch, "train/loss": 1.0 / epoch}) + "\n")
            f.write(json.dumps({"step": 10 * epoch, "epoch": epoch, "test/acc": acc - 0.1 * (epochs - epoch),
                                "test/loss": loss + 0.1 * (epochs - epoch)}) + "\n")
    if status is not None:
        summary = {
            "status": status,
            "final": {"test/acc": acc, "test/loss": loss, "train/loss": 0.01, **(extra_final or {})},
            "best": {"test/acc": best if best is not None else acc, "epoch": epochs},
            "seed": cfg["seed"], "epochs": epochs, "steps": 10 * epochs, "passes": passes, "wall_s": wall_s,
            "error": None, "group": group_config(cfg), "versions": {}, "git": {"rev": "abc", "dirty": False},
            "device": "cpu",
        }
        if store_signature:
            summary["signature"] = signature(cfg)
        (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 configs x 3 completed seeds, plus a failed sgd run and a diverged sam run."""
    root = tmp_path / "sweep"
    for opt in ("sgd", "sam"):
        for seed in range(3):
            write_run(root / f"optimizer={opt}" / f"seed={seed}", make_config(opt, seed), acc=ACC[opt][seed],
                      loss=LOSS[opt][seed], best=BEST[opt][seed], wall_s=WALL[opt][seed], passes=6,
                      store_signature=seed != 1)  # seed 1: the report recomputes the signature
    write_run(root / "optimizer=sgd" / "seed=3", make_config("sgd", 3), status="failed", acc=0.1)
    write_run(root / "optimizer=sam" / "seed=3", make_config("sam", 3), status="diverged", acc=0.1,
              loss=float("nan"))
    return root


def by_label(rows: list[dict]) -> dict[str, dict]:
    return {row["group"]: row for row in rows}


def hand_stats(values: list[float]) -> tuple[float, float, float]:
    x = np.array(values)
    std = x.std(ddof=1)
    return x.mean(), std, T_DF2 * std / math.sqrt(len(x))


# ------------------------------------------------------------------------------------------------ signature

def test_signature_ignores_seed_paths_device_and_logger():
    cfg = make_config("sgd", 0)
    other = make_config("sgd", 7)
    other["dataset"]["root"] = "/elsewhere"
    other["dataset"]["download"] = False
    other["trainer"]["device"] = "cuda"
    other["trainer"]["progress"] = True
    other["logger"] = {"name": "wandb"}
    other["hydra"] = {"run": {"dir": "x"}}
    other["run_dir"] = "/tmp/run"
    assert signature(cfg) == signature(other)
    assert len(signature(cfg)) == 8 and len(signature(cfg, length=12)) == 12
    assert {"seed", "logger", "hydra", "run_dir"} <= set(IGNORED_KEYS)


@pytest.mark.parametrize("key,value", [("optimizer.lr", 0.2), ("model.hidden", 256), ("trainer.epochs", 4),
                                       ("experiment", "other"), ("dataset.name", "cifar10")])
def test_signature_changes_with_any_other_key(key, value):
    cfg = make_config("sgd")
    changed = copy.deepcopy(cfg)
    *parents, last = key.split(".")
    node = changed
    for part in parents:
        node = node[part]
    node[last] = value
    assert signature(changed) != signature(cfg)


def test_group_config_is_a_deep_copy_without_ignored_keys():
    cfg = make_config("sam")
    group = group_config(cfg)
    assert "seed" not in group and "logger" not in group
    assert "root" not in group["dataset"] and "device" not in group["trainer"]
    assert cfg["dataset"]["root"] == "/data/mnist"  # input untouched
    assert signature(OmegaConf.create(cfg)) == signature(cfg)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == {
        "a.b": 1, "a.c.d": [1, 2], "e": None, "f": {}}


# ------------------------------------------------------------------------------------------------ statistics

def test_t_quantiles():
    assert t_975(2) == pytest.approx(T_DF2)
    assert t_975(1) == pytest.approx(12.71)
    assert t_975(30) == pytest.approx(2.042)
    assert t_975(40) == pytest.approx(2.021, abs=1e-3)
    assert t_975(120) == pytest.approx(1.980, abs=1e-3)
    assert t_975(10**6) == pytest.approx(1.96, abs=1e-3)
    assert all(t_975(df) > t_975(df + 1) for df in range(1, 60))


def test_describe_small_samples():
    assert describe([]) == Stat(None, None, None, 0)
    assert describe([0.5]) == Stat(0.5, 0.0, None, 1)
    mean, std, ci = hand_stats([1.0, 2.0, 4.0])
    assert describe([1.0, 2.0, 4.0]) == pytest.approx(Stat(mean, std, ci, 3))


# ------------------------------------------------------------------------------------------------- grouping

def test_find_and_group_runs(sweep):
    runs = find_runs([sweep])
    assert len(runs) == 8
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["optimizer.name=sam", "optimizer.name=sgd"]
    sam, sgd = groups
    assert sgd.counts() == {"completed": 3, "diverged": 0, "failed": 1, "other": 0}
    assert sam.counts() == {"completed": 3, "diverged": 1, "failed": 0, "other": 0}
    assert len({r.signature for r in sgd.runs}) == 1


def test_summary_statistics_match_hand_computation(sweep):
    rows = by_label(summarize(group_runs(find_runs([sweep])), "test/acc"))
    for opt, label in (("sgd", "optimizer.name=sgd"), ("sam", "optimizer.name=sam")):
        row = rows[label]
        assert (row["n"], row["completed"]) == (4, 3)
        for column, values in (("final_test/acc", ACC[opt]), ("best_test/acc", BEST[opt]),
                               ("final_test/loss", LOSS[opt])):
            mean, std, ci = hand_stats(values)
            assert row[column] == pytest.approx(Stat(mean, std, ci, 3)), column
        assert row["wall_s"] == pytest.approx(np.mean(WALL[opt]))
        assert row["passes"] == pytest.approx(6)


def test_incomplete_runs_are_counted_not_averaged(sweep):
    write_run(sweep / "optimizer=sgd" / "seed=4", make_config("sgd", 4), status=None, acc=0.0)  # running
    write_run(sweep / "optimizer=sgd" / "seed=5", make_config("sgd", 5), status="interrupted", acc=0.0)
    row = by_label(summarize(group_runs(find_runs([sweep]))))["optimizer.name=sgd"]
    assert (row["n"], row["completed"], row["failed"], row["other"]) == (6, 3, 1, 2)
    assert row["final_test/acc"].mean == pytest.approx(np.mean(ACC["sgd"]))


def test_different_experiments_are_not_averaged(tmp_path):
    for name, accs in (("exp_a", [0.5, 0.6]), ("exp_b", [0.8, 0.9])):
        for seed, acc in enumerate(accs):
            write_run(tmp_path / name / f"seed={seed}", make_config("sgd", seed, experiment=name), acc=acc)
    groups = group_runs(find_runs([tmp_path / "exp_a", tmp_path / "exp_b"]))
    assert [g.label for g in groups] == ["experiment=exp_a", "experiment=exp_b"]
    rows = by_label(summarize(groups))
    assert rows["experiment=exp_a"]["final_test/acc"].mean == pytest.approx(0.55)
    assert rows["experiment=exp_b"]["final_test/acc"].mean == pytest.approx(0.85)


def test_single_group_is_labelled_by_experiment_and_has_sharpness(tmp_path):
    for seed, top in enumerate([10.0, 14.0]):
        write_run(tmp_path / f"seed={seed}", make_config("sam", seed), extra_final={"sharpness/hessian_top": top})
    (row,) = summarize(group_runs(find_runs([tmp_path])))
    assert row["group"] == "mnist_sam"
    assert row["final_sharpness/hessian_top"].mean == pytest.approx(12.0)
    assert row["final_sharpness/hessian_top"].n == 2


def test_run_without_summary_gets_computed_signature(tmp_path):
    write_run(tmp_path / "a", make_config("sgd", 0), store_signature=False)
    write_run(tmp_path / "b", make_config("sgd", 1), status=None)
    (group,) = group_runs(find_runs([tmp_path]))
    assert group.counts() == {"completed": 1, "diverged": 0, "failed": 0, "other": 1}


# ------------------------------------------------------------------------------------------------------ CLI

def test_cli_csv_parses_and_figures_are_written(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sweep), "--format", "csv", "--out", str(out)]) == 0
    rows = {r["group"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    sgd = rows["optimizer.name=sgd"]
    mean, std, ci = hand_stats(ACC["sgd"])
    assert float(sgd["final_test/acc_mean"]) == pytest.approx(mean)
    assert float(sgd["final_test/acc_std"]) == pytest.approx(std)
    assert float(sgd["final_test/acc_ci95"]) == pytest.approx(ci)
    assert (int(sgd["completed"]), int(sgd["failed"]), int(sgd["diverged"])) == (3, 1, 0)
    for name in ("report.csv", "report.md", "curves.png", "bars.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(csv.DictReader((out / "report.csv").open()))[0].keys() == sgd.keys()


def test_cli_markdown_default_out_and_columns(sweep, capsys):
    assert main([str(sweep), "--no-figures", "--columns", "group,completed", "final"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| group | completed | final_test/acc |"
    assert len(lines) == 4
    mean, std, ci = hand_stats(ACC["sam"])
    assert lines[2] == f"| optimizer.name=sam | 3 | {mean:.4f} ± {std:.4f} [±{ci:.4f}] |"
    assert (sweep / "report" / "report.md").exists() and not (sweep / "report" / "curves.png").exists()
    # the report folder inside the sweep is not mistaken for a run on the next call
    assert main([str(sweep), "--no-figures", "--metric", "test/loss"]) == 0


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_bad_inputs_exit_2_with_one_line(tmp_path, sweep, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert "no runs found under" in one_line_error(capsys, [str(tmp_path / "empty")])
    err = one_line_error(capsys, [str(sweep), "--metric", "test/acc5"])
    assert "unknown metric" in err and "test/acc" in err and "train/loss" in err
    assert "unknown column" in one_line_error(capsys, [str(sweep), "--columns", "nope"])


def test_cli_subprocess_missing_dir(tmp_path):
    missing = tmp_path / "does-not-exist"
    proc = subprocess.run([sys.executable, "-m", "runner.report", str(missing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"report: no such directory: {missing}"]


def test_partial_sweep_with_nothing_finished(tmp_path, capsys):
    write_run(tmp_path / "seed=0", make_config("sgd", 0), status=None, epochs=0)  # just started: no metrics
    write_run(tmp_path / "seed=1", make_config("sgd", 1), status=None)  # running, metrics logged
    out = tmp_path / "out"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    (row,) = summarize(group_runs(find_runs([tmp_path])))
    assert (row["n"], row["completed"], row["other"]) == (2, 0, 2)
    assert row["final_test/acc"] == Stat(None, None, None, 0) and row["wall_s"] is None
    assert (out / "curves.png").exists() and (out / "bars.png").exists()


def test_metric_missing_from_summary_falls_back_on_metrics_jsonl(tmp_path):
    run_dir = write_run(tmp_path / "seed=0", make_config("sgd", 0), loss=0.25)
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["final"]["test/loss"], summary["best"]["test/acc"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run,) = find_runs([tmp_path])
    assert run.final_value("test/loss") == pytest.approx(0.25)  # last logged value
    assert run.final_value("train/acc") is None
    assert run.best("test/loss") == pytest.approx(0.25)  # lower is better
    assert run.best("test/acc") == pytest.approx(0.9)  # higher is better
    (row,) = summarize(group_runs([run]), "test/loss")
    assert row["final_test/loss"] == Stat(0.25, 0.0, None, 1)
