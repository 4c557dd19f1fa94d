"""Experiment signatures: which runs are repetitions (seeds) of the same experiment.

Two runs belong to the same experiment when their resolved configs agree on every key except the ones in
`runner.spec.NON_IDENTITY_KEYS` (the seed, where the data lives, which device ran it, how it was logged).
Keys added to the config later (`runner.spec.ADDED_KEYS`) count only when they differ from the value that
reproduces the old behaviour, so runs made before they existed keep their signature. `signature` hashes what is
left into a short hex string that names the run folder, is stored in `summary.json` and groups the report.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from runner.spec import ADDED_KEYS, NON_IDENTITY_KEYS

#: Dotted keys that do not define the experiment; a key removes its whole subtree.
IGNORED_KEYS: tuple[str, ...] = (*NON_IDENTITY_KEYS, "hydra")


def _to_dict(cfg: Any) -> dict:
    """A plain (resolved) dict from a dict or an OmegaConf DictConfig."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


_ANY = object()


def _remove(cfg: dict, dotted: str, only_if: Any = _ANY) -> None:
    """Delete `dotted` (e.g. `dataset.root`) from the nested dict `cfg` in place, if present (and, when
    `only_if` is given, only when its value equals it)."""
    *parents, last = dotted.split(".")
    node: Any = cfg
    for part in parents:
        if not isinstance(node, Mapping) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict) and last in node and (only_if is _ANY or node[last] == only_if):
        node.pop(last)


def group_config(cfg: Mapping | Any) -> dict:
    """A deep copy of `cfg` without the `IGNORED_KEYS`: the part of the config that defines the experiment."""
    out = copy.deepcopy(_to_dict(cfg))
    for key in IGNORED_KEYS:
        _remove(out, key)
    for key, old_behaviour in ADDED_KEYS.items():
        _remove(out, key, only_if=old_behaviour)
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
