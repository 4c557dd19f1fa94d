"""Experiment signatures: which runs are repetitions (seeds) of the same experiment.

Two runs belong to the same experiment when their resolved configs agree on every key except the ones in
`IGNORED_KEYS` (the seed, where the data lives, which device ran it, how it was logged). `signature` hashes
what is left into a short hex string that the trainer stores in `summary.json` and the report groups by.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

#: Dotted keys that do not define the experiment; a key removes its whole subtree.
IGNORED_KEYS: tuple[str, ...] = (
    "seed",
    "dataset.root",
    "dataset.download",
    "trainer.device",
    "trainer.progress",
    "trainer.resume",
    "trainer.checkpoint_every",
    "logger",
    "hydra",
    "run_dir",
)


def _to_dict(cfg: Any) -> dict:
    """A plain (resolved) dict from a dict or an OmegaConf DictConfig."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def _remove(cfg: dict, dotted: str) -> None:
    """Delete `dotted` (e.g. `dataset.root`) from the nested dict `cfg` in place, if present."""
    *parents, last = dotted.split(".")
    node: Any = cfg
    for part in parents:
        if not isinstance(node, Mapping) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(last, None)


def group_config(cfg: Mapping | Any) -> dict:
    """A deep copy of `cfg` without the `IGNORED_KEYS`: the part of the config that defines the experiment."""
    out = copy.deepcopy(_to_dict(cfg))
    for key in IGNORED_KEYS:
        _remove(out, key)
    return out


def canonical_json(cfg: Mapping) -> str:
    """Key-sorted, whitespace-free JSON: equal configs give equal strings."""
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)


def signature(cfg: Mapping | Any, length: int = 8) -> str:
    """Short sha1 hex of the canonical JSON of `group_config(cfg)`; the same for every seed of one experiment."""
    digest = hashlib.sha1(canonical_json(group_config(cfg)).encode("utf-8")).hexdigest()
    return digest[:length]


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys, e.g. `{"a": {"b": 1}}` -> `{"a.b": 1}`.

    Lists and other values are kept as they are; an empty dict stays a value (`{"a": {}}` -> `{"a": {}}`).
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
