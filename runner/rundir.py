"""The run directory (DESIGN.md), written and read here only: the trainer, the report and the analyses use
these names and these readers.

    .hydra/config.yaml   the resolved config (written by Hydra)
    metrics.jsonl        one JSON object per log event
    summary.json         status, final/best metrics, provenance (written at the end and on failure)
    checkpoints/         last.pt and prev.pt (atomic writes; prev.pt is the fallback for a torn last.pt), best.pt
                         with trainer.save_best; each holds the resolved config (self-describing)
    analysis/            arrays (.npz), figures (.png), numbers (.json)

Every write that a reader may see half-done (summary, checkpoints) goes to a temp file and is renamed over
the target, which is atomic on POSIX: a reader sees the old file or the new one, never a torn one. Readers are
tolerant: a missing or half-written file reads as None / no records, because runs are read while they run.
"""
import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = Path(".hydra") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.pt"
PREVIOUS_CHECKPOINT = "prev.pt"
BEST_CHECKPOINT = "best.pt"
ANALYSIS = "analysis"
LOCK = ".lock"


def atomic_write_bytes(path: Path, write) -> None:
    """`write(tmp_path)` then rename onto `path`. When either raises (a full disk: ENOSPC), the temp file is
    deleted before the error goes on: a half-written checkpoint must not keep the space the record needs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; "nan" keeps the line parseable by every reader
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunDir:
    """One run's folder. `RunDir(path)` creates it (the trainer); `RunDir.existing(path)` only reads."""

    def __init__(self, path, create: bool = True):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / METRICS
        self.summary_path = self.path / SUMMARY
        self.config_path = self.path / CONFIG
        self.checkpoint_path = self.path / CHECKPOINTS / LAST_CHECKPOINT
        self.previous_checkpoint_path = self.path / CHECKPOINTS / PREVIOUS_CHECKPOINT
        self.best_checkpoint_path = self.path / CHECKPOINTS / BEST_CHECKPOINT
        self.analysis_path = self.path / ANALYSIS

    @classmethod
    def existing(cls, path) -> "RunDir":
        if not Path(path).is_dir():
            raise FileNotFoundError(f"no run directory at {path}")
        return cls(path, create=False)

    def log(self, record: dict) -> None:
        """Append one event (a JSON object) to metrics.jsonl and flush it, so a crash loses nothing logged."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")

    def write_summary(self, summary: dict) -> None:
        text = json.dumps(_json_safe(summary), indent=2) + "\n"
        atomic_write_bytes(self.summary_path, lambda tmp: Path(tmp).write_text(text))

    def read_summary(self) -> dict | None:
        """summary.json, or None while there is none, or when it cannot be read: not JSON, or JSON whose fields
        have the wrong types (`"final": [...]`, `"best": "x"`; see `summary_problem`)."""
        summary = read_json(self.summary_path)
        return summary if summary is not None and summary_problem(summary) is None else None

    def read_metrics(self) -> list[dict]:
        """The records of metrics.jsonl (broken lines skipped)."""
        return read_jsonl(self.metrics_path)

    def read_config(self) -> dict | None:
        """The resolved config Hydra saved, or None."""
        return read_yaml(self.config_path)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of atomic writes a killed process left behind (`.last.pt.tmp<pid>`, ...);
        call it holding the run's lock, when no other process writes here."""
        folders = (self.path, self.path / CHECKPOINTS, self.path / ANALYSIS, self.path / ANALYSIS / "trajectory")
        stale = [p for folder in folders if folder.is_dir()
                 for p in folder.glob(".*.tmp*") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def save_checkpoint(self, state: dict) -> None:
        """Write last.pt atomically, keeping the one before as prev.pt (the fallback if last.pt is corrupt)."""
        if self.checkpoint_path.exists():
            os.replace(self.checkpoint_path, self.previous_checkpoint_path)
        atomic_write_bytes(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def save_best_checkpoint(self, state: dict) -> None:
        atomic_write_bytes(self.best_checkpoint_path, lambda tmp: torch.save(state, tmp))

    def truncate_metrics(self, last_step: int) -> None:
        """Drop events logged after step `last_step` (a resumed run logs them again) and broken lines."""
        if not self.metrics_path.exists():
            return
        kept = [json.dumps(r) for r in self.read_metrics() if r.get("step", 0) <= last_step]
        text = "".join(line + "\n" for line in kept)
        atomic_write_bytes(self.metrics_path, lambda tmp: Path(tmp).write_text(text))


def is_run_dir(path: Path) -> bool:
    return (Path(path) / SUMMARY).is_file() or (Path(path) / CONFIG).is_file()


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or unreadable (e.g. being written)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


#: The fields of summary.json that readers use, with the JSON types each may hold (a field may be absent).
SUMMARY_TYPES: dict[str, tuple[type, ...]] = {
    "status": (str,), "final": (dict,), "best": (dict,), "seed": (int, type(None)), "signature": (str, type(None)),
    "error": (str, type(None)), "analysis": (dict, type(None)), "analysis_errors": (dict, type(None)),
}
_JSON_TYPE = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
              float: "a number", type(None): "null"}


def summary_problem(summary) -> str | None:
    """Why `summary` (summary.json as parsed) is not a run's summary, in a few words, or None when it is one: it
    must be a JSON object whose fields in `SUMMARY_TYPES` have their types (valid JSON with `"final": [...]` is
    not a summary: every reader would stumble over it)."""
    if not isinstance(summary, dict):
        return f"not a JSON object but {_JSON_TYPE.get(type(summary), type(summary).__name__)}"
    for key, types in SUMMARY_TYPES.items():
        value = summary.get(key)
        if key in summary and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            want = " or ".join(dict.fromkeys(_JSON_TYPE[t] for t in types))
            return f'"{key}" is {_JSON_TYPE.get(type(value), type(value).__name__)}, not {want}'
    return None


def read_yaml(path: Path) -> dict | None:
    """The mapping in a YAML file, or None when it is missing or unreadable."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, skipping blank and broken lines (a run may be mid-write)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "hydra-core", "omegaconf", "numpy", "wandb"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def git_state(diff_to: Path | None = None) -> dict:
    """Revision and dirty flag of the runner's source tree (not of the cwd); the diff goes to `diff_to` if dirty."""
    def git(*args):
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    try:
        rev = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if rev else None
        if dirty and diff_to is not None:
            Path(diff_to).write_text(git("diff", "HEAD") + "\n")
    except (OSError, subprocess.TimeoutExpired):
        rev, dirty = None, None
    return {"rev": rev, "dirty": dirty}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def unwritable(folder) -> str | None:
    """Why a run cannot write into `folder`, in a few words, or None when it can: the folder (or, before it exists,
    the nearest existing folder above it) and what a run rewrites or appends to in place (Hydra's .hydra/ and log,
    the lock, analysis/). `os.access` knows read-only mounts and immutable files, also for root."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is read-only"
    if existing != folder:
        return None
    inside = [folder / ".hydra", folder / "runner.log", folder / LOCK, folder / ANALYSIS]
    inside += sorted((folder / ".hydra").glob("*.yaml")) if (folder / ".hydra").is_dir() else []
    for path in inside:
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            return f"{path} is read-only"
    return None
