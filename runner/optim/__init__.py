"""Optimizers, one file per method, registered by the name of `conf/optimizer/<name>.yaml`.

Every optimizer is a `torch.optim.Optimizer` driven by the loop as `optimizer.step(closure)` (runner/step.py has
the closure's contract). Each entry declares its capabilities; the loop reads them (`capabilities(choice)`):
- `passes_per_step`: forward+backward passes over the batch a step costs (the loop also counts the real ones);
- `sample_indices`: the closure must carry the batch's sample indices (per-sample selection, e.g. ESAM);
- `per_sample_loss`: the closure must keep the per-sample objective of each pass;
- `needs_loss`: its step uses the loss value the closure returns (MoMo), so it cannot be a wrapper's base.

Wrappers (SAM and kin) take a base optimizer by name. Two spellings, both validated recursively against the
base's own schema:
- flat (`optimizer.base=sgd optimizer.lr=0.1`): the wrapper's hyperparameters lr, momentum, nesterov, betas,
  eps, weight_decay are handed to the base where its schema has them (the others are ignored, e.g. momentum for
  an adamw base), so a sweep `optimizer=sgd,sam optimizer.lr=0.1` means the same lr for both;
- nested (`optimizer.base={name: adamw, lr: 1e-3}`): the base's own node; values it does not set are still
  taken from the wrapper's flat hyperparameters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from runner.config import Choice, ConfigError, Registry

OPTIMIZERS = Registry("optimizer")

#: Hyperparameters a wrapper hands to its base (flat spelling).
SHARED = ("lr", "momentum", "nesterov", "betas", "eps", "weight_decay")


@dataclass(frozen=True)
class Capabilities:
    """What an optimizer needs from the loop and what a step costs; declared at registration."""
    passes_per_step: float = 1
    sample_indices: bool = False
    per_sample_loss: bool = False
    needs_loss: bool = False  # its step uses the loss value (MoMo): it cannot be a wrapper's base


def capabilities(choice: Choice) -> Capabilities:
    """The entry's declared capabilities; a callable value is computed from the validated parameters (e.g.
    LookSAM's `passes_per_step=lambda p: 1 + 1 / p.k`)."""
    return Capabilities(**{k: v(choice.params) if callable(v) else v for k, v in choice.entry.capabilities.items()})


@dataclass
class Wraps:
    """Schema mixin of a wrapper: `base` is the base optimizer, a name or a node (validated into a Choice)."""
    base: Any = "sgd"

    def validate_nested(self, prefix: str) -> None:
        node = {"name": self.base} if isinstance(self.base, str) else dict(self.base or {})
        if "name" in node and node["name"] in OPTIMIZERS:
            fields = {f.name for f in dataclasses.fields(OPTIMIZERS.get(node["name"]).schema)}
            for key in SHARED:
                if key in fields and key not in node and hasattr(self, key):
                    node[key] = getattr(self, key)
        self.base = OPTIMIZERS.validate(node, prefix=f"{prefix}.base")
        if capabilities(self.base).needs_loss:
            raise ConfigError(f"{prefix}.base.name", self.base.name, "an optimizer whose step needs no loss value "
                              f"({self.base.name} needs the loss, which a wrapper's base step does not get)")
        if capabilities(self.base).passes_per_step != 1:
            raise ConfigError(f"{prefix}.base.name", self.base.name, "an optimizer that takes one plain step "
                              "(the wrapper drives the extra passes itself)")


def build_optimizer(choice: Choice, params) -> torch.optim.Optimizer:
    """The optimizer of a validated `optimizer` choice over `params` (tensors or param groups)."""
    return choice.build(params)


def _register_all() -> None:
    """Import every module of this package: each registers its optimizers (one file per method, no list to edit)."""
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")


_register_all()
