"""BatchNorm running statistics in multi-pass steps.

SAM and kin run a second forward at the perturbed weights w + e(w). Following davda54/sam, BN layers still
normalize with that batch's statistics but do not fold it into `running_mean`/`running_var`: the running
statistics describe the weights actually trained, w, and are updated once per step, by the first pass.
"""
import torch
import torch.nn as nn


class FrozenBNStats:
    """`with frozen:` BN layers leave their running statistics (and batch counters) unchanged.

    Built once per model: the layers are found once and the counters saved into preallocated buffers, so
    entering it every SAM step costs a few attribute writes and one foreach copy.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.saved_counters = [m.num_batches_tracked.clone() for m in self.layers]
        self.momenta = [m.momentum for m in self.layers]

    def __enter__(self) -> "FrozenBNStats":
        if self.layers:
            torch._foreach_copy_(self.saved_counters, [m.num_batches_tracked for m in self.layers])
        for i, m in enumerate(self.layers):
            self.momenta[i] = m.momentum
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        return self

    def __exit__(self, *exc) -> None:
        for m, momentum in zip(self.layers, self.momenta):
            m.momentum = momentum
        if self.layers:
            torch._foreach_copy_([m.num_batches_tracked for m in self.layers], self.saved_counters)
