"""SAF (runner/optim/saf.py) against a hand-written float64 step from the paper's equations (as the released code
computes them): the trajectory loss's gradient added to the plain gradient, each sample's stored outputs updated
for exactly the batch's indices; 1 pass per step; the memory grows lazily and survives a checkpoint; both bases;
the plain-closure fallback; the CLI."""
import copy
import io
import json

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer
from runner.optim.bn import FrozenBNStats
from runner.optim.saf import SAF, SampleMemory
from runner.step import StepClosure

N, B = 16, 4


def tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(N, 5, dtype=torch.float64), torch.randint(0, 3, (N,))
    return model, x, y


def batches(epoch):
    """The batch indices of one epoch: a seeded permutation of the N samples, B at a time (as the loop's data)."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))
    return [order[i:i + B] for i in range(0, N, B)]


def step_closure(model, optimizer, x, y, index):
    params = [p for p in model.parameters() if p.requires_grad]
    return StepClosure(model, nn.functional.cross_entropy, x[index], y[index],
                       autocast=torch.autocast("cpu", enabled=False), frozen_bn=FrozenBNStats(model), params=params,
                       zero_grad=lambda: optimizer.zero_grad(set_to_none=True), indices=index)


def softmax_kl(p_logits, q_logits, tau):
    """KL(softmax(p/tau) || softmax(q/tau)) of one sample, written out."""
    p = torch.exp(p_logits / tau) / torch.exp(p_logits / tau).sum()
    q = torch.exp(q_logits / tau) / torch.exp(q_logits / tau).sum()
    return (p * (torch.log(p) - torch.log(q))).sum()


def hand_saf(model, x, y, epochs, lam, tau, ago, start, lr, momentum, wd):
    """Du et al. 2022, Algorithm 1 with the code's loss: CE + lam tau² mean_i KL(past_i || now_i) over the samples
    whose epoch e >= start and e >= ago; then torch's SGD. `outputs[i][e]`: sample i's logits in epoch e."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buf = {k: None for k in w}
    outputs = {i: [] for i in range(N)}
    for epoch in range(epochs):
        for index in batches(epoch):
            def loss(p):
                z = functional_call(model, p, (x[index],))
                total = nn.functional.cross_entropy(z, y[index])
                for j, i in enumerate(index.tolist()):
                    e = len(outputs[i])                     # the sample's epoch = times seen before
                    if e >= ago and e >= start:
                        total = total + lam * tau ** 2 * softmax_kl(outputs[i][e - ago], z[j], tau) / len(index)
                return total
            g = grad(loss)(w)
            z = functional_call(model, w, (x[index],)).detach()
            for j, i in enumerate(index.tolist()):
                outputs[i].append(z[j])
            for k in w:
                d = g[k] + wd * w[k]
                buf[k] = d.clone() if buf[k] is None else momentum * buf[k] + d
                w[k] = w[k] - lr * buf[k]
    return w, outputs


def run_saf(model, x, y, optimizer, epochs, first_epoch=0):
    for epoch in range(first_epoch, first_epoch + epochs):
        for index in batches(epoch):
            closure = step_closure(model, optimizer, x, y, index)
            optimizer.step(closure)
            assert closure.passes == 1                      # one forward+backward pass a step


@pytest.mark.parametrize("ago, start", [(1, 2), (2, 0)])
def test_saf_matches_the_hand_written_step_and_memory(ago, start):
    lam, tau, lr, momentum, wd, epochs = 0.7, 2.0, 0.2, 0.9, 1e-2, 5
    model, x, y = tiny_problem()
    expected, outputs = hand_saf(model, x, y, epochs, lam, tau, ago, start, lr, momentum, wd)
    optimizer = SAF(model.parameters(), torch.optim.SGD, lam=lam, tau=tau, epochs_ago=ago, start_epoch=start, lr=lr,
                    momentum=momentum, weight_decay=wd)
    run_saf(model, x, y, optimizer, epochs)
    worst = max((p.detach() - expected[k]).abs().max().item() for k, p in model.named_parameters())
    assert worst < 1e-12, worst
    memory = optimizer.memory
    assert memory.epochs.tolist() == [epochs] * N          # sized from the indices seen; every sample counted
    for i in range(N):                                     # the ring holds the last ago + 1 epochs of each sample
        for e in range(epochs - ago - 1, epochs):
            torch.testing.assert_close(memory.outputs[e % (ago + 1), i], outputs[i][e], atol=1e-12, rtol=0)
    plain, _ = hand_saf(model, x, y, epochs, 0.0, tau, ago, start, lr, momentum, wd)
    assert max((plain[k] - expected[k]).abs().max().item() for k in plain) > 1e-3  # the term matters here


def test_the_memory_grows_to_the_largest_index_and_keeps_its_contents():
    memory = SampleMemory(slots=2)
    memory.ensure(torch.tensor([3, 1]), num_classes=5)
    assert memory.outputs.shape == (2, 4, 5) and len(memory.epochs) == 4
    memory.outputs[1, 3] = 7.0
    memory.epochs[3] = 2
    memory.ensure(torch.tensor([0, 15]), num_classes=5)
    assert memory.outputs.shape == (2, 16, 5) and memory.outputs[1, 3].tolist() == [7.0] * 5
    assert memory.epochs[3] == 2 and memory.epochs[4:].sum() == 0
    memory.ensure(torch.tensor([2]), num_classes=5)         # no growth below the size
    assert memory.outputs.shape == (2, 16, 5)
    with pytest.raises(ValueError, match="classes"):
        memory.ensure(torch.tensor([2]), num_classes=4)


def test_the_memory_survives_a_checkpoint_exactly():
    model, x, y = tiny_problem()
    kwargs = dict(lam=0.5, tau=3.0, epochs_ago=1, start_epoch=0, lr=0.1, momentum=0.9)
    opt = SAF(model.parameters(), torch.optim.SGD, **kwargs)
    run_saf(model, x, y, opt, 2)
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)             # the runner's checkpoints are read this way
    assert set(state["saf"]) == {"epochs", "outputs"}
    twin_model = copy.deepcopy(model)
    twin = SAF(twin_model.parameters(), torch.optim.SGD, **kwargs)
    twin.load_state_dict(state)
    run_saf(model, x, y, opt, 2, first_epoch=2)
    run_saf(twin_model, x, y, twin, 2, first_epoch=2)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.memory.outputs, twin.memory.outputs)


def test_a_plain_closure_gets_the_base_step_with_a_warning():
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    saf = SAF(model.parameters(), torch.optim.SGD, start_epoch=0, lr=0.1)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)

    def plain(m, o):
        def closure():
            o.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss
        return closure
    with pytest.warns(UserWarning, match="sample indices"):
        saf.step(plain(model, saf))
    sgd.step(plain(twin, sgd))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_saf_over_both_bases_builds_and_steps(base):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "saf", "base": base, "lr": 1e-2, "start_epoch": 0, "epochs_ago": 1})
    assert choice.entry.capabilities["sample_indices"] is True
    optimizer = build_optimizer(choice, model.parameters())
    assert type(optimizer.base_optimizer).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[base]
    before = [p.detach().clone() for p in model.parameters()]
    run_saf(model, x, y, optimizer, 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cli_run_is_one_pass_per_step(run_cli, tmp_path):
    out = run_cli("optimizer=saf", "trainer.epochs=2", "optimizer.start_epoch=0", "optimizer.epochs_ago=1")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["passes_per_step"] == 1 and summary["passes_per_step_measured"] == 1
