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


# ------------------------------------------------------------------ named points, masks and vector arithmetic
# Landscapes and curvature (runner/analysis/) treat the trainable tensors of a model as one vector: a list of
# tensors in `named_trainable` order. These functions never touch the model; they make new lists (or, with a
# trailing underscore, update the first argument in place).

def named_trainable(model: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """(names, tensors) of the trainable parameters, in `model.named_parameters()` order (the live tensors)."""
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in pairs], [p for _, p in pairs]


#: Which tensors a mask selects: `matrices` = weights of more than one dimension (linear, conv, embedding),
#: `vectors` = tensors of at most one dimension (biases, BN/LayerNorm scales and shifts), `trainable` = all.
MASKS = ("matrices", "vectors", "trainable")


def mask(tensors: list[torch.Tensor], kind: str) -> list[bool]:
    """One bool per tensor: whether `kind` (see MASKS) selects it."""
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r}; one of {', '.join(MASKS)}")
    if kind == "trainable":
        return [True] * len(tensors)
    return [(t.dim() > 1) == (kind == "matrices") for t in tensors]


def masked(tensors: list[torch.Tensor], selected: list[bool]) -> list[torch.Tensor]:
    """The tensors where `selected`, zeros elsewhere (same shapes: the result is still a point of the space)."""
    return [t if keep else torch.zeros_like(t) for t, keep in zip(tensors, selected)]


def zeros_like(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) for t in tensors]


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """<a, b> summed over every tensor, a 0-d tensor (no host sync); accumulates in at least float32."""
    if not a:
        return torch.zeros(())
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    return sum((x.to(dtype) * y.to(dtype)).sum() for x, y in zip(a, b))


def norm(a: list[torch.Tensor]) -> torch.Tensor:
    """||a||_2 over every tensor (the same as `global_norm`)."""
    return global_norm(a)


def axpy(alpha: float | torch.Tensor, x: list[torch.Tensor], y: list[torch.Tensor]) -> list[torch.Tensor]:
    """y + alpha * x, as new tensors."""
    return [yi + alpha * xi for xi, yi in zip(x, y)]


def scale(alpha: float | torch.Tensor, x: list[torch.Tensor]) -> list[torch.Tensor]:
    return [alpha * xi for xi in x]


def sub(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """a - b, as new tensors."""
    return [x - y for x, y in zip(a, b)]


def flatten(a: list[torch.Tensor]) -> torch.Tensor:
    """The point as one 1-D tensor (concatenated in order)."""
    return torch.cat([t.reshape(-1) for t in a]) if a else torch.zeros(0)


def unflatten(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of `flatten`: split a 1-D tensor into tensors shaped like `like`."""
    out, start = [], 0
    for t in like:
        out.append(vector[start:start + t.numel()].view_as(t))
        start += t.numel()
    if start != vector.numel():
        raise ValueError(f"a vector of {vector.numel()} numbers does not fit tensors of {start}")
    return out
