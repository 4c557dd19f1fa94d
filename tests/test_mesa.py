"""MESA (runner/optim/mesa.py) against a hand-written float64 step from the paper's equations (as the released
code computes them): the trajectory loss against an EMA teacher's outputs added to the plain gradient, the EMA
update in closed form; 1 forward+backward pass plus one teacher forward a step; BN: the teacher runs in eval mode
on EMA'd statistics and leaves the model's alone; the teacher survives a checkpoint; both bases; the CLI."""
import copy
import io
import json

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad

from runner.optim import OPTIMIZERS, build_optimizer
from runner.optim.bn import FrozenBNStats
from runner.optim.mesa import MESA
from runner.step import StepClosure

N, B = 16, 4


def tiny_problem(bn=False):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 4)] + ([nn.BatchNorm1d(4)] if bn else []) + [nn.Tanh(), nn.Linear(4, 3)]
    model = nn.Sequential(*layers).double()
    x, y = torch.randn(N, 5, dtype=torch.float64), torch.randint(0, 3, (N,))
    return model, x, y


def batches(epoch):
    order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))
    return [order[i:i + B] for i in range(0, N, B)]


def step_closure(model, optimizer, x, y, index):
    params = [p for p in model.parameters() if p.requires_grad]
    return StepClosure(model, nn.functional.cross_entropy, x[index], y[index],
                       autocast=torch.autocast("cpu", enabled=False), frozen_bn=FrozenBNStats(model), params=params,
                       zero_grad=lambda: optimizer.zero_grad(set_to_none=True), indices=index)


def softmax_kl(p_logits, q_logits, tau):
    p = torch.exp(p_logits / tau) / torch.exp(p_logits / tau).sum()
    q = torch.exp(q_logits / tau) / torch.exp(q_logits / tau).sum()
    return (p * (torch.log(p) - torch.log(q))).sum()


def hand_mesa(model, x, y, epochs, lam, tau, decay, start, lr, momentum, wd):
    """t = f(x; v); CE + lam tau² mean_i KL(t_i || z_i) over samples in epoch >= start; torch's SGD; then
    v = decay v + (1 - decay) w, v_0 = w_0."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    v = {k: t.clone() for k, t in w.items()}
    buf = {k: None for k in w}
    for epoch in range(epochs):
        for index in batches(epoch):
            teacher = functional_call(model, v, (x[index],)).detach()

            def loss(p):
                z = functional_call(model, p, (x[index],))
                total = nn.functional.cross_entropy(z, y[index])
                if epoch >= start:
                    for j in range(len(index)):
                        total = total + lam * tau ** 2 * softmax_kl(teacher[j], z[j], tau) / len(index)
                return total
            g = grad(loss)(w)
            for k in w:
                d = g[k] + wd * w[k]
                buf[k] = d.clone() if buf[k] is None else momentum * buf[k] + d
                w[k] = w[k] - lr * buf[k]
                v[k] = decay * v[k] + (1 - decay) * w[k]
    return w, v


def run_mesa(model, x, y, optimizer, epochs, first_epoch=0):
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    steps = 0
    for epoch in range(first_epoch, first_epoch + epochs):
        for index in batches(epoch):
            closure = step_closure(model, optimizer, x, y, index)
            optimizer.step(closure)
            assert closure.passes == 1                      # one forward+backward pass a step ...
            assert closure.forward_passes == 1              # ... and the teacher's, counted apart
            steps += 1
    hook.remove()
    assert len(forwards) == 2 * steps                       # ... and one teacher forward without backward


@pytest.mark.parametrize("start", [0, 2])
def test_mesa_matches_the_hand_written_step_and_ema(start):
    lam, tau, decay, lr, momentum, wd, epochs = 0.8, 2.0, 0.7, 0.2, 0.9, 1e-2, 4
    model, x, y = tiny_problem()
    expected, ema = hand_mesa(model, x, y, epochs, lam, tau, decay, start, lr, momentum, wd)
    optimizer = MESA(model.parameters(), torch.optim.SGD, lam=lam, tau=tau, decay=decay, start_epoch=start, lr=lr,
                     momentum=momentum, weight_decay=wd)
    run_mesa(model, x, y, optimizer, epochs)
    worst = max((p.detach() - expected[k]).abs().max().item() for k, p in model.named_parameters())
    assert worst < 1e-12, worst
    names = [k for k, _ in model.named_parameters()]
    worst_ema = max((v - ema[k]).abs().max().item() for k, v in zip(names, optimizer.ema))
    assert worst_ema < 1e-12, worst_ema
    plain, _ = hand_mesa(model, x, y, epochs, 0.0, tau, decay, start, lr, momentum, wd)
    assert max((plain[k] - expected[k]).abs().max().item() for k in plain) > 1e-3  # the term matters here


def test_bn_teacher_runs_in_eval_mode_on_ema_statistics_and_leaves_the_models_alone():
    decay = 0.5
    model, x, y = tiny_problem(bn=True)
    optimizer = MESA(model.parameters(), torch.optim.SGD, decay=decay, start_epoch=0, lr=0.1)
    bn = model[1]
    ema_stats = [bn.running_mean.clone(), bn.running_var.clone()]
    for step, index in enumerate(batches(0)[:3]):
        optimizer.step(step_closure(model, optimizer, x, y, index))
        assert bn.num_batches_tracked.item() == step + 1    # the student's pass only updates the statistics
        ema_stats = [decay * e + (1 - decay) * b for e, b in zip(ema_stats, (bn.running_mean, bn.running_var))]
    torch.testing.assert_close(optimizer.ema_buffers[0], ema_stats[0], atol=1e-15, rtol=0)
    torch.testing.assert_close(optimizer.ema_buffers[1], ema_stats[1], atol=1e-15, rtol=0)

    teacher = copy.deepcopy(model).eval()                    # the teacher, built by hand: EMA weights and stats
    with torch.no_grad():
        for p, v in zip(teacher.parameters(), optimizer.ema):
            p.copy_(v)
        teacher[1].running_mean.copy_(ema_stats[0])
        teacher[1].running_var.copy_(ema_stats[1])
    state = [t.clone() for t in (*model.parameters(), *model.buffers())]
    closure = step_closure(model, optimizer, x, y, batches(0)[3])
    torch.testing.assert_close(optimizer.teacher_logits(closure), teacher(x[batches(0)[3]]), atol=1e-14, rtol=0)
    assert model.training                                   # and the model is as it was, exactly
    assert all(torch.equal(a, b) for a, b in zip(state, (*model.parameters(), *model.buffers())))


def test_the_teacher_and_epochs_survive_a_checkpoint_exactly():
    model, x, y = tiny_problem(bn=True)
    kwargs = dict(lam=0.5, tau=3.0, decay=0.8, start_epoch=1, lr=0.1, momentum=0.9)
    opt = MESA(model.parameters(), torch.optim.SGD, **kwargs)
    run_mesa(model, x, y, opt, 1)
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)
    assert set(state["mesa"]) == {"epochs", "ema", "ema_buffers"}
    twin_model = copy.deepcopy(model)
    twin = MESA(twin_model.parameters(), torch.optim.SGD, **kwargs)
    twin.load_state_dict(state)
    run_mesa(model, x, y, opt, 2, first_epoch=1)
    run_mesa(twin_model, x, y, twin, 2, first_epoch=1)
    for a, b in zip((*model.parameters(), *model.buffers()), (*twin_model.parameters(), *twin_model.buffers())):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(opt.ema + opt.ema_buffers, twin.ema + twin.ema_buffers))


def test_a_checkpoint_of_plain_sgd_starts_the_teacher_at_the_loaded_weights():
    model, x, y = tiny_problem()
    mesa = MESA(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)       # built first, as the runner does
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for index in batches(0):
        sgd.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        sgd.step()                                                             # stands for loading other weights
    mesa.load_state_dict(sgd.state_dict())
    assert all(torch.equal(v, p) for v, p in zip(mesa.ema, model.parameters()))
    assert mesa.ema_buffers is None and mesa.memory.epochs is None


def test_a_plain_closure_gets_the_base_step_with_a_warning():
    model, x, y = tiny_problem()
    twin = copy.deepcopy(model)
    mesa = MESA(model.parameters(), torch.optim.SGD, start_epoch=0, lr=0.1)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)

    def plain(m, o):
        def closure():
            o.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss
        return closure
    with pytest.warns(UserWarning, match="plain torch closure"):
        mesa.step(plain(model, mesa))
    sgd.step(plain(twin, sgd))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_mesa_over_both_bases_builds_and_steps(base):
    model, x, y = tiny_problem()
    choice = OPTIMIZERS.validate({"name": "mesa", "base": base, "lr": 1e-2, "start_epoch": 0})
    assert choice.entry.capabilities["sample_indices"] is True
    optimizer = build_optimizer(choice, model.parameters())
    assert type(optimizer.base_optimizer).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[base]
    before = [p.detach().clone() for p in model.parameters()]
    run_mesa(model, x, y, optimizer, 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cli_run_is_one_pass_per_step(run_cli, tmp_path):
    out = run_cli("optimizer=mesa", "trainer.epochs=2", "optimizer.start_epoch=0", "model=cnn")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["passes_per_step"] == 1 and summary["passes_per_step_measured"] == 1
    assert summary["forward_only_passes"] == summary["steps"]  # one teacher forward a step
