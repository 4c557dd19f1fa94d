"""The run directory contract (DESIGN.md): metrics.jsonl, summary.json, checkpoints/, provenance.

Every write that a reader may see half-done (summary, checkpoints) goes to a temp file and is renamed over
the target, which is atomic on POSIX: a reader sees the old file or the new one, never a torn one.
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

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def atomic_write_bytes(path: Path, write) -> None:
    """`write(tmp_path)` then rename onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; "nan" keeps the line parseable by every reader
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.checkpoint_path = self.path / "checkpoints" / "last.pt"
        self.previous_checkpoint_path = self.path / "checkpoints" / "prev.pt"

    def log(self, record: dict) -> None:
        """Append one event (a JSON object) to metrics.jsonl and flush it, so a crash loses nothing logged."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")

    def write_summary(self, summary: dict) -> None:
        text = json.dumps(_json_safe(summary), indent=2) + "\n"
        atomic_write_bytes(self.summary_path, lambda tmp: Path(tmp).write_text(text))

    def read_summary(self) -> dict | None:
        return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else None

    def save_checkpoint(self, state: dict) -> None:
        """Write last.pt atomically, keeping the one before as prev.pt (the fallback if last.pt is corrupt)."""
        if self.checkpoint_path.exists():
            os.replace(self.checkpoint_path, self.previous_checkpoint_path)
        atomic_write_bytes(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop events logged after `last_epoch` (a resumed run logs them again)."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch]
        text = "".join(line + "\n" for line in kept)
        atomic_write_bytes(self.metrics_path, lambda tmp: Path(tmp).write_text(text))


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
