"""The tiny float64 problem the optimizer oracle tests share: a 5-4-3 tanh MLP and 16 seeded samples, small enough
that a hand-written step of the paper's rule runs next to the optimizer's in microseconds."""
import torch
import torch.nn as nn


def tiny_problem(bias: bool = True):
    """(model, x, y): float64, seeded; the same every call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    return model, x, y


def closure_for(model, optimizer, x, y, calls: list | None = None):
    """torch's closure protocol on the full batch; appends each loss value to `calls` when given."""
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if calls is not None:
            calls.append(loss.item())
        return loss
    return closure


class Collect:
    """A sink for the training loop (runner.train.Sink) that keeps its records and writes nothing."""

    def __init__(self):
        self.records = []

    def record(self, metrics):
        self.records.append(metrics)

    def checkpoint(self):
        pass

    def best(self):
        pass
