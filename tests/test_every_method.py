"""Every optimizer and every loss in conf/ runs from the CLI on digits and on the grokking task (modular addition).

One Hydra sweep per group and task (`python -m runner -m optimizer=<all of conf/optimizer>`, one process, the
basic launcher), so a method added to conf/ is covered without touching this file. For each run: it completed,
its metrics are finite, it measured the passes a step its capabilities declare (the cost every comparison in
the report relies on), and the grokking task logged its diagnostics. Method-specific CLI checks (ESAM's second
pass fraction, MoMo's step sizes, ...) stay in the method's own test file.
"""
import json
import math

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, runner_process

OPTIMIZERS = sorted(p.stem for p in (CONF_DIR / "optimizer").glob("*.yaml"))
LOSSES = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))
TASKS = {
    # the default run, shortened: 1 epoch (23 full batches of 64 digits)
    "digits": ["trainer.epochs=1"],
    # the grokking setting at a small modulus: full batch (one step an epoch), 3 steps, each one recorded
    "grokking": ["dataset=modular_arithmetic", "dataset.p=23", "model.bias=false", "scheduler=constant",
                 "trainer.steps=3", "trainer.eval_every_steps=1"],
}
GROKKING_KEYS = {"train/softmax_collapse", "train/zero_loss", "weights/norm", "grad/norm", "grad/cos_weights"}


def sweep(tmp_path, group: str, names: list[str], task: str) -> dict[str, dict]:
    """name -> {"summary", "metrics", "config"} for one sweep over every option of `group` on `task`."""
    out = tmp_path / "sweep"
    result = runner_process(tmp_path, "-m", f"{group}={','.join(names)}", *TASKS[task], f"hydra.sweep.dir={out}",
                            "trainer.progress=false", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {}
    for path in sorted(out.rglob("summary.json")):
        config = OmegaConf.to_container(OmegaConf.load(path.parent / ".hydra" / "config.yaml"))
        metrics = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
        runs[config[group]["name"]] = {"summary": json.loads(path.read_text()), "metrics": metrics,
                                       "config": config}
    return runs


@pytest.fixture(scope="module", params=list(TASKS))
def optimizer_runs(request, tmp_path_factory):
    return request.param, sweep(tmp_path_factory.mktemp(f"optimizers_{request.param}"), "optimizer", OPTIMIZERS,
                                request.param)


@pytest.fixture(scope="module", params=list(TASKS))
def loss_runs(request, tmp_path_factory):
    return request.param, sweep(tmp_path_factory.mktemp(f"losses_{request.param}"), "loss", LOSSES, request.param)


def check_run(name: str, task: str, run: dict) -> None:
    summary, metrics = run["summary"], run["metrics"]
    assert summary["status"] == "completed" and summary["error"] is None, (name, summary["error"])
    assert metrics and len(metrics) == {"digits": 1, "grokking": 3}[task], name
    for record in metrics:
        for key in ("train/loss", "test/loss", "train/acc", "test/acc"):
            assert math.isfinite(record[key]), (name, key, record[key])
        if task == "grokking":
            assert GROKKING_KEYS <= set(record), name
            assert all(math.isfinite(record[key]) for key in GROKKING_KEYS), (name, record)
    assert summary["steps"] == metrics[-1]["step"] == {"digits": 23, "grokking": 3}[task], name


def test_every_optimizer_runs_and_measures_its_declared_passes(optimizer_runs):
    from runner.optim import OPTIMIZERS as REGISTRY, capabilities

    task, runs = optimizer_runs
    assert sorted(runs) == OPTIMIZERS
    for name, run in runs.items():
        check_run(name, task, run)
        declared = capabilities(REGISTRY.validate(run["config"]["optimizer"])).passes_per_step
        summary = run["summary"]
        assert summary["passes_per_step"] == declared, (name, summary["passes_per_step"], declared)
        # the declared cost is the long-run average: a method that takes its extra passes every k-th step
        # (LookSAM) measures one pass more or less over a run that is not a multiple of k steps
        measured = summary["passes_per_step_measured"]
        assert abs(measured - declared) <= 1 / summary["steps"] + 1e-9, (name, measured, declared)


def test_every_loss_runs_and_logs_cross_entropy_and_its_own_value(loss_runs):
    """`train/loss` stays plain cross-entropy whatever the objective; `train/objective` is the objective's own
    value (absent for plain cross-entropy, where they are the same). On the grokking task (full batch, a record
    every step) the first record is the initial weights': both checked against a rebuild of them."""
    import torch
    import torch.nn.functional as F

    from runner.experiment import build
    from runner.spec import validate

    task, runs = loss_runs
    assert sorted(runs) == LOSSES
    for name, run in runs.items():
        check_run(name, task, run)
        assert run["summary"]["passes_per_step_measured"] == 1, name
        assert all(("train/objective" in r) == (name != "cross_entropy") for r in run["metrics"]), name
        if task != "grokking" or name == "cross_entropy":
            continue
        experiment = build(validate(OmegaConf.create(run["config"])), torch.device("cpu"))
        split = experiment.task.train
        with torch.no_grad():
            logits = experiment.model(split.x)
            indices = torch.arange(len(split.y))   # ALDR-KL's per-sample lambdas all start at lambda_0
            kwargs = {"indices": indices} if getattr(experiment.objective, "needs_indices", False) else {}
            objective = experiment.objective(logits, split.y, **kwargs).item()
            ce = F.cross_entropy(logits, split.y).item()
        first = run["metrics"][0]
        assert first["train/loss"] == pytest.approx(ce, rel=1e-6), name
        assert first["train/objective"] == pytest.approx(objective, rel=1e-6, abs=1e-9), name
        # so that the two checks above tell them apart (label smoothing at near-uniform initial predictions is the
        # closest: 7e-6 relative, StableMax at small logits)
        assert abs(objective - ce) > 5e-6 * ce, (name, objective, ce)
