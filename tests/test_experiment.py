"""Build apart from train: `load_run` rebuilds a trained run from its directory (or one checkpoint) alone, and no
job's record ever replaces another's (sweeps over keys outside the run identity, foreign run folders)."""
from __future__ import annotations

import json

import pytest
import torch

from runner.experiment import load_run
from runner.train import evaluate

try:
    from tests.conftest import runner_process
except ImportError:
    from conftest import runner_process

SMALL = ["model=cnn", "model.width=4", "model.blocks=2", "trainer.epochs=2", "trainer.deterministic=true",
         "trainer.progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run through the CLI: a CNN with BatchNorm on digits, 2 epochs, best.pt kept."""
    tmp = tmp_path_factory.mktemp("trained")
    out = runner_process(tmp, *SMALL, "trainer.save_best=true", f"hydra.run.dir={tmp / 'run'}")
    assert out.returncode == 0, out.stderr
    return tmp / "run"


@pytest.mark.slow
def test_load_run_rebuilds_the_trained_model_exactly(trained):
    state = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    experiment, progress = load_run(trained)
    assert experiment.device.type == "cpu" and progress.step == state["progress"]["step"]
    for key, value in experiment.model.state_dict().items():            # weights and BN statistics, as saved
        assert torch.equal(value, state["model"][key]), key
    assert torch.equal(experiment.task.train.generator.get_state(), state["rng"]["data"])  # data order not advanced
    summary = json.loads((trained / "summary.json").read_text())
    metrics = evaluate(experiment.model, experiment.task.evals["test"], experiment.task.metrics,
                       experiment.autocast())
    assert metrics["acc"] == summary["final"]["test/acc"]
    assert metrics["loss"] == pytest.approx(summary["final"]["test/loss"], rel=1e-6)
    for key, value in experiment.model.state_dict().items():            # evaluating touched nothing
        assert torch.equal(value, state["model"][key]), key


@pytest.mark.slow
def test_a_checkpoint_file_is_self_describing(trained, tmp_path):
    lone = tmp_path / "copy.pt"
    lone.write_bytes((trained / "checkpoints" / "last.pt").read_bytes())   # no run directory around it
    experiment, _ = load_run(lone)
    assert experiment.spec.model.name == "cnn" and experiment.spec.model.params.width == 4
    best, best_progress = load_run(trained, "best")
    summary = json.loads((trained / "summary.json").read_text())
    assert best_progress.best["test/acc"] == summary["best"]["test/acc"]
    metrics = evaluate(best.model, best.task.evals["test"], best.task.metrics, best.autocast())
    assert metrics["acc"] == summary["best"]["test/acc"]


def test_best_without_save_best_says_how(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="save_best"):
        load_run(tmp_path, "best")


# ---------------------------------------------------------------------------------------------- nothing overwritten

def one_line_error(out) -> str:
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["dataset.root=A,B", "optimizer.lr=0.05,1e12"], "dataset.root"),
    (["seed=0,0"], "nothing"),
    (["optimizer=sgd,adamw", "hydra.sweep.subdir=same"], "optimizer"),
])
def test_a_sweep_whose_jobs_would_share_a_folder_is_refused_before_it_starts(tmp_path, args, words):
    out = runner_process(tmp_path, "-m", *args, "trainer.epochs=1")
    line = one_line_error(out)
    assert "would share the run folder" in line and words in line
    assert not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_another_configs_run_folder_is_left_as_it_is(tmp_path):
    run = tmp_path / "run"
    first = runner_process(tmp_path, "trainer.epochs=1", "model.hidden=[8]", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "wandb" not in p.parts}
    for other in (["optimizer=adamw"], ["seed=1"]):
        out = runner_process(tmp_path, "trainer.epochs=1", "model.hidden=[8]", *other, f"hydra.run.dir={run}")
        assert "holds another run" in one_line_error(out)
        assert {p: p.read_bytes() for p in before} == before      # summary, metrics, config, checkpoints


def test_a_job_meeting_a_foreign_checkpoint_refuses_it(tmp_path, compose):
    """The second line of defence, inside run(): a checkpoint of another config is neither resumed nor replaced."""
    from runner.run import ForeignRunDir, run

    cfg = compose(["trainer.epochs=1", "model.hidden=[8]", "logger=none", "trainer.progress=false"])
    first = run(cfg, tmp_path)
    (tmp_path / "summary.json").unlink()                          # as if it had been killed before the end
    checkpoint = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ForeignRunDir, match="another run"):
        run(compose(["trainer.epochs=1", "model.hidden=[9]", "logger=none", "trainer.progress=false"]), tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == checkpoint
    assert first["status"] == "completed"


@pytest.mark.slow
def test_kill_9_on_the_step_clock_resumes_to_the_identical_run(tmp_path):
    """Mini-batches with records every 7 steps (not at epoch ends): checkpoints fall between records, yet a run
    killed with SIGKILL and rerun logs exactly the uninterrupted run's records and ends with its weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    try:
        from tests.conftest import cli_env
    except ImportError:
        from conftest import cli_env

    # focal loss: train/objective (the objective's own mean since the last record) crosses the checkpoint too
    args = ["dataset=breast_cancer", "dataset.batch_size=100", "trainer.steps=400", "trainer.eval_every_steps=7",
            "model.hidden=[64,64]", "loss=focal", "trainer.deterministic=true", "logger=none", "trainer.progress=false"]
    twin = runner_process(tmp_path, *args, f"hydra.run.dir={tmp_path / 'twin'}")
    assert twin.returncode == 0, twin.stderr
    victim_dir = tmp_path / "victim"
    victim = subprocess.Popen([sys.executable, "-m", "runner", *args, f"hydra.run.dir={victim_dir}"], cwd=tmp_path,
                              env=cli_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = victim_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
            break
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (victim_dir / "summary.json").exists()
    rerun = runner_process(tmp_path, *args, f"hydra.run.dir={victim_dir}")
    assert rerun.returncode == 0, rerun.stderr
    read = lambda d: [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                      for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(victim_dir) == read(tmp_path / "twin")
    assert all("train/objective" in record for record in read(victim_dir))
    summary = json.loads((victim_dir / "summary.json").read_text())
    assert summary["resumed_from_epoch"] >= 1 and summary["final"] == json.loads(
        (tmp_path / "twin" / "summary.json").read_text())["final"]
    a = torch.load(victim_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "twin" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
