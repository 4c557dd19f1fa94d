"""The grokking task: labels by closed form for every operation, a seeded disjoint split, token inputs through
the MLP, and full-batch training on the step clock through the CLI."""
import json

import pytest
import torch

from runner.config import ConfigError
from tasks import TASKS
from tasks.modular_arithmetic import all_pairs


@pytest.mark.parametrize("operation, expected", [
    ("add", lambda a, b, p: (a + b) % p), ("sub", lambda a, b, p: (a - b) % p),
    ("mul", lambda a, b, p: (a * b) % p), ("div", lambda a, b, p: next(c for c in range(p) if (c * b) % p == a)),
])
def test_every_pair_and_its_label(operation, expected):
    p = 7
    x, y = all_pairs(p, operation)
    pairs = [(a, b) for a in range(p) for b in range(1 if operation == "div" else 0, p)]
    assert [tuple(row) for row in x.tolist()] == pairs
    assert y.tolist() == [expected(a, b, p) for a, b in pairs]  # division: the c with c * b = a (mod p)


def test_the_split_is_seeded_disjoint_and_complete():
    build = lambda seed: TASKS.validate({"name": "modular_arithmetic", "p": 11}).build(seed=seed, device=torch.device("cpu"))
    task, again, other = build(0), build(0), build(1)
    train, test = task.train.x, task.evals["test"].x
    assert (len(train), len(test)) == (48, 73)  # round(0.4 * 121)
    keys = lambda x: {tuple(r) for r in x.tolist()}
    assert keys(train).isdisjoint(keys(test)) and len(keys(train) | keys(test)) == 121
    assert torch.equal(again.train.x, train) and not torch.equal(other.train.x, train)
    assert task.input.kind == "tokens" and (task.input.vocab, task.input.length, task.num_classes) == (11, 2, 11)
    assert len(task.train) == 1  # full batch by default


def test_p_must_be_prime():
    with pytest.raises(ConfigError, match="dataset.p"):
        TASKS.validate({"name": "modular_arithmetic", "p": 12})


@pytest.mark.slow
def test_full_batch_training_of_the_mlp_on_token_pairs(run_cli, tmp_path):
    out = run_cli("dataset=modular_arithmetic", "dataset.p=23", "dataset.train_fraction=0.8", "optimizer=adamw",
                  "optimizer.lr=3e-3", "optimizer.weight_decay=1.0", "scheduler=constant", "model.hidden=[128,128]",
                  "trainer.steps=300", "trainer.eval_every_steps=100", "trainer.progress=false")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [100, 200, 300]
    assert records[-1]["train/acc"] == 1.0  # it memorizes the training pairs
