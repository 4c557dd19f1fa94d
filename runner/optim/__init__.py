"""Optimizers, one file per method, registered by the name of `conf/optimizer/<name>.yaml`.

Every optimizer is a `torch.optim.Optimizer` driven by the loop as `optimizer.step(closure)` (runner/step.py has
the closure's contract). Each entry declares its capabilities; the loop reads them (`capabilities(choice)`):
- `passes_per_step`: forward+backward passes over the batch a step costs (the loop also counts the real ones);
- `sample_indices`: the closure must carry the batch's sample indices (per-sample selection, e.g. ESAM);
- `per_sample_loss`: the closure must keep the per-sample objective of each pass;
- `needs_loss`: its step uses the loss value the closure returns (MoMo), so it cannot be a wrapper's base.
- `per_device`: on many devices, why the method has only its per-device form (`optimizer.perturbation_sync=local`,
  runner/optim/perturbation.py), e.g. ESAM's selection among each device's own samples; `global` is then refused.
- `inputs`: the task inputs (`image`, `features`, `tokens`) its step can take as configured (`Inputs`; TRAM's
  reference=noise perturbs the inputs, so floating-point ones only); `validate()` refuses a dataset giving others.
- `stability`: its edge-of-stability threshold (`Stability`, below): the top Hessian eigenvalue above which its
  step diverges on a quadratic, or a note saying that no such threshold applies (adaptive methods). Every
  optimizer that is not a wrapper declares one; a wrapper's is its base optimizer's (`stability(choice)`).

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
import math
from dataclasses import dataclass
from typing import Any, Optional

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
    stability: Optional["Stability"] = None  # its edge-of-stability threshold (None: undeclared; wrappers)
    inputs: Optional["Inputs"] = None  # the input kinds its step can take (None: any)
    per_device: Optional[str] = None  # why its step is defined per device only (refused with perturbation_sync=global)


@dataclass(frozen=True)
class Inputs:
    """The input kinds an optimizer's step can take, restricted by its setting `key` (a schema field), for `why`."""
    kinds: tuple[str, ...]
    key: str
    why: str


@dataclass(frozen=True)
class Stability:
    """An optimizer's edge-of-stability threshold (Cohen et al. 2021, "Gradient descent on neural networks typically
    occurs at the edge of stability", ICLR; their appendix for momentum): on a quadratic whose Hessian has top
    eigenvalue lambda_max, the update with learning rate lr is stable while lambda_max < factor / lr, and training
    drives lambda_max up to it. `factor` None: no such threshold of lambda_max applies (adaptive or sign methods,
    whose step is preconditioned; their edge is on the preconditioned sharpness, Cohen et al. 2022), and `note`
    says why. `formula` is the threshold as the figure labels it, `rule` the method and its constants."""
    factor: Optional[float]
    formula: str
    rule: str
    note: str = ""

    def threshold(self, lr: float) -> float:
        """factor / lr; nan where no threshold applies or lr <= 0 (no step: no threshold)."""
        return self.factor / lr if self.factor is not None and lr > 0 else math.nan

    def ratio(self, lambda_max: float, lr: float) -> float:
        """lambda_max / threshold = lambda_max * lr / factor: < 1 is stable, ~1 is the edge (nan as above)."""
        return lambda_max * lr / self.factor if self.factor is not None and lr > 0 else math.nan

    def describe(self) -> dict:
        return {"formula": self.formula, "rule": self.rule, "factor": self.factor, "note": self.note}


def gradient_descent(momentum: float = 0.0, nesterov: bool = False) -> Stability:
    """torch.optim.SGD's update (v <- beta v + g; w <- w - lr v, or w <- w - lr (g + beta v) with Nesterov) on
    a quadratic, along an eigenvector with eigenvalue lambda (a = lr lambda): its characteristic polynomial is
    z^2 - (1 + beta - a) z + beta (heavy ball), z^2 - (1 + beta)(1 - a) z + beta (1 - a) (Nesterov); the root
    z = -1 leaves the unit disc at a = 2 (1 + beta), resp. a = (2 + 2 beta) / (1 + 2 beta) (Cohen et al. 2021,
    appendix). beta = 0 is plain gradient descent, 2/lr."""
    beta = float(momentum)
    if beta == 0:
        return Stability(2.0, "2/η", "gradient descent")
    if nesterov:
        return Stability((2 + 2 * beta) / (1 + 2 * beta), "(2+2β)/((1+2β)η)", f"Nesterov momentum β={beta:g}")
    return Stability(2 * (1 + beta), "2(1+β)/η", f"heavy-ball momentum β={beta:g}")


def no_threshold(why: str) -> Stability:
    """An optimizer for which no threshold of lambda_max applies; `why` goes into the json and the figure."""
    return Stability(None, "", "", note=f"no edge-of-stability threshold of lambda_max: {why}")


#: The note of Adam-type methods (Adam, AdamW, MoMo-Adam, Grams).
ADAPTIVE = ("the step is preconditioned by Adam's 1/(sqrt(v)+eps), so its edge is on the preconditioned sharpness "
            "(Cohen et al. 2022), not on lambda_max of the loss")


def capabilities(choice: Choice) -> Capabilities:
    """The entry's declared capabilities; a callable value is computed from the validated parameters (e.g.
    LookSAM's `passes_per_step=lambda p: 1 + 1 / p.k`)."""
    return Capabilities(**{k: v(choice.params) if callable(v) else v for k, v in choice.entry.capabilities.items()})


def stability(choice: Choice) -> Stability:
    """The optimizer's edge-of-stability threshold: its declared `stability` capability; a wrapper's is its base
    optimizer's (the note says so: the wrapper's perturbation changes the dynamics, so this is the base step's edge,
    not the wrapper's own)."""
    declared = capabilities(choice).stability
    if declared is not None:
        return declared
    base = getattr(choice.params, "base", None)
    if isinstance(choice.params, Wraps) and isinstance(base, Choice):
        inner = stability(base)
        why = (f"{choice.name} wraps {base.name}: the threshold of its base step" if inner.factor is not None
               else f"{choice.name} wraps {base.name}")
        return dataclasses.replace(inner, note="; ".join(n for n in (why, inner.note) if n))
    return no_threshold(f"{choice.name} declares none")


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
    """The optimizer of a validated `optimizer` choice over `params` (tensors or param groups). The engine's
    `perturbation_sync` (many devices, runner/optim/perturbation.py) is set here, for every method at once."""
    optimizer = choice.build(params)
    if hasattr(choice.params, "perturbation_sync"):
        optimizer.perturbation_sync = choice.params.perturbation_sync
    return optimizer


def _register_all() -> None:
    """Import every module of this package: each registers its optimizers (one file per method, no list to edit)."""
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")


_register_all()
