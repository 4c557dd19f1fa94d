"""`run(cfg, run_dir)`: one experiment, read top to bottom: validate, seed, data, model, optimizer, loop.

Importable without Hydra (tests call it with a composed config). Bad input raises `ConfigError` before any
work; failures during training are recorded in summary.json (status failed, with the error's last lines) and
re-raised; the dashboard logger is always finished.
"""
import dataclasses
import hashlib
import logging
import os
import random
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from runner.config import ConfigError, structured
from runner.data import DatasetConfig, build_data
from runner.logging import LOGGERS, build_logger
from runner.rundir import RunDir, command_line, device_name, git_state, versions
from runner.losses import LOSSES, build_loss
from runner.models import MODELS, build_model
from runner.optim import OPTIMIZERS, build_optimizer
from runner.schedulers import SCHEDULERS, build_scheduler
from runner.signature import signature
from runner.sweep import RunLock
from runner.train import Progress, TrainerConfig, train

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
TOP_LEVEL_KEYS = {"seed", "experiment", "dataset", "model", "loss", "optimizer", "scheduler", "trainer", "logger"}


@dataclass
class Spec:
    """The validated config: one dataclass per group, plus the resolved plain dict."""
    seed: int
    experiment: str
    dataset: DatasetConfig
    trainer: TrainerConfig
    resolved: dict


def validate(cfg: DictConfig) -> Spec:
    """Check every group against its schema (types, ranges, unknown keys); raises ConfigError."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that does not resolve
        raise ConfigError("config", message=f"invalid config: {e}".splitlines()[0]) from None
    for group, registry in (("model", MODELS), ("loss", LOSSES), ("optimizer", OPTIMIZERS),
                            ("scheduler", SCHEDULERS), ("logger", LOGGERS)):
        if group not in resolved:
            raise ConfigError(group, message=f"config group '{group}' is missing: add {group}=<option>")
        registry.validate(resolved[group])
    unknown = sorted(set(resolved) - TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(unknown[0], resolved[unknown[0]], "top-level keys " + ", ".join(sorted(TOP_LEVEL_KEYS)))
    seed = resolved.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")
    return Spec(seed=seed, experiment=str(resolved.get("experiment", "default")),
                dataset=structured(DatasetConfig, resolved["dataset"], "dataset"),
                trainer=structured(TrainerConfig, resolved["trainer"], "trainer"), resolved=resolved)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", message=f"trainer.device={name} but CUDA is not available on this "
                                                        "machine; use trainer.device=cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("trainer.device", name, f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls/convs
        torch.backends.cudnn.allow_tf32 = True


def read_checkpoint(path: Path) -> dict:
    """Load a runner checkpoint safely (weights_only); raises ValueError saying what is wrong with it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text suggests weights_only=False: unsafe advice, not passed on
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}): corrupt, truncated or not a "
                         "runner checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a runner checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def load_checkpoint(path: str) -> dict:
    """`trainer.resume`: a .pt file or a run dir; anything unreadable is a ConfigError."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if not p.is_file():
        raise ConfigError("trainer.resume", message=f"trainer.resume={path}: no checkpoint at {p.resolve()}")
    try:
        return read_checkpoint(p)
    except ValueError as e:
        raise ConfigError("trainer.resume", message=f"trainer.resume={path}: {e}") from None


def latest_checkpoint(record: RunDir) -> dict | None:
    """The newest readable checkpoint of this run dir (last.pt, else prev.pt); a corrupt one is reported."""
    for path in (record.checkpoint_path, record.previous_checkpoint_path):
        if path.exists():
            try:
                return read_checkpoint(path)
            except ValueError as e:
                log.warning("%s; trying the previous one", e)
    return None


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(), "data": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    generator.set_state(state["data"])


class RunBusy(RuntimeError):
    """Another process holds this run's lock (the same run launched twice at once)."""


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train one configuration and record it in `run_dir`; returns the summary (also in summary.json).

    A run dir that already holds a completed (or diverged) run is skipped: its summary is returned with
    `"skipped": true`. One that holds checkpoints continues from the newest readable one.
    """
    spec = validate(cfg)
    device = resolve_device(spec.trainer.device)
    resume = load_checkpoint(spec.trainer.resume) if spec.trainer.resume else None
    record = RunDir(run_dir)
    previous = record.read_summary()
    if previous is not None and previous.get("status") in ("completed", "diverged"):
        return {**previous, "skipped": True}
    lock = RunLock(record.path)
    if not lock.acquire():
        raise RunBusy(f"{record.path} is being trained by another process; skipped")
    try:
        if resume is None:
            resume = latest_checkpoint(record)
        if resume is None:
            record.truncate_metrics(0)  # a run that died before its first checkpoint starts over
        else:
            record.truncate_metrics(resume["progress"]["step"])
        return _train_and_record(cfg, spec, device, resume, record)
    finally:
        lock.release()


def _train_and_record(cfg: DictConfig, spec: Spec, device: torch.device, resume: dict | None,
                      record: RunDir) -> dict:
    sig = signature(spec.resolved)
    channels_last = spec.trainer.channels_last if spec.trainer.channels_last is not None else device.type == "cuda"

    seed_everything(spec.seed, spec.trainer.deterministic, device)
    data = build_data(spec.dataset, spec.seed, device, channels_last)
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = build_loss(cfg.loss)
    optimizer, capabilities = build_optimizer(cfg.optimizer, model.parameters())
    scheduler = build_scheduler(cfg.scheduler, optimizer, spec.trainer.epochs, len(data.train))
    progress = Progress()
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__)[:240]
            where = spec.trainer.resume or str(record.checkpoint_path)
            raise ConfigError("trainer.resume", message=f"checkpoint {where} does not match this model/optimizer "
                                                        f"(model={cfg.model.name}): {detail}") from None
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"], data.train.generator)
        progress = Progress(**resume["progress"])
        log.info("resuming %s from epoch %d", record.path, progress.epoch)
    net = torch.compile(model) if spec.trainer.compile else model

    run_id = f"{sig}-s{spec.seed}-{hashlib.sha1(str(record.path.resolve()).encode()).hexdigest()[:8]}"
    logger = build_logger(cfg.logger, run_dir=record.path, config=spec.resolved,
                          name=_overrides(record.path) or spec.experiment, group=f"{spec.experiment}-{sig}",
                          job_type=spec.experiment, run_id=run_id)
    git = git_state(diff_to=record.path / "git.diff")

    def summary(status: str, error: str | None = None) -> dict:
        return {"status": status, "final": progress.final, "best": progress.best, "seed": spec.seed,
                "epochs": progress.epoch, "steps": progress.step, "passes": progress.passes,
                "passes_per_step": capabilities["passes_per_step"],
                "wall_s": round(progress.wall_s, 3), "error": error, "experiment": spec.experiment,
                "signature": sig, "resumed_from_epoch": resume["progress"]["epoch"] if resume else None,
                "deterministic": spec.trainer.deterministic, "versions": versions(), "git": git,
                "device": device.type, "device_name": device_name(device), "command": command_line(),
                "label_noise_fraction": data.noisy_fraction}

    def on_epoch(metrics: dict) -> None:
        record.log(metrics)
        logger.log(metrics, step=metrics["step"])

    def on_checkpoint() -> None:
        record.save_checkpoint({"format": CHECKPOINT_FORMAT, "signature": sig, "model": model.state_dict(),
                                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                "rng": rng_state(data.train.generator), "progress": dataclasses.asdict(progress)})

    result = None
    try:
        status = train(net, objective, optimizer, scheduler, data, spec.trainer, device, progress, on_epoch,
                       on_checkpoint)
        result = summary(status)
    except KeyboardInterrupt:
        result = summary("interrupted", "KeyboardInterrupt")
        raise
    except BaseException as e:
        result = summary("failed", "".join(traceback.format_exception(e)[-3:]).strip())
        raise
    finally:
        if result is not None:
            record.write_summary(result)
            logger.finish(result)
    return result


def failed_summary(run_dir: str | Path, error: str, status: str = "failed") -> None:
    """summary.json for a job that failed before training started (in a sweep, so the report counts it)."""
    RunDir(run_dir).write_summary({"status": status, "final": {}, "best": {}, "error": error,
                                   "versions": versions(), "git": git_state(), "command": command_line()})


def _overrides(run_dir) -> str:
    """The command-line overrides Hydra saved for this run, as one string (the wandb run name)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    return " ".join(str(o) for o in OmegaConf.load(path))
