"""BatchNorm running statistics in multi-pass steps.

SAM and kin run a second forward at the perturbed weights w + e(w). Following davda54/sam, BN layers still
normalize with that batch's statistics but do not fold it into `running_mean`/`running_var`: the running
statistics describe the weights actually trained, w, and are updated once per step, by the first pass.
"""
from contextlib import contextmanager

import torch.nn as nn


@contextmanager
def frozen_bn_stats(model: nn.Module):
    """Inside the block, BN layers leave their running statistics (and batch counter) unchanged."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            tracked = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            saved.append((m, m.momentum, tracked))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
