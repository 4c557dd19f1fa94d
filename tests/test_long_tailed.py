"""Long-tailed data (`dataset.imbalance_ratio`, Cao et al. 2019's exponential profile) and the metrics that go with
it: balanced accuracy (against sklearn) in every evaluation, per-class accuracies for long-tailed runs."""
from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, recall_score

from runner.config import ConfigError
from tasks import ClassificationMetrics, TASKS, long_tailed_counts, long_tailed_indices


# ------------------------------------------------------------------------------------------------------ profile

def test_profile_is_cao_et_al_cifar_lt():
    """The published CIFAR-LT sizes: CIFAR-10-LT rho 100: 12406 images, rho 10: 20431; CIFAR-100-LT rho 100: 10847."""
    assert long_tailed_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(long_tailed_counts(5000, 10, 10)) == 20431
    assert long_tailed_counts(5000, 10, 10)[-1] == 500
    cifar100 = long_tailed_counts(500, 100, 100)
    assert sum(cifar100) == 10847 and (cifar100[0], cifar100[-1]) == (500, 5)
    assert all(a >= b for a, b in zip(cifar100, cifar100[1:]))
    assert long_tailed_counts(5000, 10, 1) == [5000] * 10 and long_tailed_counts(7, 1, 10) == [7]


def test_indices_keep_the_profile_exactly_seeded():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (3000,), generator=g)
    n_max = int(torch.bincount(y).min())
    keep = long_tailed_indices(y, 6, 20.0, seed=3)
    assert torch.bincount(y[keep], minlength=6).tolist() == long_tailed_counts(n_max, 6, 20.0)
    assert torch.equal(keep, keep.unique())                              # sorted, no repeats
    assert torch.equal(keep, long_tailed_indices(y, 6, 20.0, seed=3))    # seeded
    other = long_tailed_indices(y, 6, 20.0, seed=4)
    assert torch.bincount(y[other], minlength=6).tolist() == long_tailed_counts(n_max, 6, 20.0)
    assert not torch.equal(keep, other)                                  # which samples: the seed's choice
    assert torch.bincount(y[long_tailed_indices(y, 6, 1, seed=0)]).tolist() == [n_max] * 6  # 1: exactly balanced
    with pytest.raises(ConfigError, match="at most"):
        long_tailed_indices(y, 6, n_max + 1, seed=0)                     # the tail class would keep nothing
    for bad in (0.5, float("nan"), True):
        with pytest.raises(ConfigError, match="imbalance_ratio"):
            long_tailed_indices(y, 6, bad, seed=0)


# ------------------------------------------------------------------------------------------------------- tasks

def build(name: str, seed: int = 0, **params):
    return TASKS.validate({"name": name, **params}).build(seed=seed, device=torch.device("cpu"))


def test_digits_long_tailed_train_split_test_split_untouched():
    from tasks.image_classification import load_image_data

    raw = load_image_data("digits", "unused", download=False)
    n_max = int(torch.bincount(raw.train.y).min())
    task = build("digits", imbalance_ratio=10)
    counts = long_tailed_counts(n_max, 10, 10)
    assert task.info["train_class_counts"] == counts == torch.bincount(task.train.y, minlength=10).tolist()
    assert counts[0] == n_max and counts[-1] == n_max // 10
    balanced = build("digits")
    assert "train_class_counts" not in balanced.info
    for split in (task, balanced):                                      # the test split as loaded
        assert torch.equal(split.evals["test"].y, raw.test.y) and torch.equal(split.evals["test"].x, raw.test.x)
    rows = {tuple(r.flatten().tolist()) for r in raw.train.x}           # the kept samples are training samples
    assert all(tuple(r.flatten().tolist()) in rows for r in task.train.x)
    assert torch.equal(build("digits", imbalance_ratio=10).train.y, task.train.y)
    assert not torch.equal(build("digits", imbalance_ratio=10, seed=1).train.x, task.train.x)
    assert task.metrics.per_class and not balanced.metrics.per_class
    # then validation split and label noise fall on the long-tailed split
    held = build("digits", imbalance_ratio=10, val_size=0.2, label_noise=0.2)
    assert len(held.train.y) + len(held.evals["val"].y) == sum(counts)
    assert sum(held.info["train_class_counts"]) == len(held.train.y)


def test_tabular_long_tailed():
    task = build("wine", imbalance_ratio=4)
    n_max = 38                                                           # wine's smallest training class (48 * 0.8)
    assert task.info["train_class_counts"] == long_tailed_counts(n_max, 3, 4) == [38, 19, 9]
    assert len(task.evals["test"].y) == 36 and task.metrics.per_class


def test_schema_refuses_a_ratio_below_one():
    with pytest.raises(ConfigError, match="imbalance_ratio"):
        TASKS.validate({"name": "cifar10", "imbalance_ratio": 0.5})
    with pytest.raises(ConfigError, match="imbalance_ratio"):
        TASKS.validate({"name": "breast_cancer", "imbalance_ratio": -2})


# ----------------------------------------------------------------------------------------------------- metrics

@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_and_per_class_accuracy_against_sklearn():
    g = torch.Generator().manual_seed(0)
    k = 6
    y = torch.randint(0, k - 1, (500,), generator=g)                     # class 5 never occurs in the split
    y[:300] = 0                                                          # a head class
    logits = torch.randn(500, k, generator=g)
    logits[torch.arange(500), y] += torch.rand(500, generator=g) * 2     # better than chance, unevenly
    metrics = ClassificationMetrics(k, per_class=True)
    sums = metrics.zeros(torch.device("cpu"))
    for start in range(0, 500, 64):                                      # several batches, as an evaluation
        metrics.update(sums, logits[start:start + 64], y[start:start + 64])
    out = metrics.compute(sums, 500)
    pred = logits.argmax(1).numpy()
    assert out["balanced_acc"] == pytest.approx(balanced_accuracy_score(y.numpy(), pred), abs=1e-12)
    recalls = recall_score(y.numpy(), pred, labels=list(range(k - 1)), average=None, zero_division=0)
    assert [out[f"acc_class_{c}"] for c in range(k - 1)] == pytest.approx(list(recalls), abs=1e-12)
    assert "acc_class_5" not in out                                      # absent: no key, not in the mean
    assert out["acc"] == pytest.approx((pred == y.numpy()).mean(), abs=1e-12)
    assert out["balanced_acc"] != pytest.approx(out["acc"], abs=1e-3)
    plain = ClassificationMetrics(k)                                     # default: balanced_acc, no per-class keys
    sums = plain.zeros(torch.device("cpu"))
    plain.update(sums, logits, y)
    assert set(plain.compute(sums, 500)) == set(plain.names) == {"loss", "acc", "balanced_acc"}
    with pytest.raises(ValueError, match="20"):
        ClassificationMetrics(100, per_class=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metric_updates_do_not_sync_the_host_on_cuda():
    metrics = ClassificationMetrics(10, per_class=True)
    device = torch.device("cuda")
    sums = metrics.zeros(device)
    logits, y = torch.randn(256, 10, device=device), torch.randint(0, 10, (256,), device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            metrics.update(sums, logits, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics.compute(sums, 768)["acc_class_0"] >= 0


# --------------------------------------------------------------------------------------------------------- CLI

def test_cli_long_tailed_digits(run_cli, tmp_path):
    """`dataset.imbalance_ratio=10` from the CLI: the class counts in summary.json, per-class and balanced accuracy
    in every record; the logged test/balanced_acc is sklearn's on the final model's test predictions."""
    from runner.experiment import load_run

    out = run_cli("dataset.imbalance_ratio=10", "trainer.epochs=3", "trainer.progress=false")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["train_class_counts"] == long_tailed_counts(139, 10, 10)   # digits: smallest class 139
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert {"train/balanced_acc", "test/balanced_acc", "test/acc_class_0", "test/acc_class_9"} <= set(record)
    experiment, _ = load_run(run)
    test = experiment.task.evals["test"]
    with torch.no_grad():
        pred = torch.cat([experiment.model(batch.x).argmax(1) for batch in test])
    final = summary["final"]
    assert final["test/balanced_acc"] == pytest.approx(balanced_accuracy_score(test.y.numpy(), pred.numpy()),
                                                       abs=1e-12)
    for c in range(10):
        assert final[f"test/acc_class_{c}"] == pytest.approx(((pred == c) & (test.y == c)).sum().item()
                                                             / (test.y == c).sum().item(), abs=1e-12)


def test_a_checkpoint_between_records_keeps_the_per_class_sums(compose, tmp_path, one_thread):
    """On the step clock a checkpoint can fall between two records: the train-metric sums since the last record,
    the per-class counts included, go with it, and the resumed run's next record is the uninterrupted run's."""
    from runner.run import run

    args = ["dataset.imbalance_ratio=10", "trainer.epochs=null", "trainer.steps=20", "trainer.eval_every_steps=7",
            "trainer.progress=false", "logger=none"]                    # 9 steps an epoch: checkpoints at 9, 18
    assert run(compose(args), tmp_path / "whole")["status"] == "completed"
    middle = torch.load(tmp_path / "whole" / "checkpoints" / "prev.pt", weights_only=True)
    assert middle["progress"]["step"] == 18 and middle["progress"]["pending"]["seen"] > 0
    assert len(middle["progress"]["pending"]["sums"][2][0]) == 10          # (2, K): correct, seen per class
    resume = f"trainer.resume={tmp_path / 'whole' / 'checkpoints' / 'prev.pt'}"
    assert run(compose([*args, resume]), tmp_path / "resumed")["status"] == "completed"
    read = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    whole, resumed = read(tmp_path / "whole"), read(tmp_path / "resumed")
    drop = ("time/", "lr")
    last = {k: v for k, v in whole[-1].items() if not k.startswith(drop)}
    assert {k: v for k, v in resumed[-1].items() if not k.startswith(drop)} == last
    assert "train/acc_class_9" in last or "train/acc_class_0" in last
