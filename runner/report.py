"""Aggregate a sweep of runs into a table and figures: mean ± std and 95% CI over seeds, per experiment.

    python -m runner.report <dir> [<dir> ...] [--metric test/acc] [--columns ...]
                            [--format markdown|csv] [--out DIR] [--no-figures]

Every folder under the given dirs that holds `summary.json` or `.hydra/config.yaml` is a run. Runs are grouped
by their signature (config without seed, paths, device, logging; see `runner.signature`), so seeds of one
experiment are averaged and different experiments never are. Only COMPLETED runs enter the statistics;
diverged, failed and unfinished runs are counted, which makes the report useful while a sweep still runs.
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
import errno
import io
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import scipy.stats

from runner.rundir import ANALYSIS, CONFIG, METRICS, SUMMARY, is_run_dir, read_json, read_jsonl, read_yaml
from runner.signature import flatten, group_config, signature

#: Columns of run counts; anything else (running: no summary yet) counts as "other". `interrupted` is Ctrl-C,
#: SIGTERM or a preempted/timed-out SLURM job waiting to be requeued; `cancelled` a job SLURM ended (scancel).
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
    """One run directory: its resolved config, its summary (None while it runs) and its signature."""

    path: Path
    config: dict
    summary: dict | None

    @classmethod
    def load(cls, path: Path) -> "Run":
        """Read a run directory; a run without `.hydra/config.yaml` has an empty config."""
        return cls(path, read_yaml(path / CONFIG) or {}, read_json(path / SUMMARY))

    @cached_property
    def signature(self) -> str:
        """The summary's signature when it has one, else computed from the config."""
        stored = (self.summary or {}).get("signature")
        return stored if isinstance(stored, str) and stored else signature(self.config)

    @property
    def status(self) -> str:
        """`completed`, `diverged`, `failed`, `interrupted`, ... or `running` while there is no summary."""
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
            out.update({k: v for k, v in ((read_json(path) or {}).get("scalars") or {}).items() if _is_number(v)})
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
    """The runs of one experiment (one signature), i.e. its seeds, with a human-readable label."""

    signature: str
    runs: list[Run]
    label: str = ""
    config: dict = field(default_factory=dict)

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.completed]

    def counts(self) -> dict[str, int]:
        """Number of runs per status: completed, diverged, failed, interrupted, cancelled and other (running)."""
        by_status = Counter(r.status for r in self.runs)
        counts = {s: by_status.pop(s, 0) for s in STATUSES}
        counts["other"] = sum(by_status.values())
        return counts


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by signature, in order of first appearance, labelled by what tells the groups apart."""
    groups: dict[str, Group] = {}
    for run in runs:
        if run.signature not in groups:
            groups[run.signature] = Group(run.signature, [], config=group_config(run.config))
        groups[run.signature].runs.append(run)
    result = list(groups.values())
    for group, label in zip(result, _labels(result)):
        group.label = label
    return result


def _format_value(value: Any) -> str:
    """A config value as in a Hydra override: `0.05`, `sam`, `null`, `true`, `[1,2]`."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def _labels(groups: Sequence[Group]) -> list[str]:
    """`key=value ...` per group: the flattened keys of its config whose values differ between groups.

    A key that every group has is compared over all groups. A key that only some groups have and that lies
    under an option whose `.name` differs (`optimizer.rho` of sam beside sgd) is compared only among the
    groups with the same option names: `optimizer=sgd` beside `optimizer=sam optimizer.rho=0.02,0.05` reads
    `optimizer.name=sgd`, `optimizer.name=sam optimizer.rho=0.02`, `optimizer.name=sam optimizer.rho=0.05`.

    A single group is labelled by its experiment name, else by the `*.name` keys of its config. A label that
    would be empty (or repeat another) gets the signature appended, so labels always tell groups apart.
    """
    flat = [flatten(g.config) for g in groups]
    if len(groups) == 1:
        experiment = groups[0].config.get("experiment")
        if experiment is not None:
            return [str(experiment)]
        names = [f"{k}={_format_value(v)}" for k, v in flat[0].items() if k.endswith(".name")]
        return [" ".join(names) or groups[0].signature]
    missing = object()

    def differs(key: str, among: Sequence[dict]) -> bool:
        return len({json.dumps(f.get(key, missing), default=repr) for f in among}) > 1

    keys = list(dict.fromkeys(k for f in flat for k in f))
    differing = [k for k in keys if differs(k, flat)]
    options = [k.removesuffix("name") for k in differing if k.endswith(".name")]  # e.g. "optimizer."

    def peers(f: dict, key: str) -> list[dict]:
        """The groups that compare with `f` on `key`: all if every group has it, else those choosing the
        same options (`*.name`) above `key` as `f`."""
        if all(key in g for g in flat):
            return flat
        above = [o + "name" for o in options if key.startswith(o) and key != o + "name"]
        return [g for g in flat if all(g.get(n, missing) == f.get(n, missing) for n in above)]

    labels = [" ".join(f"{k}={_format_value(f[k])}" for k in differing if k in f and differs(k, peers(f, k)))
              for f in flat]
    repeated = Counter(labels)
    return [
        f"{label} [{g.signature}]".strip() if not label or repeated[label] > 1 else label
        for label, g in zip(labels, groups)
    ]


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
        ax.plot(epochs, mean, color=color, label=f"{group.label} (n={len(group.completed)})")
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no completed runs with this metric", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set(xlabel="epoch (= step for full-batch tasks)", ylabel=metric, title=f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _legend_below(fig, ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _legend_below(fig, ax) -> None:
    """The legend under the axes, never over the curves or points (group labels can be long)."""
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize="small",
                   ncol=1 if max(map(len, labels)) > 60 else 2, frameon=False)


def plot_bars(groups: Sequence[Group], rows: Sequence[dict], metric: str, path: Path) -> None:
    """Final `metric` per group: every completed seed as a dot, the mean with its 95% CI as an error bar.

    The axis is zoomed to the data (bars from 0 would hide differences of a few tenths of a point).
    """
    plt = _pyplot()
    stats = [row[f"final_{metric}"] for row in rows]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.5 * len(rows)))
    colors = plt.get_cmap("tab10")
    for i, (group, s) in enumerate(zip(groups, stats)):
        seeds = _final_values(group.completed, metric)
        ax.scatter(seeds, np.full(len(seeds), i + 0.18), s=12, color=colors(i % 10), alpha=0.6)
        if s.mean is not None:
            ax.errorbar(s.mean, i, xerr=s.ci95 or 0.0, fmt="o", capsize=4, color=colors(i % 10))
            ax.annotate(_num(s.mean), (s.mean + (s.ci95 or 0.0), i), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize="small")
    ax.set_yticks(np.arange(len(rows)), [f"{g.label} (n={s.n})" for g, s in zip(groups, stats)], fontsize="small")
    ax.invert_yaxis()  # first group on top, as in the table
    ax.set(xlabel=f"final {metric}", title=f"final {metric}: seeds, mean and 95% CI")
    ax.margins(x=0.15, y=0.3)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


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
        axes[0].scatter(passes, value, label=f"{group.label} (n={len(points)})", **style)
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print the table, write the report folder; 0 on success, 2 on bad input or unwritable --out."""
    args = parse_args(argv)
    out = args.out if args.out is not None else Path(args.dirs[0]) / "report"
    try:
        runs, duplicates = drop_duplicates(find_runs(args.dirs))
        check_metric(runs, args.metric)
        groups = group_runs(runs)
        rows = summarize(groups, args.metric)
        columns = select_columns(rows, args.columns, args.metric)
        prepare_out(out)
    except ReportError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    if duplicates:
        print(f"report: {len(duplicates)} duplicate runs of the same (config, seed) left out: "
              + ", ".join(str(r.path) for r in duplicates), file=sys.stderr)
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
    sys.exit(main())
