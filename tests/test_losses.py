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
    torch.testing.assert_close(loss(logits, y, reduction="none"), torch.stack(expected).float())
    assert math.isclose(loss(logits, y).item(), float(sum(expected) / 2), rel_tol=1e-6)
    # what is reported stays plain cross-entropy
    assert math.isclose(measured_loss(logits, y).item(), float(-(log_p[0, 0] + log_p[1, 1]) / 2), rel_tol=1e-6)
