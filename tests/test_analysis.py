"""The analysis group as a user drives it: during training, at the end, post hoc, in the report; bad input.

The numerical oracles of the instruments are in test_curvature.py, test_landscape.py and test_analysis_plots.py;
here: they are wired right (when they run, what they write, that they never change a run), on digits and on
real-format CIFAR-10 files.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import cli_env, python_m

FAST = {  # small settings so each analysis takes well under a second on digits
    "hessian": ["analysis.hessian.iterations=6", "analysis.hessian.top_k=2", "analysis.hessian.trace_samples=4",
                "analysis.hessian.samples=256"],
    "sharpness": ["analysis.sharpness.samples=256", "analysis.sharpness.ascent_steps=2"],
    "landscape_1d": ["analysis.landscape_1d.x_points=5", "analysis.landscape_1d.samples=256"],
    "landscape_2d": ["analysis.landscape_2d.x_points=5", "analysis.landscape_2d.y_points=3",
                     "analysis.landscape_2d.samples=256"],
    "pca": ["analysis.pca.points=4", "analysis.pca.samples=256"],
    "interpolate": ["analysis.interpolate.alpha_points=5", "analysis.interpolate.samples=null"],
    "hessian_density": ["analysis.hessian_density.probes=4", "analysis.hessian_density.iterations=3",
                        "analysis.hessian_density.samples=256", "analysis.hessian_density.grid_points=1000"],
}


def fast(*names: str) -> list[str]:
    return [f"analysis=[{','.join(names)}]"] + [o for n in names for o in FAST[n]]


def analyze_cli(tmp_path: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return python_m("runner.analyze", args, cwd=tmp_path, env=cli_env(tmp_path), timeout=timeout)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two finished digits runs (SGD and SAM, 3 epochs) to analyse post hoc."""
    from tests.conftest import runner_process

    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for name, optimizer in (("sgd", "sgd"), ("sam", "sam")):
        out = runner_process(root, f"optimizer={optimizer}", "trainer.epochs=3", f"hydra.run.dir={root / name}")
        assert out.returncode == 0, out.stderr
        runs[name] = root / name
    return runs


# ------------------------------------------------------------------------------------------ the run itself

def test_analyses_never_change_the_experiment(compose, tmp_path, one_thread):
    """After every analysis (BN model): parameters, buffers, optimizer state, the data generator and torch's RNG
    are bitwise as before."""
    from runner.analysis import validate_plan
    from runner.analysis.schedule import analyze
    from runner.experiment import build
    from runner.spec import validate
    from runner.train import Progress

    names = ["hessian", "sharpness", "landscape_1d", "landscape_2d", "hessian_density"]
    cfg = compose(["model=cnn", "logger=none", *fast(*names), "analysis.landscape_1d.bn=recalibrate"])
    spec = validate(cfg)
    experiment = build(spec, torch.device("cpu"))
    model = experiment.model
    for _ in range(3):  # non-trivial BN statistics and momentum buffers
        batch = next(iter(experiment.task.train))
        experiment.optimizer.zero_grad()
        experiment.objective(model(batch.x), batch.y).backward()
        experiment.optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    data_state = experiment.task.train.generator.get_state().clone()
    rng = torch.get_rng_state().clone()
    training = [m.training for m in model.modules()]

    metrics, errors = analyze(experiment, Progress(step=3, epoch=0), spec.analysis, tmp_path / "analysis")
    assert not errors and {k.split("/")[0] for k in metrics} == set(names)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(experiment.task.train.generator.get_state(), data_state)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == training
    assert read(tmp_path / "analysis" / "landscape_1d.json")["info"]["bn"] == "recalibrate"
    assert validate_plan({}) is None


def test_curvature_during_training_is_a_curve_and_changes_nothing(run_cli, tmp_path):
    """analysis=[hessian,sharpness] every 2 epochs: the numbers join those records and a last record at the end;
    the training itself (every train/test number, the run's folder identity) is the run without analyses."""
    plain = run_cli("trainer.epochs=4", f"hydra.run.dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr
    out = run_cli("trainer.epochs=4", f"hydra.run.dir={tmp_path / 'curv'}", *fast("hessian", "sharpness"),
                  "analysis.every_epochs=2")
    assert out.returncode == 0, out.stderr
    assert "analysis: hessian, sharpness" in out.stderr
    a, b = records(tmp_path / "plain"), records(tmp_path / "curv")
    strip = lambda r: {k: v for k, v in r.items() if k.startswith(("train/", "test/", "lr", "step"))}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b[:len(a)]]  # bitwise the same training
    with_curvature = [r["epoch"] for r in b if "hessian/lambda_max" in r]
    assert with_curvature == [2, 4]  # epoch 2 in the loop; epoch 4 after the final checkpoint (the end)
    last = b[-1]
    assert last["step"] == a[-1]["step"] and "sharpness/sam" in last and "train/loss" not in last
    assert last["hessian/lambda_max"] >= last["hessian/lambda_2"] >= last["hessian/lambda_min"]
    lr = read(tmp_path / "curv" / "analysis" / "hessian.json")["info"]["lr"]  # the last step's (the schedule: 0)
    assert a[-1]["lr"] == 0 < lr and last["hessian/eos_ratio"] == pytest.approx(last["hessian/lambda_max"] * lr / 3.8)
    summary = read(tmp_path / "curv" / "summary.json")
    assert summary["signature"] == read(tmp_path / "plain" / "summary.json")["signature"]
    assert summary["final"]["hessian/lambda_max"] == last["hessian/lambda_max"]
    hessian = read(tmp_path / "curv" / "analysis" / "hessian.json")
    assert hessian["settings"]["iterations"] == 6 and hessian["step"] == last["step"]
    assert hessian["scalars"]["hessian/trace"] == last["hessian/trace"]


def test_adding_an_analysis_to_a_finished_run_does_not_retrain_it(run_cli, tmp_path):
    out = run_cli("trainer.epochs=2")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    lines, checkpoint = (run / "metrics.jsonl").read_text(), (run / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = run_cli("trainer.epochs=2", *fast("landscape_1d"), "analysis.landscape_1d.samples=null")
    assert again.returncode == 0, again.stderr
    assert "already completed" in again.stderr and "analysis: landscape_1d" in again.stderr
    assert (run / "metrics.jsonl").read_text() == lines
    assert (run / "checkpoints" / "last.pt").stat().st_mtime_ns == checkpoint
    arrays = np.load(run / "analysis" / "landscape_1d.npz")
    assert arrays["x"].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0] and arrays["train_loss"].shape == (5,)
    assert (run / "analysis" / "landscape_1d.png").stat().st_size > 0
    summary = read(run / "summary.json")
    assert arrays["test_loss"][2] == pytest.approx(summary["final"]["test/loss"], rel=1e-5)  # all test samples


def test_pca_of_the_trajectory_during_training(run_cli, tmp_path):
    out = run_cli("trainer.epochs=4", *fast("pca"))
    assert out.returncode == 0, out.stderr
    analysis = tmp_path / "run" / "analysis"
    assert len(list((analysis / "trajectory").glob("step=*.pt"))) == 4
    arrays = np.load(analysis / "pca.npz")
    assert arrays["trajectory"].shape == (4, 2) and np.allclose(arrays["trajectory"][-1], 0, atol=1e-5)
    assert arrays["trajectory_steps"].tolist() == [23, 46, 69, 92]
    assert arrays["train_loss"].shape == (4, 4) and 0.5 < arrays["explained_variance_ratio"].sum() <= 1 + 1e-6
    assert (analysis / "pca_train_contour.png").exists()


# -------------------------------------------------------------------------------------------------- post hoc

@pytest.mark.slow
def test_post_hoc_on_a_glob_skips_what_is_done_and_the_report_has_the_column(trained, tmp_path):
    pattern = str(trained["sgd"].parent / "s*")
    out = analyze_cli(tmp_path, pattern, *fast("hessian"))
    assert out.returncode == 0, out.stderr
    for run in trained.values():
        assert "hessian/lambda_max" in read(run / "analysis" / "hessian.json")["scalars"]
    again = analyze_cli(tmp_path, pattern, *fast("hessian"))
    assert again.returncode == 0 and again.stderr.count("already done") == 2
    changed = analyze_cli(tmp_path, trained["sgd"], *fast("hessian"), "analysis.hessian.seed=1")
    assert changed.returncode == 0 and "already done" not in changed.stderr
    report = python_m("runner.report", [trained["sgd"].parent, "--metric", "hessian/lambda_max"], cwd=tmp_path,
                      env=cli_env(tmp_path))
    assert report.returncode == 0, report.stderr
    assert "final_hessian/lambda_max" in report.stdout


def test_interpolation_endpoints_are_each_runs_own_loss(trained, tmp_path):
    out = analyze_cli(tmp_path, trained["sgd"], *fast("interpolate"), f"analysis.other={trained['sam']}")
    assert out.returncode == 0, out.stderr
    arrays = np.load(trained["sgd"] / "analysis" / "interpolate.npz")
    assert arrays["alpha"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    for end, run in ((0, "sgd"), (-1, "sam")):
        final = read(trained[run] / "summary.json")["final"]
        assert arrays["test_loss"][end] == pytest.approx(final["test/loss"], rel=1e-5)
        assert arrays["test_acc"][end] == pytest.approx(final["test/acc"])
    record = read(trained["sgd"] / "analysis" / "interpolate.json")
    assert record["settings"]["other"] == str(trained["sam"].resolve()) and record["scalars"]["interpolate/distance"] > 0


def test_hessian_density_post_hoc_writes_its_files_and_a_single_hessian_call_its_figure(trained, tmp_path):
    """`python -m runner.analyze <run> analysis=[hessian,hessian_density]` on a copy of a finished run: the density's
    npz (nodes and weights per probe, grid, density), json and figure; its trace is Hutchinson's with the same
    probes (hessian's 4 trace samples, seed 0, the same 256 samples; the objective is plain cross-entropy here);
    the one post-hoc hessian call draws its Ritz values (hessian.png)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["sgd"], run, ignore=shutil.ignore_patterns("analysis", "wandb"))
    out = analyze_cli(tmp_path, run, *fast("hessian", "hessian_density"))
    assert out.returncode == 0, out.stderr
    assert "hessian_density/negative_mass=" in out.stderr
    analysis = run / "analysis"
    record, arrays = read(analysis / "hessian_density.json"), np.load(analysis / "hessian_density.npz")
    info, scalars = record["info"], record["scalars"]
    parameters = (64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)  # the default MLP on 8x8 digits
    assert (info["parameters"], info["samples"], info["probes"], info["steps"]) == (parameters, 256, 4, 3)
    assert info["loss"] == "plain cross-entropy" and info["bn"] == "eval"
    nodes, weights = arrays["nodes"], arrays["weights"]
    assert nodes.shape == weights.shape == (4, 3) and arrays["steps"].tolist() == [3] * 4
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)
    grid, density = arrays["grid"], arrays["density"]
    assert grid.shape == density.shape == (1000,)
    assert np.sum(density) * (grid[1] - grid[0]) == pytest.approx(1.0, abs=1e-5)
    assert scalars["hessian_density/lambda_max"] == nodes.max() > nodes.min() == scalars["hessian_density/lambda_min"]
    assert 0 <= scalars["hessian_density/negative_mass"] < 1
    trace = scalars["hessian_density/trace"]
    assert trace == pytest.approx(parameters * (weights * nodes).sum(1).mean(), rel=1e-9)
    assert trace == pytest.approx(read(analysis / "hessian.json")["scalars"]["hessian/trace"], rel=1e-3)
    assert record["figures"] == ["hessian_density.png"]
    assert read(analysis / "hessian.json")["figures"] == ["hessian.png"]  # a single call: no curve, still a figure
    assert (analysis / "hessian_density.png").stat().st_size > 0 and (analysis / "hessian.png").stat().st_size > 0
    ritz = np.load(analysis / "hessian.npz")
    assert ritz["ritz_values"].shape == ritz["ritz_weights"].shape == (6,)


def test_a_sweeps_run_folders_are_targets_not_overrides(trained, tmp_path, monkeypatch, capsys, one_thread):
    """Sweep runs live in `multirun/<experiment>/<signature>/seed=N`: a path holding `=` (or a glob of them, as the
    README writes it) is a run to analyse, not an override."""
    import shutil

    from hydra.core.global_hydra import GlobalHydra

    from runner.analyze import main, parse

    sweep = tmp_path / "multirun" / "x" / "0123abcd"
    for seed in (0, 1):
        shutil.copytree(trained["sgd"], sweep / f"seed={seed}", ignore=shutil.ignore_patterns("analysis"))
    monkeypatch.chdir(tmp_path)
    args = parse(["multirun/x/0123abcd/seed=0", "analysis=hessian", "analysis.hessian.top_k=2"])
    assert args.targets == ["multirun/x/0123abcd/seed=0"]
    assert args.overrides == ["analysis=hessian", "analysis.hessian.top_k=2"]
    GlobalHydra.instance().clear()
    assert main(["multirun/x/0123abcd/seed=0", *fast("hessian")]) == 0, capsys.readouterr().err
    assert (sweep / "seed=0" / "analysis" / "hessian.json").exists()
    assert not (sweep / "seed=1" / "analysis" / "hessian.json").exists()
    GlobalHydra.instance().clear()
    assert main(["multirun/x/**/seed=*", *fast("hessian")]) == 0, capsys.readouterr().err
    assert (sweep / "seed=1" / "analysis" / "hessian.json").exists()
    assert "seed=0: step" in capsys.readouterr().err  # both runs named in the output
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_:  # a sweep folder that does not exist: named as a missing run
        main(["multirun/x/0123abcd/seed=7", "analysis=hessian"])
    assert exit_.value.code == 2 and "seed=7: no such run directory" in capsys.readouterr().err


def test_analysis_on_a_finished_run_prints_the_numbers_runner_analyze_prints(trained, compose, tmp_path, capsys,
                                                                            one_thread):
    """`python -m runner analysis=...` on a finished run ends with the line `python -m runner.analyze` prints (the
    same function makes both): in process, `runner.analyze.main`, then `run` + the app's `outcome`."""
    import shutil

    from hydra.core.global_hydra import GlobalHydra

    from runner.analyze import main
    from runner.app import outcome
    from runner.run import run

    target = tmp_path / "sgd"
    shutil.copytree(trained["sgd"], target, ignore=shutil.ignore_patterns("analysis"))
    GlobalHydra.instance().clear()
    assert main([str(target), *fast("landscape_1d")]) == 0
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    assert printed.startswith(f"{target}: step 69: ") and " landscape_1d/train_loss_center=" in printed, printed
    summary = run(compose(["optimizer=sgd", "trainer.epochs=3", "logger=none", *fast("landscape_1d")]), target)
    assert summary["skipped"] and "landscape_1d/train_loss_center" in summary["analysis"]
    assert outcome(summary, target).splitlines()[-1] == printed


BAD = {
    "no-checkpoint": (["{empty}", "analysis=hessian"], "no checkpoint"),
    "glob-matches-nothing": (["{tmp}/nothing-*", "analysis=hessian"], "matches no run directory"),
    "unknown-analysis": (["{sgd}", "analysis=curvature"], "unknown analysis"),
    "no-analysis": (["{sgd}"], "choose an analysis"),
    "bounds-reversed": (["{sgd}", "analysis=landscape_1d", "analysis.landscape_1d.x_min=2"], "x_min < x_max"),
    "zero-points": (["{sgd}", "analysis=landscape_2d", "analysis.landscape_2d.y_points=0"], "y_points=0"),
    "pca-without-snapshots": (["{sgd}", "analysis=pca"], "at least 3 parameter snapshots"),
    "interpolate-without-other": (["{sgd}", "analysis=interpolate"], "analysis.other="),
    "interpolate-other-model": (["{sgd}", "analysis=interpolate", "analysis.other={cnn}"], "another model"),
    "run-config-override": (["{sgd}", "analysis=hessian", "trainer.epochs=3"], "only analysis"),
    "best-without-save-best": (["{sgd}", "analysis=hessian", "analysis.checkpoint=best"], "save_best"),
}


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    from tests.conftest import runner_process

    root = tmp_path_factory.mktemp("cnn")
    out = runner_process(root, "model=cnn", "trainer.epochs=1", f"hydra.run.dir={root / 'cnn'}")
    assert out.returncode == 0, out.stderr
    return root / "cnn"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2_before_any_work(case, trained, cnn_run, tmp_path, capsys, one_thread):
    """In process (`runner.analyze.main`, what `python -m runner.analyze` runs), for speed; the subprocess path is
    the same function (test_post_hoc_on_a_glob... runs it)."""
    from hydra.core.global_hydra import GlobalHydra

    from runner.analyze import main

    GlobalHydra.instance().clear()
    args, expected = BAD[case]
    empty = tmp_path / "empty"
    (empty / ".hydra").mkdir(parents=True)
    (empty / ".hydra" / "config.yaml").write_text("seed: 0\n")
    before = {p: sorted((p / "analysis").rglob("*")) for p in trained.values()}
    names = {"empty": empty, "tmp": tmp_path, "sgd": trained["sgd"], "cnn": cnn_run}
    with pytest.raises(SystemExit) as exit_:
        main([a.format(**names) for a in args])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert {p: sorted((p / "analysis").rglob("*")) for p in trained.values()} == before
    assert not (empty / "analysis").exists()


def test_bad_analysis_settings_in_a_training_run_fail_before_any_work(run_cli, tmp_path):
    out = run_cli("analysis=landscape_2d", "analysis.landscape_2d.x_max=-3")
    assert out.returncode == 2 and "x_min < x_max" in out.stderr
    assert not (tmp_path / "run").exists()
    out = run_cli("analysis=interpolate")
    assert out.returncode == 2 and "analysis.other" in out.stderr
    out = run_cli("analysis=[hessian,nope]")
    assert out.returncode == 2 and "unknown analysis 'nope'" in out.stderr


def test_interpolate_during_training_checks_the_other_run_first(run_cli, cnn_run, tmp_path):
    out = run_cli("analysis=interpolate", f"analysis.other={tmp_path / 'missing'}")
    assert out.returncode == 2 and "analysis.other=" in out.stderr and "no checkpoint" in out.stderr
    out = run_cli("analysis=interpolate", f"analysis.other={cnn_run}")
    assert out.returncode == 2 and "another model" in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_failing_analysis_keeps_the_training_and_exits_1(run_cli, tmp_path):
    """PCA with one snapshot cannot work (a step cadence longer than the run: the config alone cannot tell, so it
    is not refused up front): the run is completed and kept, the command says so and exits 1."""
    out = run_cli("trainer.epochs=2", *fast("pca", "landscape_1d"), "analysis.pca.snapshot_every_epochs=null",
                  "analysis.pca.snapshot_every_steps=1000")
    assert out.returncode == 1
    assert "analysis failed: ValueError: analysis=pca needs at least 3" in out.stderr
    summary = read(tmp_path / "run" / "summary.json")
    assert summary["status"] == "completed" and "pca" in summary["analysis_errors"]
    assert "landscape_1d/train_loss_center" in summary["analysis"]  # the others are done
    assert not (tmp_path / "run" / "analysis" / "pca.json").exists()
    assert "Traceback" in (tmp_path / "run" / "runner.log").read_text()


@pytest.mark.slow
def test_figures_go_to_wandb_as_images_also_post_hoc(run_cli, tmp_path, caplog, one_thread):
    """A post-hoc analysis continues the run's dashboard run: offline, wandb cannot resume in place, so its one new
    folder (same id) holds the whole run again, the figures in the row of the checkpoint's step; a call with
    nothing to do (the analysis is done) starts no wandb run at all."""
    from hydra.core.global_hydra import GlobalHydra

    from runner.analyze import main
    from tests.test_wandb import history, offline_logs, run_ids, wandb_records

    run = tmp_path / "run"
    out = run_cli("trainer.epochs=1", "logger=wandb", *fast("landscape_1d"))
    assert out.returncode == 0, out.stderr
    images = list((run / "wandb").glob("offline-run-*/files/media/images/landscape_1d/*.png"))
    assert len(images) == 1
    out = analyze_cli(tmp_path, run, *fast("landscape_2d"))
    assert out.returncode == 0, out.stderr
    images = list((run / "wandb").glob("offline-run-*/files/media/images/landscape_2d/*.png"))
    assert len(images) == 3  # train and test contours, surface
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2  # the training's and the post-hoc call's
    runs = {p.name.split("-", 3)[-1] for p in folders}
    assert len(runs) == 1  # the post-hoc analysis continues the training's dashboard run (same id)

    _, post_hoc = offline_logs(run)
    logged = wandb_records(post_hoc)
    assert run_ids(logged) == runs
    rows, steps = history(logged), [r["step"] for r in records(run)]
    assert sorted({row["_step"] for row in rows}) == sorted(set(steps))  # the whole history, at its steps
    last = {k: v for row in rows if row["_step"] == steps[-1] for k, v in row.items()}
    images = {key.rsplit("/", 1)[0] for key in last if key.endswith("/sha256")}  # an image: {path, sha256, ...}
    assert {"landscape_1d/figure", "landscape_2d/train_contour"} <= images and "train/loss" in last, last
    assert last["test/acc"] == [r for r in records(run) if "test/acc" in r][-1]["test/acc"]

    GlobalHydra.instance().clear()  # the same analysis again, in process: done, so skipped; no wandb run
    caplog.set_level("INFO")
    assert main([str(run), *fast("landscape_2d")]) == 0
    assert "analysis landscape_2d: already done" in caplog.text
    assert sorted((run / "wandb").glob("offline-run-*")) == folders


# ------------------------------------------------------------------------------------ real-format CIFAR-10

@pytest.mark.slow
def test_landscape_and_hessian_on_real_format_cifar10(compose, tmp_path, monkeypatch, one_thread):
    """ResNet-18 (BN) on CIFAR-10 files in torchvision's on-disk format: a 2-D landscape in both BN modes and
    the Hessian, end to end through run()."""
    import torchvision

    from runner.run import run
    try:
        from tests.fake_data import patch_cifar_md5, write_fake_cifar10
    except ImportError:  # pragma: no cover
        from fake_data import patch_cifar_md5, write_fake_cifar10

    fake = write_fake_cifar10(tmp_path / "data", n_train=48, n_test=16)
    patch_cifar_md5(monkeypatch, torchvision.datasets.CIFAR10, fake.md5)
    cfg = compose(["+experiment=sam_cifar", "trainer.epochs=1", "dataset.batch_size=16", "logger=none",
                   f"dataset.root={tmp_path / 'data'}", "trainer.device=cpu", "model.width=8",
                   *fast("landscape_2d", "hessian"), "analysis.landscape_2d.bn=recalibrate",
                   "analysis.landscape_2d.batch_size=16"])
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and not summary.get("analysis_errors"), summary
    grid = np.load(tmp_path / "run" / "analysis" / "landscape_2d.npz")
    assert grid["train_loss"].shape == (3, 5) and np.all(np.isfinite(grid["train_loss"]))
    record = read(tmp_path / "run" / "analysis" / "landscape_2d.json")
    assert record["info"]["bn"] == "recalibrate" and "landscape_2d_train_contour.png" in record["figures"]
    assert np.isfinite(summary["analysis"]["hessian/lambda_max"])
