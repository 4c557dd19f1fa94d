"""The loop's contracts: the step clock (cadences, host syncs only at records), callbacks merged into records,
training length in steps, and the closure protocol (subsets, m-chunks, per-sample losses, indices, BN)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from runner.data import DeviceBatches
from runner.experiment import Experiment
from runner.losses.cross_entropy import CrossEntropy
from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.optim.bn import FrozenBNStats
from runner.step import StepClosure
from runner.train import Cadence, Callback, Progress, TrainerConfig, train
from tasks import FeatureInput, Task

DEVICE = torch.device("cpu")


class Collect:
    """A sink that keeps what the loop hands it."""

    def __init__(self):
        self.records, self.checkpoints, self.bests = [], [], []
        self.progress = None

    def record(self, metrics):
        self.records.append(metrics)

    def checkpoint(self):
        self.checkpoints.append(self.records[-1]["step"] if self.records else None)

    def best(self):
        self.bests.append(self.records[-1]["step"])


def loop_experiment(model, x, y, optimizer_node, trainer: TrainerConfig, batch_size: int, test=None):
    """An Experiment for the loop from parts: feature inputs on the CPU, the given optimizer config."""
    choice = OPTIMIZERS.validate(optimizer_node)
    caps = capabilities(choice)
    train_batches = DeviceBatches(x, y, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                                  with_indices=caps.sample_indices)
    evals = {} if test is None else {"test": DeviceBatches(*test, 1000, shuffle=False)}
    task = Task(train=train_batches, evals=evals, input=FeatureInput(x[0].numel()), num_classes=int(y.max()) + 1)
    optimizer = build_optimizer(choice, model.parameters())
    steps_per_epoch = len(train_batches)
    total = trainer.total_steps(steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (total + 1))
    return Experiment(SimpleNamespace(trainer=trainer), DEVICE, task, model, CrossEntropy(), optimizer, scheduler, caps)


def blobs(n=64, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 2.0 * nn.functional.one_hot(y, d).float()
    return x, y


def count_items(monkeypatch) -> list:
    """Count host syncs by `.item()` (the loop's only way of reading device values)."""
    calls = []
    original = torch.Tensor.item

    def item(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    return calls


def test_full_batch_run_syncs_and_records_only_at_cadence_points(monkeypatch):
    """One step per epoch, 40 steps, records every 10: 4 records, evaluations and checkpoints, not 40."""
    torch.manual_seed(0)
    x, y = blobs()
    experiment = loop_experiment(nn.Linear(5, 3), x, y, {"name": "sgd", "lr": 0.1}, batch_size=len(y),
                                 trainer=TrainerConfig(steps=40, eval_every_steps=10, progress=False), test=blobs(seed=1))
    sink, syncs = Collect(), count_items(monkeypatch)
    status = train(experiment, Progress(), sink)
    assert status == "completed"
    assert [r["step"] for r in sink.records] == [10, 20, 30, 40]
    assert [r["epoch"] for r in sink.records] == [10, 20, 30, 40]          # one step per epoch
    assert all({"train/loss", "train/acc", "test/loss", "test/acc", "lr", "passes"} <= set(r) for r in sink.records)
    assert sink.checkpoints == [10, 20, 30, 40]                             # with the records, and the end
    assert len(syncs) <= 4 * 4  # per record: train loss + acc, test loss + acc
    assert sink.records[-1]["train/loss"] < sink.records[0]["train/loss"]  # it trains


def test_train_metrics_are_means_over_the_samples_since_the_last_record():
    """With lr tiny the weights barely move, so the record's train loss is the mean loss over its steps."""
    torch.manual_seed(0)
    x, y = blobs(n=60)
    model = nn.Linear(5, 3)
    expected = nn.functional.cross_entropy(model(x), y).item()
    experiment = loop_experiment(model, x, y, {"name": "sgd", "lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0},
                                 batch_size=16, trainer=TrainerConfig(epochs=1, progress=False))
    sink = Collect()
    train(experiment, Progress(), sink)
    assert len(sink.records) == 1 and sink.records[0]["epoch"] == 1
    assert sink.records[0]["train/loss"] == pytest.approx(expected, rel=1e-6)  # 4 batches: 16+16+16+12 samples


class Probe(Callback):
    """A callback on the step clock that reports the step it saw, as an analysis would report curvature."""

    def __init__(self, every_steps):
        self.cadence = Cadence(every_steps=every_steps, at_end=False)
        self.seen = []

    def __call__(self, experiment, progress):
        self.seen.append(progress.step)
        return {"probe/step": progress.step}


def test_callbacks_run_on_their_cadence_and_their_metrics_join_the_records():
    torch.manual_seed(0)
    x, y = blobs(n=64)  # batch 16: 4 steps per epoch
    experiment = loop_experiment(nn.Linear(5, 3), x, y, {"name": "sgd"}, batch_size=16,
                                 trainer=TrainerConfig(epochs=3, progress=False), test=blobs(seed=1))
    probe, sink = Probe(every_steps=3), Collect()
    train(experiment, Progress(), sink, callbacks=[probe])
    assert probe.seen == [3, 6, 9, 12]
    by_step = {r["step"]: r for r in sink.records}
    assert sorted(by_step) == [3, 4, 6, 8, 9, 12]                         # epoch ends and probe points
    assert by_step[3] == {"step": 3, "epoch": 0.75, "lr": by_step[3]["lr"], "passes": 3, "probe/step": 3}
    assert by_step[6]["epoch"] == 1.5 and "train/loss" not in by_step[6]  # mid-epoch: only the callback
    assert {"train/loss", "test/acc", "probe/step", "time/epoch_s"} <= set(by_step[12])


def test_training_length_in_steps_may_end_mid_epoch():
    torch.manual_seed(0)
    x, y = blobs(n=64)
    experiment = loop_experiment(nn.Linear(5, 3), x, y, {"name": "sgd"}, batch_size=16,
                                 trainer=TrainerConfig(steps=6, progress=False), test=blobs(seed=1))
    progress, sink = Progress(), Collect()
    assert train(experiment, progress, sink) == "completed"
    assert (progress.step, progress.epoch) == (6, 1)
    assert [(r["step"], r["epoch"]) for r in sink.records] == [(4, 1), (6, 1.5)]
    assert "test/acc" in sink.records[-1] and progress.final["test/acc"] == sink.records[-1]["test/acc"]
    assert sink.checkpoints == [4, 6]


def test_divergence_is_a_status_and_stops_at_the_record():
    torch.manual_seed(0)
    x, y = blobs(n=64)
    experiment = loop_experiment(nn.Linear(5, 3), x, y, {"name": "sgd", "lr": 1e30}, batch_size=16,
                                 trainer=TrainerConfig(epochs=5, progress=False), test=blobs(seed=1))
    progress, sink = Progress(), Collect()
    assert train(experiment, progress, sink) == "diverged"
    assert not math.isfinite(sink.records[-1]["train/loss"]) and "test/loss" not in sink.records[-1]
    assert set(progress.final) == {"train/loss", "train/acc"}
    assert sink.checkpoints == []  # a diverged state is never checkpointed


class Slow(Callback):
    """A callback that takes 100 s of the loop's (fake) clock, as a long evaluation or analysis would."""

    def __init__(self, clock: list, cadence: Cadence):
        self.clock, self.cadence = clock, cadence

    def __call__(self, experiment, progress):
        self.clock[0] += 100.0
        return {}


@pytest.mark.parametrize("batch_size, cadence", [(64, Cadence(every_epochs=1)), (16, Cadence(every_steps=2))],
                         ids=["full-batch-slow-at-epoch-ends", "4-steps-slow-mid-epoch"])
def test_epoch_time_is_the_training_steps_only(monkeypatch, batch_size, cadence):
    """`time/epoch_s` is the epoch's training time: for a full-batch task one step, not the step plus its
    evaluation; evaluations and analyses mid-epoch are not in it either. A fake clock (1 s per read; the callback
    adds 100 s): nothing sleeps, and the 100 s must not show."""
    import runner.train

    clock = [0.0]

    def perf_counter():
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(runner.train, "time", SimpleNamespace(perf_counter=perf_counter))
    torch.manual_seed(0)
    x, y = blobs(n=64)
    experiment = loop_experiment(nn.Linear(5, 3), x, y, {"name": "sgd"}, batch_size=batch_size,
                                 trainer=TrainerConfig(epochs=3, progress=False), test=blobs(seed=1))
    sink = Collect()
    train(experiment, Progress(), sink, callbacks=[Slow(clock, cadence)])
    times = [r["time/epoch_s"] for r in sink.records if "time/epoch_s" in r]
    assert len(times) == 3 and all(0 < t < 10 for t in times), times


# ------------------------------------------------------------------------------------------ the closure contract

def closure_for(model, x, y, **kw):
    return StepClosure(model, lambda logits, t, reduction="mean": nn.functional.cross_entropy(logits, t, reduction=reduction),
                       x, y, autocast=torch.autocast("cpu", enabled=False), frozen_bn=FrozenBNStats(model),
                       params=list(model.parameters()), zero_grad=lambda: model.zero_grad(set_to_none=True), **kw)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_closure_chunks_average_to_the_batch_gradient_and_count_fractional_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = blobs(n=24)
    closure = closure_for(model, x.double(), y)
    closure()
    full = grads(model)
    chunks = closure.split(8)
    assert [len(c.y) for c in chunks] == [8, 8, 8]
    total = torch.zeros_like(full)
    for chunk in chunks:
        chunk()
        total += grads(model)
    torch.testing.assert_close(total / 3, full, rtol=1e-12, atol=1e-12)
    assert closure.passes == 2  # one full pass + three thirds


def test_closure_subset_per_sample_losses_and_indices():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = blobs(n=10)
    index = torch.arange(100, 110)
    closure = closure_for(model, x.double(), y, per_sample=True, indices=index)
    loss = closure()
    expected = nn.functional.cross_entropy(model(x.double()), y, reduction="none")
    torch.testing.assert_close(closure.per_sample_loss, expected.detach())
    torch.testing.assert_close(loss, expected.mean())
    keep = closure.per_sample_loss > closure.per_sample_loss.median()
    closure(select=keep)
    subset_grad = grads(model)
    model.zero_grad()
    nn.functional.cross_entropy(model(x.double()[keep]), y[keep]).backward()
    torch.testing.assert_close(subset_grad, grads(model))
    assert closure.passes == 1 + keep.sum().item() / 10
    assert torch.equal(closure.indices, index)


def test_bn_running_stats_move_in_the_first_pass_of_a_step_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3))
    x, y = blobs(n=16)
    closure = closure_for(model, x, y)
    closure()
    after_first = model[0].running_mean.clone()
    closure()
    closure.split(4)[0]()
    assert torch.equal(model[0].running_mean, after_first) and model[0].num_batches_tracked.item() == 1


def test_declared_capabilities_are_what_the_loop_provides():
    """An optimizer declaring `sample_indices` and `per_sample_loss` gets both in its closure, through the loop."""
    from dataclasses import dataclass

    from runner.optim.params import LR

    seen = []

    class Inspect(torch.optim.SGD):
        def step(self, closure):
            loss = closure()
            seen.append((closure.indices.clone(), closure.per_sample_loss.clone(), closure.y.clone()))
            super().step()
            return loss

    @dataclass
    class InspectParams(LR):
        lr: float = 0.1

    OPTIMIZERS.register("_inspect", InspectParams, "test only", sample_indices=True, per_sample_loss=True)(
        lambda params, lr: Inspect(params, lr=lr))
    try:
        torch.manual_seed(0)
        x, y = blobs(n=32)
        experiment = loop_experiment(nn.Linear(5, 3), x, y, {"name": "_inspect"}, batch_size=8,
                                     trainer=TrainerConfig(epochs=1, progress=False))
        train(experiment, Progress(), Collect())
    finally:
        OPTIMIZERS._entries.pop("_inspect")
    assert len(seen) == 4
    assert sorted(torch.cat([index for index, _, _ in seen]).tolist()) == list(range(32))  # each sample once
    for index, losses, targets in seen:
        assert torch.equal(y[index], targets) and losses.shape == (8,)
