"""Aggregate a sweep of runs into a table and figures: mean ± std and 95% CI over seeds, per experiment.

    python -m runner.report <dir> [<dir> ...] [--metric test/acc] [--columns ...] [--label KEY,...]
                            [--format markdown|csv] [--out DIR] [--no-figures]

Every folder under the given dirs that holds `summary.json` or `.hydra/config.yaml` is a run. Runs are grouped
by their signature (config without seed, paths, device, logging; see `runner.signature`), so seeds of one
experiment are averaged and different experiments never are. Only COMPLETED runs enter the statistics;
diverged, failed and unfinished runs are counted, which makes the report useful while a sweep still runs; a run
whose summary.json cannot be read (not JSON, or fields of the wrong type) is counted as other and named on stderr.
Each group is labelled by the fewest config keys that tell the groups apart (`experiment=... optimizer.name=sam
optimizer.rho=0.05`), with the values the run used (a wrapper's lr is its base optimizer's), or by `--label`.
Each (signature, seed) counts once: copies of a run (a run folder copied, a sweep given twice) are left out,
with a line on stderr, so they never pass for more seeds.

The table goes to stdout (markdown, or CSV with `--format csv`); `report.csv`, `report.md`, `curves.png`,
`bars.png` and `cost.png` (the final metric against passes and wall time, one point per run: a compute-fair
comparison) go to `--out` (default `<first dir>/report/`). Bad input, and an `--out` that cannot be written,
is one line on stderr and exit 2 (the writability is checked before the table is printed).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import errno
import io
import json
import math
import os
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import scipy.stats

from runner.rundir import (ANALYSIS, CONFIG, METRICS, SUMMARY, is_run_dir, read_json, read_jsonl, read_yaml,
                           summary_problem)
from runner.signature import flatten, group_config, signature

#: Columns of run counts; anything else (running: no summary yet; a summary.json that cannot be read) counts as
#: "other". `interrupted` is Ctrl-C, SIGTERM or a preempted/timed-out SLURM job waiting to be requeued;
#: `cancelled` a job SLURM ended (scancel).
STATUSES = ("completed", "diverged", "failed", "interrupted", "cancelled")


class ReportError(Exception):
    """A bad input, reported as one line on stderr with exit code 2."""


# ----------------------------------------------------------------------------------------------- statistics

def t_975(df: int) -> float:
    """t_{0.975}(df), the two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(scipy.stats.t.ppf(0.975, df))


class Stat(NamedTuple):
    """Mean, sample std (ddof=1; 0 for one value), 95% CI half-width (None below two values) and count."""

    mean: float | None
    std: float | None
    ci95: float | None
    n: int


def describe(values: Iterable[float]) -> Stat:
    """Mean ± std over seeds with the Student-t 95% confidence half-width t_{0.975}(n-1) * std / sqrt(n)."""
    x = np.asarray([float(v) for v in values], dtype=float)
    n = len(x)
    if n == 0:
        return Stat(None, None, None, 0)
    if n == 1:
        return Stat(float(x[0]), 0.0, None, 1)
    std = float(np.std(x, ddof=1))
    return Stat(float(np.mean(x)), std, t_975(n - 1) * std / math.sqrt(n), n)


# ----------------------------------------------------------------------------------------------------- runs

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Run:
    """One run directory: its resolved config, its summary (None while it runs) and its signature.

    `unreadable` says why a summary.json that is there cannot be read (not JSON, or JSON whose fields have the
    wrong types, e.g. `"final": [...]`); such a run has no summary: it is counted (as "other"), never averaged.
    """

    path: Path
    config: dict
    summary: dict | None
    unreadable: str | None = None

    @classmethod
    def load(cls, path: Path) -> "Run":
        """Read a run directory; a run without `.hydra/config.yaml` has an empty config."""
        config = read_yaml(path / CONFIG) or {}
        try:
            text = (path / SUMMARY).read_text()
        except FileNotFoundError:
            return cls(path, config, None)
        except OSError as err:
            return cls(path, config, None, f"{SUMMARY}: {err.strerror or err}")
        try:
            summary = json.loads(text)
        except ValueError:
            return cls(path, config, None, f"{SUMMARY} is not JSON (torn or corrupt)")
        problem = summary_problem(summary)
        return cls(path, config, None, f"{SUMMARY}: {problem}") if problem else cls(path, config, summary)

    @cached_property
    def signature(self) -> str:
        """The summary's signature when it has one, else computed from the config."""
        stored = (self.summary or {}).get("signature")
        return stored if isinstance(stored, str) and stored else signature(self.config)

    @property
    def status(self) -> str:
        """`completed`, `diverged`, `failed`, `interrupted`, ... or `running` while there is no summary
        (`unreadable` when its summary.json cannot be read)."""
        if self.unreadable is not None:
            return "unreadable"
        if self.summary is None:
            return "running"
        return str(self.summary.get("status") or "running")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def final(self) -> dict:
        """The summary's last evaluation (empty while running), with the numbers of the analyses on disk
        (analysis/<name>.json, also those computed post hoc by `python -m runner.analyze`: they win)."""
        if self.summary is None:
            return {}
        return {**((self.summary or {}).get("final") or {}), **self.analysis}

    @cached_property
    def analysis(self) -> dict:
        """`<name>/<key>` -> value from every analysis/<name>.json of the run."""
        out = {}
        for path in sorted((self.path / ANALYSIS).glob("*.json")):
            scalars = (read_json(path) or {}).get("scalars")
            out.update({k: v for k, v in scalars.items() if _is_number(v)} if isinstance(scalars, dict) else {})
        return out

    @cached_property
    def metrics(self) -> list[dict]:
        """The records of metrics.jsonl (empty when there is none)."""
        return read_jsonl(self.path / METRICS)

    def final_value(self, key: str) -> float | None:
        """`key` in the summary's `final`, else its last value in metrics.jsonl (None when never logged)."""
        if _is_number(self.final.get(key)):
            return float(self.final[key])
        values = [r[key] for r in self.metrics if _is_number(r.get(key))]
        return float(values[-1]) if values else None

    def best(self, metric: str) -> float | None:
        """Best value of `metric`: the summary's `best` when it tracks it, else the best in metrics.jsonl."""
        best = (self.summary or {}).get("best") or {}
        if _is_number(best.get(metric)):
            return float(best[metric])
        values = [r[metric] for r in self.metrics if _is_number(r.get(metric))]
        if not values:
            return None
        return float(min(values) if lower_is_better(metric) else max(values))

    def curve(self, metric: str) -> dict[float, float]:
        """epoch -> value of `metric`, the last record of each epoch in metrics.jsonl."""
        points: dict[float, float] = {}
        for record in self.metrics:
            if _is_number(record.get(metric)) and _is_number(record.get("epoch")):
                points[float(record["epoch"])] = float(record[metric])
        return points

    @property
    def seed(self) -> Any:
        """The summary's `seed`, else the config's `seed` (None when neither has one)."""
        seed = (self.summary or {}).get("seed")
        return seed if seed is not None else self.config.get("seed")

    @property
    def summary_mtime(self) -> float:
        """When summary.json was last written (-inf without one)."""
        try:
            return (self.path / SUMMARY).stat().st_mtime
        except OSError:
            return -math.inf

    @property
    def experiment(self) -> str | None:
        name = self.config.get("experiment")
        return str(name) if name is not None else None


def lower_is_better(metric: str) -> bool:
    """Losses, errors and sharpness are minimized; accuracies are maximized."""
    return any(word in metric for word in ("loss", "err", "sharpness", "time", "hessian/"))


def find_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """Every run directory at or below the given folders, in path order, each once.

    Raises ReportError for a folder that does not exist or holds no run.
    """
    found: dict[Path, Run] = {}
    for root in map(Path, paths):
        if not root.exists():
            raise ReportError(f"no such directory: {root}")
        if not root.is_dir():
            raise ReportError(f"not a directory: {root}")
        dirs = list(_walk_run_dirs(root))
        if not dirs:
            raise ReportError(f"no runs found under {root} (looked for {SUMMARY} / {CONFIG.as_posix()})")
        for d in dirs:
            found.setdefault(d.resolve(), Run.load(d))
    return list(found.values())


def drop_duplicates(runs: Sequence[Run]) -> tuple[list[Run], list[Run]]:
    """`(kept, dropped)`: one run per (signature, seed), so copies of a run never count as more seeds.

    Of the runs with the same signature and seed the completed one is kept, else the one whose summary.json
    is newest (the first found on a tie). Runs without a seed are always kept. Both lists keep `runs`' order.
    """
    def key(run: Run) -> tuple[str, str]:
        return run.signature, json.dumps(run.seed, default=str)

    best: dict[tuple[str, str], Run] = {}
    for run in runs:
        if run.seed is not None:
            held = best.setdefault(key(run), run)
            if (run.completed, run.summary_mtime) > (held.completed, held.summary_mtime):
                best[key(run)] = run
    kept = [r for r in runs if r.seed is None or best[key(r)] is r]
    return kept, [r for r in runs if r.seed is not None and best[key(r)] is not r]


def _walk_run_dirs(root: Path) -> Iterable[Path]:
    """Run directories under `root`; does not descend into a run or into `.hydra`."""
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if is_run_dir(here):
            dirnames[:] = []
            yield here
            continue
        dirnames[:] = sorted(d for d in dirnames if d != ".hydra")


# --------------------------------------------------------------------------------------------------- groups

@dataclass
class Group:
    """The runs of one experiment (one signature), i.e. its seeds, with a human-readable label.

    `config` is the group config as saved (`runner.signature.group_config`), `effective` the same with the values
    the run used where the saved config says otherwise (`effective_config`): the label reads `effective`.
    """

    signature: str
    runs: list[Run]
    label: str = ""
    config: dict = field(default_factory=dict)
    effective: dict = field(default_factory=dict)

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.completed]

    def counts(self) -> dict[str, int]:
        """Number of runs per status: completed, diverged, failed, interrupted, cancelled and other (running, or
        a summary.json that cannot be read)."""
        by_status = Counter(r.status for r in self.runs)
        counts = {s: by_status.pop(s, 0) for s in STATUSES}
        counts["other"] = sum(by_status.values())
        return counts


def group_runs(runs: Sequence[Run], label_keys: Sequence[str] | None = None) -> list[Group]:
    """Runs grouped by signature, in order of first appearance, labelled by what tells the groups apart (or by
    `label_keys`, see `label_keys_of`)."""
    groups: dict[str, Group] = {}
    for run in runs:
        if run.signature not in groups:
            config = group_config(run.config)
            groups[run.signature] = Group(run.signature, [], config=config, effective=effective_config(config))
        groups[run.signature].runs.append(run)
    result = list(groups.values())
    for group, label in zip(result, _labels(result, label_keys)):
        group.label = label
    return result


# ---------------------------------------------------------------------------------------- effective config

def effective_config(config: Mapping) -> dict:
    """`config` with the values the run used where the saved config says otherwise: a wrapper optimizer's (SAM
    and kin) shared hyperparameters (`runner.optim.SHARED`: lr, momentum, nesterov, betas, eps, weight_decay) are
    the ones its base optimizer took, and those its base does not take are left out.

    The saved config is what Hydra composed, and the signature hashes it, so it stays as it is. It can mislead:
    `optimizer=sam 'optimizer.base={name: lion, lr: 1e-4}'` saves sam's `lr: 0.05`, which no optimizer uses (lion
    steps with 1e-4); lion takes sam's `weight_decay` and `betas` (its node does not set them: the flat/nested rule
    of runner.optim, `Wraps.validate_nested`, which this mirrors), not `momentum`. Effective: `optimizer.name=sam
    optimizer.base=lion optimizer.lr=0.0001 optimizer.weight_decay=0.0005 optimizer.betas=[0.9,0.999] ...`. A
    shared key neither sets is the base's default (`eps` of adamw under sam). A base node's own other keys stay
    under `optimizer.base` (`{name: gravity, alpha: ...}`). A config this cannot read (an optimizer name this
    code does not know) is returned as it is.
    """
    out = dict(config)
    if isinstance(out.get("optimizer"), Mapping):
        out["optimizer"] = _effective_optimizer(out["optimizer"])
    return out


def _optimizer_schema(node: Any) -> type | None:
    """The schema dataclass of the optimizer named by `node` (a mapping with a known `name`), else None."""
    from runner.optim import OPTIMIZERS

    name = node.get("name") if isinstance(node, Mapping) else None
    return OPTIMIZERS.get(name).schema if isinstance(name, str) and name in OPTIMIZERS else None


def _schema_defaults(schema: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _effective_optimizer(node: Mapping) -> Mapping:
    """One optimizer node as its optimizer runs it (see `effective_config`); a wrapper's base may be a wrapper."""
    from runner.optim import SHARED, Wraps

    schema = _optimizer_schema(node)
    if schema is None or not issubclass(schema, Wraps):
        return node
    own = {**_schema_defaults(schema), **node}  # what the validated wrapper holds
    base = own["base"]
    base_node = {"name": base} if isinstance(base, str) else dict(base) if isinstance(base, Mapping) else None
    base_schema = _optimizer_schema(base_node)
    if base_schema is None:
        return node
    takes = _schema_defaults(base_schema)
    for key in SHARED:  # what the base's node does not set, it takes from the wrapper, else its own default
        if key in takes and key not in base_node:
            base_node[key] = own[key] if key in own else takes[key]
    base_node = dict(_effective_optimizer(base_node))
    lifted = {key: base_node.pop(key) for key in SHARED if key in base_node}
    out = {k: v for k, v in node.items() if k not in SHARED and k != "base"}
    out["base"] = base_node["name"] if list(base_node) == ["name"] else base_node
    return {**out, **lifted}


# -------------------------------------------------------------------------------------------------- labels

_MISSING = object()


def _format_value(value: Any) -> str:
    """A config value as in a Hydra override: `0.05`, `sam`, `null`, `true`, `[1,2]`."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _tier(key: str) -> int:
    """The order in which keys are tried for labels: the experiment (a preset names many keys at once), then the
    options chosen (`model.name`, `optimizer.name`, a wrapper's `optimizer.base`), then values."""
    if key == "experiment":
        return 0
    return 1 if key.rsplit(".", 1)[-1] in ("name", "base") else 2


def distinguishing_keys(flat: Sequence[Mapping]) -> list[str]:
    """A small set of keys of the flattened configs `flat` whose values tell every two of them apart, as far as
    any key does (greedy set cover over the pairs: the key that tells the most pairs still alike apart, the
    experiment and the option names `*.name` before other values).

    A key tells two configs apart when both have it with different values; only where no such key is left, also
    when one has it and the other does not (e.g. `trainer.steps` beside runs from before it existed). Like Hydra's
    `override_dirname` and Dora's names, which show only what a run changed, a label then holds what differs,
    not every key that differs anywhere (`optimizer.lr` of sgd beside adamw is not needed: the names differ).
    """
    keys = list(dict.fromkeys(k for f in flat for k in f))
    values = [{k: _canonical(v) for k, v in f.items()} for f in flat]
    alike = {(i, j) for i in range(len(flat)) for j in range(i + 1, len(flat)) if values[i] != values[j]}
    chosen: list[str] = []
    for presence in (False, True):
        while alike:
            best: tuple | None = None
            for order, key in enumerate(keys):
                if key in chosen:
                    continue
                apart = set()
                for i, j in alike:
                    a, b = values[i].get(key, _MISSING), values[j].get(key, _MISSING)
                    if a is _MISSING or b is _MISSING:
                        if presence and a is not b:
                            apart.add((i, j))
                    elif a != b:
                        apart.add((i, j))
                if apart and (best is None or (_tier(key), -len(apart), order) < best[0]):
                    best = ((_tier(key), -len(apart), order), key, apart)
            if best is None:
                break
            chosen.append(best[1])
            alike -= best[2]
    return chosen


def label_keys_of(groups: Sequence[Group], requested: Sequence[str]) -> list[str]:
    """The keys named by `--label` (comma/space separated): flattened keys of the groups' effective configs
    (`optimizer.rho`), or a group's name for its option (`optimizer` for `optimizer.name`). ReportError for a
    key no group has."""
    flat = [flatten(g.effective) for g in groups]
    present = set().union(*flat) if flat else set()
    names = [n for item in requested for n in item.replace(",", " ").split()]
    if not names:
        raise ReportError("--label needs at least one key, e.g. --label optimizer.name,optimizer.lr")
    keys = [n if n in present or f"{n}.name" not in present else f"{n}.name" for n in names]
    unknown = [n for n, k in zip(names, keys) if k not in present]
    if unknown:
        differing = [k for k in dict.fromkeys(k for f in flat for k in f)
                     if len({_canonical(f.get(k, None)) for f in flat}) > 1]
        raise ReportError(f"unknown label key(s) {', '.join(unknown)}; "
                          + (f"keys that differ between the groups: {', '.join(differing)}" if differing else
                             f"the groups have the same config; keys: {', '.join(sorted(present))}"))
    return list(dict.fromkeys(keys))


def _labels(groups: Sequence[Group], label_keys: Sequence[str] | None = None) -> list[str]:
    """`key=value ...` per group, from its effective config (`effective_config`).

    With `label_keys` (`--label`): those keys, in that order (a key a group lacks is left out). Else the keys of
    `distinguishing_keys`, in config order, the experiment and option names first. A key that every group has
    is shown wherever it was chosen; one that only some groups have and that lies under an option whose `.name`
    differs (`optimizer.rho` of sam beside sgd) is shown only where it differs among the groups with the same
    options: `optimizer=sgd` beside `optimizer=sam optimizer.rho=0.02,0.05` reads `optimizer.name=sgd`,
    `optimizer.name=sam optimizer.rho=0.02`, `optimizer.name=sam optimizer.rho=0.05`.

    A single group is labelled by its experiment name, else by the `*.name` keys of its config. A label that
    would be empty (or repeat another) gets the signature appended, so labels always tell groups apart.
    """
    flat = [flatten(g.effective) for g in groups]
    if label_keys is not None:
        keys = label_keys_of(groups, label_keys)
        labels = [" ".join(f"{k}={_format_value(f[k])}" for k in keys if k in f) for f in flat]
    elif len(groups) == 1:
        experiment = groups[0].effective.get("experiment")
        if experiment is not None:
            return [str(experiment)]
        names = [f"{k}={_format_value(v)}" for k, v in flat[0].items() if k.endswith(".name")]
        return [" ".join(names) or groups[0].signature]
    else:
        labels = _distinguishing_labels(flat)
    repeated = Counter(labels)
    return [
        f"{label} [{g.signature}]".strip() if not label or repeated[label] > 1 else label
        for label, g in zip(labels, groups)
    ]


def _distinguishing_labels(flat: Sequence[dict]) -> list[str]:
    """The labels of several groups by their `distinguishing_keys` (see `_labels`)."""
    order = list(dict.fromkeys(k for f in flat for k in f))
    tops = list(dict.fromkeys(k.split(".", 1)[0] for k in order))

    def place(key: str) -> tuple:
        """experiment first, then by group in config order, the options chosen (name, base) before values."""
        return key != "experiment", tops.index(key.split(".", 1)[0]), _tier(key), order.index(key)

    chosen = sorted(distinguishing_keys(flat), key=place)

    def differs(key: str, among: Sequence[dict]) -> bool:
        return len({_canonical(f[key]) if key in f else None for f in among}) > 1

    options = [k.removesuffix("name") for k in order if k.endswith(".name") and differs(k, flat)]  # "optimizer."

    def peers(f: dict, key: str) -> list[dict]:
        """The groups that compare with `f` on `key`: all if every group has it, else those choosing the
        same options (`*.name`) above `key` as `f`."""
        if all(key in g for g in flat):
            return list(flat)
        above = [o + "name" for o in options if key.startswith(o) and key != o + "name"]
        return [g for g in flat if all(g.get(n, _MISSING) == f.get(n, _MISSING) for n in above)]

    return [" ".join(f"{k}={_format_value(f[k])}" for k in chosen if k in f and differs(k, peers(f, k)))
            for f in flat]


# -------------------------------------------------------------------------------------------------- summary

def available_metrics(runs: Sequence[Run]) -> list[str]:
    """Metric names found in the summaries' `final` and in metrics.jsonl (sorted)."""
    names: set[str] = set()
    for run in runs:
        names.update(k for k, v in run.final.items() if _is_number(v))
        for record in run.metrics:
            names.update(k for k, v in record.items() if _is_number(v) and k not in ("step", "epoch"))
    return sorted(names)


def check_metric(runs: Sequence[Run], metric: str) -> None:
    """Raise ReportError when runs have logged metrics but not `metric` (nothing logged yet is fine)."""
    names = available_metrics(runs)
    if names and metric not in names:
        raise ReportError(f"unknown metric {metric!r}; available: {', '.join(names)}")


def _final_values(runs: Iterable[Run], key: str) -> list[float]:
    values = (r.final_value(key) for r in runs)
    return [v for v in values if v is not None]


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def stat_columns(metric: str, runs: Sequence[Run]) -> list[str]:
    """Names of the mean ± std columns: final and best `metric`, final test/loss, then the curvature and
    sharpness numbers (hessian/..., sharpness/...) of the runs' analyses."""
    sharpness = sorted({k for r in runs if r.completed for k in r.final if k.startswith(("sharpness/", "hessian/"))
                        and not k.endswith("_stderr")})
    columns = [f"final_{metric}", f"best_{metric}", "final_test/loss"] + [f"final_{k}" for k in sharpness]
    return list(dict.fromkeys(columns))


def summarize(groups: Sequence[Group], metric: str = "test/acc") -> list[dict]:
    """One row per group: label, signature, counts, Stat columns over completed runs, mean wall_s and passes.

    Stat columns (`final_<metric>`, `best_<metric>`, `final_test/loss`, `final_sharpness/...`) hold a
    `Stat(mean, std, ci95, n)`; `wall_s` and `passes` hold plain means (None without completed runs).
    """
    all_runs = [r for g in groups for r in g.runs]
    columns = stat_columns(metric, all_runs)
    rows = []
    for group in groups:
        done = group.completed
        counts = group.counts()
        row: dict[str, Any] = {"group": group.label, "signature": group.signature, "n": len(group.runs), **counts}
        for column in columns:
            if column == f"best_{metric}":
                values = [b for b in (r.best(metric) for r in done) if b is not None]
            else:
                values = _final_values(done, column.removeprefix("final_"))
            row[column] = describe(values)
        for key in ("wall_s", "passes"):
            row[key] = _mean([float(r.summary[key]) for r in done if _is_number(r.summary.get(key))])
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------------- output

def _decimals(x: float) -> int:
    """Decimals that show about 4 significant digits of numbers of the size of `x` (at least 1, at most 4)."""
    if not math.isfinite(x) or x == 0:
        return 4
    return int(min(4, max(1, 3 - math.floor(math.log10(abs(x))))))


def _num(x: float | None, decimals: int | None = None) -> str:
    """A compact number with `decimals` (default: by its size); scientific beyond 10^5; `–` for None."""
    if x is None:
        return "–"
    if not math.isfinite(x) or abs(x) >= 1e5:
        return f"{x:.3e}" if math.isfinite(x) else str(x)
    return f"{x:.{_decimals(x) if decimals is None else decimals}f}"


#: Plain columns shown with fixed decimals in markdown.
DECIMALS = {"wall_s": 1, "passes": 0}


def _cell(value: Any, column: str = "") -> str:
    """A markdown cell: a Stat as `mean ± std [±ci95]` (decimals set by the mean), n=1 as `mean ± –`."""
    if isinstance(value, Stat):
        if value.n == 0 or value.mean is None:
            return "–"
        d = _decimals(value.mean)
        if value.n == 1:
            return f"{_num(value.mean, d)} ± –"
        return f"{_num(value.mean, d)} ± {_num(value.std, d)} [±{_num(value.ci95, d)}]"
    if isinstance(value, float):
        return _num(value, DECIMALS.get(column))
    if value is None:
        return "–"
    return str(value).replace("|", "\\|")


def to_markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table; Stat cells read `mean ± std [±95% CI half-width]` over completed runs."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c), c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """CSV with a Stat column `c` expanded to `c_mean, c_std, c_ci95, c_n`; missing values are empty."""
    stats = {c for c in columns if any(isinstance(r.get(c), Stat) for r in rows)}
    header = [h for c in columns for h in ([f"{c}_{f}" for f in Stat._fields] if c in stats else [c])]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells: list[Any] = []
        for c in columns:
            value = row.get(c)
            if c in stats:
                cells += list(value) if isinstance(value, Stat) else [None] * len(Stat._fields)
            else:
                cells.append(value)
        writer.writerow(["" if v is None else v for v in cells])
    return buffer.getvalue()


def select_columns(rows: Sequence[dict], requested: Sequence[str] | None, metric: str) -> list[str]:
    """The columns to show: all by default, else the requested ones (comma/space separated).

    `final` and `best` are short for `final_<metric>` and `best_<metric>`; an unknown name is a ReportError.
    """
    available = list(dict.fromkeys(k for row in rows for k in row))
    if not requested:
        return available
    aliases = {"final": f"final_{metric}", "best": f"best_{metric}", "loss": "final_test/loss"}
    names = [aliases.get(n, n) for item in requested for n in item.replace(",", " ").split()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ReportError(f"unknown column(s) {', '.join(unknown)}; available: {', '.join(available)}")
    return names


# ------------------------------------------------------------------------------------------------- figures

def _mean_curve(runs: Sequence[Run], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and std (ddof=1 where at least two runs reached the epoch, else 0) over runs."""
    curves = [run.curve(metric) for run in runs]
    epochs = sorted({e for c in curves for e in c})
    mean, std = [], []
    for epoch in epochs:
        values = np.array([c[epoch] for c in curves if epoch in c])
        mean.append(values.mean())
        std.append(values.std(ddof=1) if len(values) > 1 else 0.0)
    return np.array(epochs), np.array(mean), np.array(std)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Characters per line of a group's label in the figures: longer labels are wrapped at spaces (between
#: `key=value` items), so a label never runs past the figure (nor makes matplotlib's tight layout give up).
LABEL_WIDTH = 48


def _wrap(label: str, width: int = LABEL_WIDTH) -> str:
    """`label` on lines of at most `width` characters, broken between its `key=value` items (inside an item only
    where one item is longer than a line)."""
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=False)) or label


def no_curve(groups: Sequence[Group], metric: str) -> str:
    """What curves.png says when no completed run logged `metric` during training: a metric measured once per run
    (an analysis at the end or post hoc: in the summary, not in metrics.jsonl) is in bars.png instead."""
    if any(r.final_value(metric) is not None for g in groups for r in g.completed):
        return f"{metric} was measured once per run, not during training\n(an analysis at the end or post hoc): see bars.png"
    return "no completed runs with this metric"


def plot_curves(groups: Sequence[Group], metric: str, path: Path) -> None:
    """`metric` vs epoch per group: mean over completed seeds with a ±std band, one color per group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10")
    drawn = False
    for i, group in enumerate(groups):
        epochs, mean, std = _mean_curve(group.completed, metric)
        if len(epochs) == 0:
            continue
        color = colors(i % 10)
        ax.plot(epochs, mean, color=color, label=_wrap(f"{group.label} (n={len(group.completed)})"))
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, no_curve(groups, metric), ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set(xlabel="epoch (= step for full-batch tasks)", ylabel=metric, title=f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _legend_below(fig, ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _legend_below(fig, ax) -> None:
    """The legend under the axes, never over the curves or points (group labels can be long: wrapped, they
    take one column)."""
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize="small",
                   ncol=1 if any("\n" in label or len(label) > 40 for label in labels) else 2, frameon=False)


def unit_interval(metric: str, values: Iterable[float]) -> bool:
    """Whether `metric` is an accuracy (`acc` in its last part: test/acc, balanced_acc) whose values all lie in
    [0, 1]: then no interval around its mean reaches beyond [0, 1]."""
    values = list(values)
    return "acc" in metric.rsplit("/", 1)[-1] and bool(values) and all(0.0 <= v <= 1.0 for v in values)


def ci_interval(stat: Stat, bounded: bool = False) -> tuple[float, float] | None:
    """`(low, high)` of the 95% CI around the mean (None below two values), clipped to [0, 1] when `bounded`:
    with few seeds the Student-t interval of an accuracy near 1 reaches past 1, where no accuracy lies."""
    if stat.mean is None or stat.ci95 is None:
        return None
    low, high = stat.mean - stat.ci95, stat.mean + stat.ci95
    return (max(low, 0.0), min(high, 1.0)) if bounded else (low, high)


def bars_figure(groups: Sequence[Group], rows: Sequence[dict], metric: str):
    """The figure of `plot_bars` (the caller saves and closes it)."""
    plt = _pyplot()
    stats = [row[f"final_{metric}"] for row in rows]
    seeds = [_final_values(group.completed, metric) for group in groups]
    bounded = unit_interval(metric, [v for values in seeds for v in values])
    labels = [_wrap(g.label) for g in groups]
    lines = max([label.count("\n") + 1 for label in labels] or [1])
    fig, ax = plt.subplots(figsize=(8, 1.5 + max(0.5, 0.18 * lines + 0.1) * len(rows)))
    colors = plt.get_cmap("tab10")
    for i, (values, s) in enumerate(zip(seeds, stats)):
        color = colors(i % 10)
        ax.scatter(values, np.full(len(values), i + 0.18), s=12, color=color, alpha=0.6)
        if s.mean is None:
            ax.annotate("n=0: no completed run", (0.01, i), xycoords=("axes fraction", "data"), va="center",
                        fontsize="small", color="0.4")
            continue
        interval = ci_interval(s, bounded)
        low, high = interval if interval is not None else (s.mean, s.mean)
        ax.errorbar(s.mean, i, xerr=[[s.mean - low], [high - s.mean]], fmt="o", capsize=4, color=color)
        note = f"n={s.n}" if interval is not None else f"n={s.n}, no CI"
        ax.annotate(f"{_num(s.mean)} ({note})", (high, i), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize="small")
    ax.set_yticks(np.arange(len(rows)), labels, fontsize="small")
    ax.invert_yaxis()  # first group on top, as in the table
    clipped = ", clipped to [0, 1]" if bounded else ""
    ax.set(xlabel=f"final {metric}", title=f"final {metric}: seeds, mean and 95% CI (Student t{clipped})")
    ax.margins(x=0.15, y=0.3)
    ax.grid(axis="x", alpha=0.3)
    if bounded:
        low, high = ax.get_xlim()
        ax.set_xlim(max(low, -0.02), min(high, 1.02) if high > 1.0 else high)
    fig.tight_layout()
    return fig


def plot_bars(groups: Sequence[Group], rows: Sequence[dict], metric: str, path: Path) -> None:
    """Final `metric` per group: every completed seed as a dot, the mean with its 95% CI as an error bar (an
    accuracy's clipped to [0, 1]) and the number of seeds n beside it.

    The axis is zoomed to the data (bars from 0 would hide differences of a few tenths of a point).
    """
    fig = bars_figure(groups, rows, metric)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def plot_cost(groups: Sequence[Group], metric: str, path: Path) -> None:
    """Final `metric` against what each run cost, forward+backward passes and wall time: one point per completed
    run, one colour per group. A compute-fair comparison: SAM at 2 passes a step against SGD with twice the
    epochs sit at the same x."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    colors = plt.get_cmap("tab10")
    markers = "osD^v<>Pp*"
    drawn = False
    for i, group in enumerate(groups):
        points = [(r.summary.get("passes"), r.summary.get("wall_s"), r.final_value(metric)) for r in group.completed]
        points = [p for p in points if all(_is_number(v) for v in p)]
        if not points:
            continue
        passes, wall, value = (np.asarray(v, dtype=float) for v in zip(*points))
        style = dict(color=colors(i % 10), marker=markers[(i // 10) % len(markers)], alpha=0.8)
        axes[0].scatter(passes, value, label=_wrap(f"{group.label} (n={len(points)})"), **style)
        axes[1].scatter(wall, value, **style)
        drawn = True
    axes[0].set(xlabel="forward+backward passes (batches)", ylabel=f"final {metric}")
    axes[1].set(xlabel="wall time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    if not drawn:
        axes[0].text(0.5, 0.5, "no completed runs with this metric", ha="center", va="center",
                     transform=axes[0].transAxes)
    fig.suptitle(f"final {metric} against cost: one point per run")
    fig.tight_layout()
    _legend_below(fig, axes[0])
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ CLI

def _markdown_report(rows: Sequence[dict], columns: Sequence[str], metric: str, figures: bool) -> str:
    """report.md: the table, how to read it, and the figures."""
    parts = [
        f"# Report: {metric}\n",
        "Cells read `mean ± std [±95% CI half-width]` over completed runs (Student t, ddof=1); "
        "incomplete runs are counted, never averaged.\n",
        to_markdown(rows, columns),
    ]
    if figures:
        parts.append("![learning curves](curves.png)\n\n![final metric](bars.png)\n\n"
                     "![final metric against passes and wall time](cost.png)\n")
    return "\n".join(parts)


def write_report(out: Path, groups: Sequence[Group], rows: Sequence[dict], columns: Sequence[str],
                 metric: str, figures: bool = True) -> list[Path]:
    """Write report.csv, report.md and (unless `figures` is False) curves.png and bars.png to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.csv", out / "report.md"]
    written[0].write_text(to_csv(rows, columns))
    written[1].write_text(_markdown_report(rows, columns, metric, figures))
    if figures:
        plot_curves(groups, metric, out / "curves.png")
        plot_bars(groups, rows, metric, out / "bars.png")
        plot_cost(groups, metric, out / "cost.png")
        written += [out / "curves.png", out / "bars.png", out / "cost.png"]
    return written


def _cannot_write(path: Path, err: OSError) -> ReportError:
    """`cannot write <the file that failed, else path>: <reason>`."""
    return ReportError(f"cannot write {err.filename or path}: {err.strerror or err}")


def prepare_out(out: Path) -> None:
    """Create the folder `out`; ReportError `cannot write <path>: <reason>` when it cannot hold the report."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ReportError(f"cannot write {out}: {os.strerror(errno.ENOTDIR)}") from None
    except OSError as err:
        raise _cannot_write(out, err) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write {out}: {os.strerror(errno.EACCES)}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="sweep or run folders, searched recursively")
    parser.add_argument("--metric", default="test/acc", help="metric to aggregate (default: test/acc)")
    parser.add_argument("--columns", nargs="+", help="columns to show (names from the table; final/best/loss)")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="stdout format")
    parser.add_argument("--out", type=Path, help="output folder (default: <first dir>/report/)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    parser.add_argument("--label", metavar="KEY,...",
                        help="label the groups by these config keys (e.g. optimizer.name,optimizer.lr; `optimizer` "
                             "is short for optimizer.name); default: the fewest keys that tell the groups apart")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print the table, write the report folder; 0 on success, 2 on bad input or unwritable --out."""
    args = parse_args(argv)
    out = args.out if args.out is not None else Path(args.dirs[0]) / "report"
    try:
        runs, duplicates = drop_duplicates(find_runs(args.dirs))
        check_metric(runs, args.metric)
        groups = group_runs(runs, None if args.label is None else [args.label])
        rows = summarize(groups, args.metric)
        columns = select_columns(rows, args.columns, args.metric)
        prepare_out(out)
    except ReportError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    if duplicates:
        print(f"report: {len(duplicates)} duplicate runs of the same (config, seed) left out: "
              + ", ".join(str(r.path) for r in duplicates), file=sys.stderr)
    unreadable = [r for r in runs if r.unreadable is not None]
    if unreadable:
        print(f"report: {len(unreadable)} runs with an unreadable summary, counted as other, not averaged: "
              + ", ".join(f"{r.path} ({r.unreadable})" for r in unreadable), file=sys.stderr)
    table = to_csv(rows, columns) if args.format == "csv" else to_markdown(rows, columns)
    sys.stdout.write(table)
    try:
        write_report(out, groups, rows, columns, args.metric, figures=not args.no_figures)
    except OSError as err:
        print(f"report: {_cannot_write(out, err)}", file=sys.stderr)
        return 2
    print(f"report: {len(runs)} runs in {len(groups)} groups; wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from runner.signals import exit_now

    try:
        code = main()
    except SystemExit as e:
        code = e.code
    exit_now(code)
