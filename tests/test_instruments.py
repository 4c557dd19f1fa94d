"""What the analyses report after training, in process on a tiny run (wine, a 13-4-3 MLP of 71 parameters, full
batch, SGD with heavy-ball momentum 0.9 and a cosine schedule that ends at lr 0): the edge-of-stability ratio from
the lr of the last step and the optimizer's own threshold, the landscapes' saved directions, their statistics over
non-finite grids and grids without the checkpoint, the real sample counts in captions, the Hessian's top_k note,
and the line saying which analyses a cadence does not reach."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiny import Collect

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only contend (0.5 s vs 6 ms an HVP)

STEPS = 6
HESSIAN = ["analysis.hessian.iterations=6", "analysis.hessian.top_k=2", "analysis.hessian.trace_samples=0"]


def experiment_of(compose, *overrides):
    from runner.experiment import build
    from runner.spec import validate

    cfg = compose(["logger=none", "dataset=wine", "model.hidden=[4]", "optimizer.lr=0.05", f"trainer.steps={STEPS}",
                   "trainer.device=cpu", *overrides])
    return build(validate(cfg), torch.device("cpu"))


def plan_of(*names, **options):
    """A validated analysis plan: `names` with their YAML defaults and `options` {"name.key": value}."""
    from omegaconf import OmegaConf

    from runner.analysis import validate_plan
    from tests.conftest import CONF_DIR

    node = {}
    for name in names:
        node.update(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "analysis" / f"{name}.yaml")))
    for key, value in options.items():
        head, _, tail = key.partition(".")
        if tail:
            node[head][tail] = value
        else:
            node[head] = value
    return validate_plan(node)


def analyze_in(experiment, progress, plan, out):
    from runner.analysis.schedule import analyze

    metrics, errors = analyze(experiment, progress, plan, out / "analysis", show_progress=False)
    assert not errors, errors
    return metrics


def record(out, name: str) -> dict:
    return json.loads((out / "analysis" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny run trained by the real loop with the Hessian every 2 steps; its records in metrics.jsonl and its
    checkpoint in last.pt, as a run directory has them."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runner.analysis.schedule import callbacks
    from runner.train import Progress, train
    from tests.conftest import CONF_DIR

    def compose(overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))

    out = tmp_path_factory.mktemp("tiny_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        experiment = experiment_of(compose, "optimizer.weight_decay=0", "analysis=hessian", *HESSIAN,
                                   "analysis.every_steps=2")
        progress, sink = Progress(), Collect()
        assert train(experiment, progress, sink, callbacks(experiment, out / "analysis")) == "completed"
    finally:
        torch.set_num_threads(threads)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sink.records))
    torch.save(experiment.state_dict(progress), out / "last.pt")
    return SimpleNamespace(out=out, experiment=experiment, progress=progress, records=sink.records, compose=compose)


# ------------------------------------------------------------------------------------ the edge of stability

def test_eos_ratio_after_a_cosine_schedule_uses_the_last_steps_lr_and_the_momentum_threshold(trained, tmp_path):
    """The optimizer holds lr 0 after the cosine schedule; the ratio is lambda_max * lr_last / (2 (1 + 0.9)), with
    lr_last the lr the last step took (recorded in the checkpoint), never a ratio from lr 0. A checkpoint without
    that record gives no ratio and says why in the json."""
    from runner.experiment import load_run

    experiment, progress = load_run(trained.out / "last.pt", device="cpu")
    assert experiment.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # where the schedule ends
    factor = experiment.scheduler.lr_lambdas[0](STEPS - 1)
    assert progress.last_step_lr == pytest.approx(0.05 * factor) and progress.last_step_lr > 0
    (tmp_path / "metrics.jsonl").write_text((trained.out / "metrics.jsonl").read_text())
    metrics = analyze_in(experiment, progress, plan_of("hessian", **{"hessian.iterations": 6, "hessian.top_k": 2,
                                                                     "hessian.trace_samples": 0}), tmp_path)
    lam = metrics["hessian/lambda_max"]
    assert metrics["hessian/eos_ratio"] == pytest.approx(lam * progress.last_step_lr / 3.8) and lam > 0
    eos = record(tmp_path, "hessian")["info"]["edge_of_stability"]
    assert eos["formula"] == "2(1+β)/η" and eos["rule"] == "heavy-ball momentum β=0.9"
    assert eos["lr"] == pytest.approx(progress.last_step_lr) and eos["threshold"] == pytest.approx(
        3.8 / progress.last_step_lr)

    state = torch.load(trained.out / "last.pt", weights_only=True)
    del state["progress"]["last_step_lr"]  # a checkpoint written before the lr of the last step was recorded
    torch.save(state, tmp_path / "old.pt")
    experiment, progress = load_run(tmp_path / "old.pt", device="cpu")
    metrics = analyze_in(experiment, progress, plan_of("hessian", **{"hessian.iterations": 6, "hessian.top_k": 2,
                                                                     "hessian.trace_samples": 0}), tmp_path / "old")
    assert "hessian/lambda_max" in metrics and "hessian/eos_ratio" not in metrics
    eos = record(tmp_path / "old", "hessian")["info"]["edge_of_stability"]
    assert eos["eos_ratio"] is None and "does not record the learning rate of its last step" in eos["no_ratio"]


def test_during_training_the_ratio_uses_the_step_just_taken(trained):
    logged = [r for r in trained.records if "hessian/lambda_max" in r]
    assert [r["step"] for r in logged] == [2, 4]  # step 6 is the end-of-training run's
    lam, ratio = logged[0]["hessian/lambda_max"], logged[0]["hessian/eos_ratio"]
    lr_of_step_2 = 0.05 * trained.experiment.scheduler.lr_lambdas[0](1)
    assert ratio == pytest.approx(lam * lr_of_step_2 / 3.8)


def _captured(monkeypatch) -> list:
    from runner.analysis import plots

    saved, original = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append((path.name, fig)) or original(fig, path))
    return saved


def test_the_figure_draws_the_optimizers_own_threshold(trained, tmp_path, monkeypatch):
    """hessian_over_training.png: the dashed line is 2(1+β)/lr_last, labelled with its formula (not 2/lr)."""
    saved = _captured(monkeypatch)
    (tmp_path / "metrics.jsonl").write_text((trained.out / "metrics.jsonl").read_text())
    progress = type(trained.progress)(**vars(trained.progress))
    analyze_in(trained.experiment, progress, plan_of("hessian", **{"hessian.iterations": 6, "hessian.top_k": 2,
                                                                   "hessian.trace_samples": 0}), tmp_path)
    (fig,) = [f for name, f in saved if name.startswith(".hessian_over_training")]
    (dashed,) = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert dashed.get_label() == "2(1+β)/η, heavy-ball momentum β=0.9 (stability threshold)"
    lrs = [r["lr"] for r in trained.records if "hessian/lambda_max" in r] + [progress.last_step_lr]
    assert np.allclose(dashed.get_ydata(), 3.8 / np.asarray(lrs))
    title = " ".join((fig.get_suptitle() if hasattr(fig, "get_suptitle") else fig._suptitle.get_text()).split())
    assert "lambda_max < 2(1+β)/η, heavy-ball momentum β=0.9" in title and "< 2/lr" not in title


def test_adam_gets_no_threshold_and_says_so(trained, tmp_path, monkeypatch):
    """For Adam the plain threshold does not apply: no ratio, no dashed line, a note in the json and the title."""
    from runner.train import Progress

    saved = _captured(monkeypatch)
    experiment = experiment_of(trained.compose, "optimizer=adam")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "lr": 1e-3, "hessian/lambda_max": 3.0}) + "\n")
    metrics = analyze_in(experiment, Progress(step=4, last_step_lr=1e-3),
                         plan_of("hessian", **{"hessian.iterations": 6, "hessian.top_k": 2,
                                               "hessian.trace_samples": 0}), tmp_path)
    assert "hessian/lambda_max" in metrics and "hessian/eos_ratio" not in metrics
    eos = record(tmp_path, "hessian")["info"]["edge_of_stability"]
    assert eos["factor"] is None and "preconditioned sharpness" in eos["no_ratio"]
    (fig,) = [f for name, f in saved if name.startswith(".hessian_over_training")]
    assert not [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    title = " ".join((fig.get_suptitle() if hasattr(fig, "get_suptitle") else fig._suptitle.get_text()).split())
    assert "no edge-of-stability threshold" in title


# ----------------------------------------------------------------------------------------------- landscapes

def test_saved_directions_reproduce_a_grid_point(trained, tmp_path):
    """landscape_2d's .npz carries its directions: `load_directions` gives them back by parameter name, and the
    loss at w + x d_x + y d_y of one grid point is the saved one."""
    from runner.analysis.landscape import load_directions
    from runner.analysis.probe import Probe, evaluation_sets

    plan = plan_of("landscape_1d", "landscape_2d", **{"landscape_2d.x_points": 5, "landscape_2d.y_points": 3,
                                                      "landscape_2d.surface": False, "landscape_1d.x_points": 3})
    analyze_in(trained.experiment, trained.progress, plan, tmp_path)
    d = load_directions(tmp_path, "landscape_2d")
    probe = Probe(trained.experiment.model)
    assert sorted(d) == ["x", "y"] and list(d["x"]) == probe.names
    assert all(d["x"][n].shape == p.shape for n, p in zip(probe.names, probe.params))
    saved = np.load(tmp_path / "analysis" / "landscape_2d.npz")
    train = evaluation_sets(trained.experiment.task, 2048, 0, 1024)["train"]
    ix, iy = 3, 0
    x, y = saved["x"][ix], saved["y"][iy]
    point = [p + float(x) * d["x"][n] + float(y) * d["y"][n] for n, p in zip(probe.names, probe.params)]
    assert probe.evaluate(point, train)["loss"] == pytest.approx(saved["train_loss"][iy, ix], rel=1e-5)
    one = load_directions(tmp_path / "analysis" / "landscape_1d.npz")
    assert sorted(one) == ["x"] and all(torch.equal(one["x"][n], d["x"][n]) for n in probe.names)  # same seed


@pytest.mark.parametrize("name", ["landscape_1d", "landscape_2d"])
def test_statistics_over_a_non_finite_grid_are_nan_with_a_count(trained, tmp_path, name, caplog):
    """x in {-1e30, 0, 1e30}: every point but the centre overflows; the rise is not 0.0 but nan/inf, and the
    number of non-finite points is reported."""
    options = {f"{name}.x_min": -1e30, f"{name}.x_max": 1e30, f"{name}.x_points": 3}
    if name == "landscape_2d":
        options.update({"landscape_2d.y_points": 3, "landscape_2d.surface": False})
    with caplog.at_level(logging.WARNING):
        metrics = analyze_in(trained.experiment, trained.progress, plan_of(name, **options), tmp_path)
    bad = 2 if name == "landscape_1d" else 6  # the 2-D centre row along y in [-1, 1] stays finite
    assert np.isfinite(metrics[f"{name}/train_loss_center"])
    assert not np.isfinite(metrics[f"{name}/train_loss_max_rise"])
    assert metrics[f"{name}/train_loss_nonfinite"] == bad and metrics[f"{name}/test_loss_nonfinite"] == bad
    assert "non-finite loss" in record(tmp_path, name)["info"]["nonfinite"]
    assert any("non-finite loss" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["landscape_1d", "landscape_2d"])
def test_a_grid_without_the_checkpoint_is_measured_against_its_own_loss(trained, tmp_path, name):
    """An even number of points over [-1, 1] misses x = 0: the statistics are still there, relative to the
    checkpoint's own loss (evaluated separately), and the json says so."""
    from runner.analysis.probe import Probe, evaluation_sets

    options = {f"{name}.x_points": 4}
    if name == "landscape_2d":
        options.update({"landscape_2d.y_points": 2, "landscape_2d.surface": False})
    metrics = analyze_in(trained.experiment, trained.progress, plan_of(name, **options), tmp_path)
    probe = Probe(trained.experiment.model)
    own = probe.evaluate(probe.params, evaluation_sets(trained.experiment.task, 2048, 0, 1024)["train"])["loss"]
    assert metrics[f"{name}/train_loss_center"] == pytest.approx(own, rel=1e-6)
    saved = np.load(tmp_path / "analysis" / f"{name}.npz")
    assert metrics[f"{name}/train_loss_max_rise"] == pytest.approx(saved["train_loss"].max() - own, rel=1e-6)
    assert "no point at the checkpoint" in record(tmp_path, name)["info"]["center"]


def test_captions_give_the_real_sample_counts(trained, tmp_path, monkeypatch):
    """samples=2048 is a cap: wine has 142 training and 36 test samples, and the caption says so."""
    saved = _captured(monkeypatch)
    analyze_in(trained.experiment, trained.progress, plan_of("landscape_1d", **{"landscape_1d.x_points": 3}),
               tmp_path)
    ((_, fig),) = saved
    title = fig.get_suptitle() if hasattr(fig, "get_suptitle") else fig._suptitle.get_text()
    assert "142 train / 36 test samples" in title and "2048" not in title


# ---------------------------------------------------------------------------------------------- notes

def test_hessian_top_k_beyond_the_space_says_how_many_and_why(trained, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        metrics = analyze_in(trained.experiment, trained.progress,
                             plan_of("hessian", **{"hessian.iterations": 80, "hessian.top_k": 80,
                                                   "hessian.trace_samples": 0}), tmp_path)
    found = len(np.load(tmp_path / "analysis" / "hessian.npz")["top"])
    assert found <= 71 and f"hessian/lambda_{found}" in metrics and f"hessian/lambda_{found + 1}" not in metrics
    note = record(tmp_path, "hessian")["info"]["top_k"]
    assert note.startswith(f"top_k=80: {found} eigenvalues returned: ")
    assert [r.getMessage() for r in caplog.records if "top_k=80" in r.getMessage()] == [f"hessian: {note}"]


def test_a_cadence_that_an_end_only_analysis_ignores_is_one_warning_line(caplog):
    """analysis=landscape_1d analysis.every_steps=10: landscapes are not `periodic` in the registry, so they run
    only at the end; one line says so (and names the analyses the cadence does reach)."""
    from runner.analysis.schedule import callbacks
    from runner.train import TrainerConfig

    def run_with(plan):
        caplog.clear()
        experiment = SimpleNamespace(spec=SimpleNamespace(analysis=plan, trainer=TrainerConfig(steps=20)),
                                     task=SimpleNamespace(train=[0]))
        with caplog.at_level(logging.WARNING):
            callbacks(experiment, None)
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    (line,) = run_with(plan_of("landscape_1d", every_steps=10))
    assert "analysis.every_steps=10 has no effect" in line and "landscape_1d runs only at the end" in line
    (line,) = run_with(plan_of("hessian", "landscape_2d", every_epochs=2))
    assert "applies to hessian only" in line and "landscape_2d runs only at the end" in line
    assert run_with(plan_of("hessian", every_steps=10)) == []
    assert run_with(plan_of("landscape_1d")) == []
