"""Losses against closed forms, and the measured loss that every report uses."""
import math

import torch

from runner.losses import LOSSES, measured_loss


def test_label_smoothed_cross_entropy_closed_form():
    """torch's convention: target (1 - s) onehot + s / C, so loss = (1 - s) CE + s * mean_k(-log p_k)."""
    s, logits, y = 0.2, torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=torch.float64), torch.tensor([0, 1])
    loss = LOSSES.validate({"name": "cross_entropy", "label_smoothing": s}).build(num_classes=3)
    log_p = logits - torch.logsumexp(logits, 1, keepdim=True)
    expected = [(1 - s) * -log_p[i, y[i]] + s * -log_p[i].mean() for i in range(2)]
    torch.testing.assert_close(loss(logits, y, reduction="none"), torch.stack(expected))  # float64 stays float64
    torch.testing.assert_close(loss(logits.float(), y, reduction="none"), torch.stack(expected).float())
    assert math.isclose(loss(logits, y).item(), float(sum(expected) / 2), rel_tol=1e-6)
    # what is reported stays plain cross-entropy
    assert math.isclose(measured_loss(logits, y).item(), float(-(log_p[0, 0] + log_p[1, 1]) / 2), rel_tol=1e-6)


def test_stablemax_cross_entropy_closed_form_and_gradient():
    """s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0); loss = -log(s(x_y) / sum_j s(x_j)) (Prieto et al. 2025)."""
    import torch.autograd

    from runner.losses.stablemax import stablemax_s

    x = torch.tensor([-3.0, -1.0, -1e-9, 0.0, 1e-9, 1.0, 1.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([1 / 4, 1 / 2, 1 / (1 + 1e-9), 1.0, 1 + 1e-9, 2.0, 2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(stablemax_s(x), expected)                 # continuous at 0, no inf at x = 1
    loss = LOSSES.validate({"name": "stablemax"}).build(num_classes=3)
    logits = torch.tensor([[2.0, 0.0, -1.0], [-0.5, 1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1])
    s = [[3.0, 1.0, 0.5], [1 / 1.5, 2.0, 4.0]]
    by_hand = [-math.log(s[0][0] / sum(s[0])), -math.log(s[1][1] / sum(s[1]))]
    torch.testing.assert_close(loss(logits, y, reduction="none"), torch.tensor(by_hand, dtype=torch.float64))
    assert math.isclose(loss(logits, y).item(), sum(by_hand) / 2, rel_tol=1e-12)
    assert torch.autograd.gradcheck(lambda z: loss(z, y), (logits,))      # the gradient is the math's
    # where softmax collapses in float32 (the true class's loss is exactly 0), StableMax still has a gradient
    big = torch.tensor([[120.0, 0.0, 0.0]], requires_grad=True)
    assert torch.nn.functional.cross_entropy(big, torch.tensor([0])).item() == 0.0
    stable = loss(big, torch.tensor([0]))
    stable.backward()
    assert stable.item() > 0 and big.grad.abs().sum().item() > 0


def test_loss_dtype_casts_the_logits_of_a_float32_model():
    """`loss.dtype=float64` (the paper's `--cross_entropy_dtype float64`): a float32 model's logits go into the
    loss as float64 and the gradient flows back as float32; the float64 loss equals the float64 closed form, and
    where float32 softmax collapses (loss exactly 0) the float64 cross-entropy still has a loss and a gradient."""
    y = torch.tensor([0])
    for name in ("cross_entropy", "stablemax"):
        loss64 = LOSSES.validate({"name": name, "dtype": "float64"}).build(num_classes=3)
        plain = LOSSES.validate({"name": name}).build(num_classes=3)
        logits = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
        value = loss64(logits, y)
        assert value.dtype == torch.float64 and plain(logits, y).dtype == torch.float32
        torch.testing.assert_close(value, plain(logits.detach().double(), y))
        value.backward()
        assert logits.grad.dtype == torch.float32
    collapsed = torch.tensor([[20.0, 0.0, 0.0]], requires_grad=True)   # 2e^-20 < float32's epsilon: p_y == 1
    ce = LOSSES.validate({"name": "cross_entropy"}).build(num_classes=3)
    assert ce(collapsed, y).item() == 0.0
    ce64 = LOSSES.validate({"name": "cross_entropy", "dtype": "float64"}).build(num_classes=3)
    value = ce64(collapsed, y)
    value.backward()
    assert math.isclose(value.item(), math.log1p(2 * math.exp(-20)), rel_tol=1e-5) and collapsed.grad.abs().sum() > 0
    half = LOSSES.validate({"name": "cross_entropy", "dtype": "float16"}).build(num_classes=3)
    assert half(torch.tensor([[2.0, 0.5, -1.0]]), y).dtype == torch.float16


def test_loss_dtype_refuses_other_values():
    import pytest

    from runner.config import ConfigError

    for name in ("cross_entropy", "stablemax"):
        with pytest.raises(ConfigError, match="dtype"):
            LOSSES.validate({"name": name, "dtype": "bfloat64"})
