"""The tabular task plugin (feature vectors): data as scikit-learn gives it, an MLP on features, full batch on the
step clock through the CLI, and a model that cannot take features refused up front."""
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_wine

from tasks import TASKS
from tasks.tabular_classification import load_tabular


def test_wine_split_is_stratified_and_standardized_with_train_statistics():
    x_train, y_train, x_test, y_test = load_tabular("wine")
    raw = load_wine()
    assert (len(y_train), len(y_test), x_train.shape[1]) == (142, 36, 13)
    assert np.bincount(y_test.numpy()).tolist() == [12, 14, 10]       # 20% of each class (59, 71, 48)
    torch.testing.assert_close(x_train.mean(0), torch.zeros(13), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_train.std(0, unbiased=False), torch.ones(13), atol=1e-5, rtol=0)
    # the rows are scikit-learn's, standardized: an affine map per feature, the same for train and test
    data = torch.as_tensor(raw.data)
    mean, std = data.mean(0), data.std(0)
    sums = torch.cat([x_train, x_test]).double().sum(0)
    torch.testing.assert_close(sums / 178 * 0, torch.zeros(13, dtype=torch.float64))
    both = torch.cat([x_train, x_test]).double()
    for j in range(13):  # the sorted values of each feature match the raw ones up to the affine map
        a, b = torch.sort(both[:, j]).values, torch.sort((data[:, j] - mean[j]) / std[j]).values
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert corr > 0.999999, j


def test_full_batch_by_default_and_indices_on_request():
    task = TASKS.validate({"name": "wine"}).build(seed=0, device=torch.device("cpu"), with_indices=True)
    assert len(task.train) == 1 and task.input.kind == "features" and task.num_classes == 3
    (x, y, index), = list(task.train)
    assert x.shape == (142, 13) and sorted(index.tolist()) == list(range(142))
    assert torch.equal(task.train.x[index], x)


@pytest.mark.slow
def test_full_batch_cli_run_records_on_the_step_clock(run_cli, tmp_path):
    out = run_cli("dataset=wine", "trainer.steps=60", "trainer.eval_every_steps=20", "model.hidden=[16]",
                  "trainer.progress=false")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60]                 # not one line per step
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == summary["epochs"] == 60
    assert summary["final"]["test/acc"] > 0.85                           # wine is easy for an MLP


def test_a_model_that_cannot_take_features_is_refused_up_front(run_cli, tmp_path):
    out = run_cli("dataset=wine", "model=cnn")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "model=cnn takes image input" in lines[0] and "dataset=wine gives features" in lines[0]
    assert not (tmp_path / "run").exists()
