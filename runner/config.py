"""Config errors and the registry that maps a YAML file of a config group to its code.

Every group option is a YAML file `conf/<group>/<name>.yaml` holding `name: <name>` plus the fields of a
dataclass registered under that name. Validation merges the YAML node into the dataclass schema (OmegaConf
checks types and unknown keys), refuses any inf or nan (`nonfinite`) and then runs the dataclass's `__post_init__`
(ranges). Any problem is a `ConfigError`, which the entry point prints as one line before exiting non-zero.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad user input, reported as one line naming the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any = None, allowed: str = "", message: str | None = None):
        self.key, self.value, self.allowed, self.message = key, value, allowed, message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.message is not None:
            return self.message
        return f"invalid config: {self.key}={self.value!r} (allowed: {self.allowed})"

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its key prefixed by the config group, e.g. `rho` -> `optimizer.rho`."""
        if self.message is not None:
            return self
        return ConfigError(f"{prefix}.{self.key}", self.value, self.allowed)


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(key, value, allowed) unless `ok`; used in dataclass `__post_init__` range checks."""
    if not ok:
        raise ConfigError(key, value, allowed)


@dataclass(frozen=True)
class Entry:
    """One registered option of a config group: the YAML `name`, its schema, its builder and what it can do."""

    name: str
    build: Callable
    schema: type
    description: str = ""
    capabilities: dict = field(default_factory=dict)


class Registry:
    """Name -> Entry for one concern (models, optimizers, losses, ...), keyed like `conf/<group>/<name>.yaml`."""

    def __init__(self, group: str):
        self.group = group
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, schema: type, description: str = "", **capabilities) -> Callable:
        def decorator(build: Callable) -> Callable:
            if name in self._entries:
                raise KeyError(f"{self.group} '{name}' registered twice")
            self._entries[name] = Entry(name, build, schema, description or (build.__doc__ or "").strip().split("\n")[0], capabilities)
            return build

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ConfigError(f"{self.group}.name", name, ", ".join(self.names()))
        return self._entries[name]

    def validate(self, node: DictConfig | dict, prefix: str | None = None) -> "Choice":
        """Check one group's node against its schema: returns the Choice (entry + validated params).

        A schema may validate nested choices itself (a wrapper optimizer's `base`): it defines
        `validate_nested(prefix)`, called after its own fields are checked.
        """
        prefix = prefix or self.group
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        if not isinstance(node, dict) or "name" not in node:
            raise ConfigError(f"{prefix}.name", None, ", ".join(self.names()))
        if node["name"] not in self._entries:
            raise ConfigError(f"{prefix}.name", node["name"], ", ".join(self.names()))
        entry = self._entries[node["name"]]
        params = structured(entry.schema, {k: v for k, v in node.items() if k != "name"}, prefix=prefix)
        if hasattr(params, "validate_nested"):
            params.validate_nested(prefix)
        return Choice(entry, params)


@dataclass(frozen=True)
class Choice:
    """One validated option of a group: the registry entry and its parameters (a schema dataclass instance)."""

    entry: Entry
    params: Any

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def kwargs(self) -> dict:
        """The parameters as keyword arguments of the entry's builder (shallow: nested choices stay Choices)."""
        return {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.params)}

    def build(self, *args, **context):
        return self.entry.build(*args, **context, **self.kwargs)


class Checked:
    """Base of schemas assembled from mixins: `__post_init__` runs every class's own `check(self)` in MRO order,
    so each mixin (lr, momentum, betas, ...) checks its fields in one place."""

    def __post_init__(self):
        for klass in reversed(type(self).__mro__):
            own = vars(klass).get("check")
            if own is not None:
                own(self)


def structured(schema: type, params: dict, prefix: str) -> Any:
    """Merge plain `params` into dataclass `schema`; type errors, unknown keys, inf or nan and range checks ->
    ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in params.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}", value, "one of " + ", ".join(fields) if fields else "no parameters")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), params)
        for key, value in OmegaConf.to_container(merged).items():  # before the range checks: inf > 0 holds
            bad = nonfinite(str(key), value)
            if bad:
                raise ConfigError(*bad, "a finite number (not inf or nan)")  # .under(prefix) below adds the group
        return OmegaConf.to_object(merged)
    except ConfigError as e:
        raise e.under(prefix) from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        value = params.get(str(key).split(".")[0], "?")
        ftype = fields[str(key).split(".")[0]].type if str(key).split(".")[0] in fields else "?"
        raise ConfigError(f"{prefix}.{key}", value, f"a value of type {type_name(ftype)}") from None


def nonfinite(key: str, value: Any) -> tuple[str, Any] | None:
    """The first inf, -inf or nan under `key`, as (its key, the value or list that holds it); None if there is none.
    No field of any schema means anything at inf (a bound that can be absent is `null`), so it is always refused."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    if isinstance(value, (list, tuple)) and any(nonfinite(key, v) for v in value):
        return key, value
    if isinstance(value, dict):
        return next((bad for k, v in value.items() if (bad := nonfinite(f"{key}.{k}", v))), None)
    return None


def type_name(annotation) -> str:
    """`Optional[bool]` -> 'bool or null', `List[float]` -> 'list of float'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, typing.List):
        return f"list of {type_name(args[0])}" if args else "list"
    return getattr(annotation, "__name__", str(annotation))
