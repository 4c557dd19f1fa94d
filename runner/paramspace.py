"""The one parameter-space helper: lists of tensors standing for a point, a direction or a gradient.

SAM-style perturbations, landscapes and Hessian code all move the weights with these functions, so there is
one place that decides what "the parameters" are (trainable tensors, in `model.parameters()` order).
"""
from typing import Iterable

import torch


def trainable(params: Iterable[torch.Tensor] | torch.nn.Module) -> list[torch.Tensor]:
    """Tensors that require grad, in order."""
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    return [p for p in params if p.requires_grad]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||concat(tensors)||_2 as a 0-d tensor on the tensors' device (no host sync)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2)), 2)


@torch.no_grad()
def snapshot(params: list[torch.Tensor], into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Copy of the current values; reuses the buffers in `into` when given (no allocation per step)."""
    if into is None:
        return [p.detach().clone() for p in params]
    torch._foreach_copy_(into, [p.detach() for p in params])
    return into


@torch.no_grad()
def restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Write saved values back by copy (exact, unlike subtracting the perturbation again)."""
    torch._foreach_copy_(params, saved)
