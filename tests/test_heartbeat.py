"""Progress of long work outside a terminal (runner/heartbeat.py): a start line with the work to do, then heartbeats
with progress and ETA; on a terminal, a bar and each record printed once. In process, with $RUNNER_HEARTBEAT_S=0
(a heartbeat after every unit), so nothing waits."""
from __future__ import annotations

import logging
import re
import sys

import pytest
import torch
import torch.nn as nn

from runner.heartbeat import Work, duration
from runner.train import Progress, TrainerConfig, train
from tests.test_loop import Collect, blobs, loop_experiment


@pytest.fixture
def beats(monkeypatch, caplog):
    """Heartbeats after every unit of work; returns a function giving the log lines so far."""
    monkeypatch.setenv("RUNNER_HEARTBEAT_S", "0")
    caplog.set_level(logging.INFO)
    return lambda: [r.getMessage() for r in caplog.records]


def test_a_start_line_then_heartbeats_with_progress_and_eta(beats):
    with Work("landscape 2-D", 4, unit="points", detail="on 1437 train samples", show=False) as work:
        for _ in range(4):
            work.update()
    lines = beats()
    assert lines[0] == "landscape 2-D: 4 points on 1437 train samples"
    assert re.fullmatch(r"landscape 2-D: 1/4 points \(25%\), \d+ s elapsed, ETA \d+ s", lines[1]), lines
    assert len([line for line in lines if "ETA" in line]) == 4
    assert re.fullmatch(r"landscape 2-D: 4 points done in \d+ s", lines[-1]), lines


def test_no_heartbeat_before_the_interval_and_none_after_a_printed_line(caplog):
    caplog.set_level(logging.INFO)
    with Work("training", 10, show=False, interval=3600) as work:
        work.update(5)
        work.touch()
        work.update(5)
    assert [r.getMessage() for r in caplog.records] == ["training: 10 steps"]
    assert duration(5) == "5 s" and duration(573) == "9 min 33 s" and duration(7500) == "2 h 05 min"


def test_training_outside_a_terminal_says_what_it_will_do_and_beats(beats):
    torch.manual_seed(0)
    x, y = blobs(n=64)  # batch 16: 4 steps per epoch
    experiment = loop_experiment(nn.Linear(5, 3), x, y, {"name": "sgd"}, batch_size=16,
                                 trainer=TrainerConfig(epochs=2, progress=False))
    train(experiment, Progress(), Collect())
    lines = beats()
    assert lines[0] == "training: 8 steps (2 epochs of 4 steps)"
    assert any(re.fullmatch(r"training: 3/8 steps \(38%\), \d+ s elapsed, ETA \d+ s", line) for line in lines), lines


class LoggingSink(Collect):
    """Logs each record as runner.run's sink does (one logger line per record)."""

    def record(self, metrics):
        super().record(metrics)
        logging.getLogger("runner.run").info("step %d epoch %s", metrics["step"], metrics["epoch"])


def test_on_a_terminal_each_record_is_printed_once(caplog, capsys):
    caplog.set_level(logging.INFO)
    console = logging.StreamHandler(sys.stderr)  # the console handler Hydra installs (here: onto the captured stderr)
    logging.getLogger().addHandler(console)
    try:
        torch.manual_seed(0)
        x, y = blobs(n=64)
        experiment = loop_experiment(nn.Linear(5, 3), x, y, {"name": "sgd"}, batch_size=16,
                                     trainer=TrainerConfig(epochs=2, progress=True), test=blobs(seed=1))
        train(experiment, Progress(), LoggingSink())
    finally:
        logging.getLogger().removeHandler(console)
    err = capsys.readouterr().err
    for record in ("step 4 epoch 1", "step 8 epoch 2"):
        assert len(re.findall(rf"{record}\b", err)) == 1, err  # once, not also as a tqdm.write line
        assert record in re.split(r"[\r\n]", err), err  # on a line of its own, not glued to the bar
    assert logging.getLogger().handlers.count(console) == 0  # the bar's redirection of the log is undone


def test_analyses_outside_a_terminal_say_what_they_will_do_and_beat(beats, compose, tmp_path, one_thread):
    """The landscape's points, the Hessian's products and the sharpness's gradient passes, through the same helper."""
    from runner.analysis.schedule import analyze
    from runner.experiment import build
    from runner.spec import validate
    from tests.test_analysis import fast

    cfg = compose(["model.hidden=[8]", "logger=none", *fast("landscape_1d", "hessian", "sharpness")])
    spec = validate(cfg)
    experiment = build(spec, torch.device("cpu"))
    metrics, errors = analyze(experiment, Progress(), spec.analysis, tmp_path / "analysis", show_progress=False)
    assert not errors and "hessian/lambda_max" in metrics
    lines = beats()
    assert "landscape 1-D: 5 points on 256 train + 256 test samples" in lines
    assert "hessian: 10 Hessian-vector products on 256 samples" in lines  # 6 Lanczos iterations + 4 probes
    assert "sharpness: 4 gradient passes on 256 samples" in lines  # one-step, 2-step ascent, ASAM
    for what, unit in (("landscape 1-D", "points"), ("hessian", "Hessian-vector products"),
                       ("sharpness", "gradient passes")):
        assert any(re.match(rf"{what}: \d+/\d+ {unit} \(\d+%\), .* ETA", line) for line in lines), (what, lines)
