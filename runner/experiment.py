"""Build once: `build(spec, device) -> Experiment`, the objects one run is made of; `load_run(run_dir)` rebuilds
a trained run from its directory (or from one checkpoint file) alone.

Training (runner/run.py), resume, the benchmark (scripts/bench_train.py) and post-hoc analyses all start here.
A checkpoint is self-describing: besides the model, optimizer, scheduler, loss state (ALDR-KL's per-sample
lambdas; none for most losses), RNG states and progress it holds the resolved config, so
`load_run(path/to/last.pt)` needs nothing else.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from runner.cluster import SINGLE, Cluster
from runner.config import ConfigError
from runner.optim import Capabilities, build_optimizer, capabilities
from runner.rundir import RunDir
from runner.schedulers import build_scheduler
from runner.signature import signature
from runner.spec import Spec, validate
from runner.train import Progress, autocast_for

CHECKPOINT_FORMAT = 1


@dataclass
class Experiment:
    """Task data, model, objective, optimizer, scheduler and the optimizer's declared capabilities."""
    spec: Spec
    device: torch.device
    task: object  # tasks.Task
    model: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    capabilities: Capabilities
    cluster: Cluster = SINGLE  # the process group (runner/cluster.py); one process: SINGLE
    rank_rngs: Optional[list] = None  # many processes: every rank's RNG states at the last checkpoint (rank order)

    @property
    def signature(self) -> str:
        return signature(self.spec.resolved)

    def autocast(self):
        return autocast_for(self.device, self.spec.trainer.precision)

    def state_dict(self, progress: Progress) -> dict:
        """A checkpoint: everything to continue training exactly, plus the config that rebuilds it."""
        return {"format": CHECKPOINT_FORMAT, "signature": self.signature, "seed": self.spec.seed,
                "config": self.spec.resolved,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "objective": self.objective.state_dict(),
                "rng": rng_state(self.task.train.generator),
                **_epoch_state(progress, self.task.train),
                **({"rng_ranks": self.rank_rngs} if self.rank_rngs is not None else {}),
                "progress": dataclasses.asdict(progress)}

    def load_state_dict(self, state: dict, where: str, restore_rng: bool = True) -> Progress:
        """Continue from a checkpoint (weights, optimizer, schedule, data order and RNGs); returns its progress.
        No forward pass runs and no random number is drawn: BN statistics and the data order stay as saved."""
        try:
            self.model.load_state_dict(state["model"])
            if "objective" in state:  # a loss's own state (ALDR-KL's lambdas); older checkpoints have none
                self.objective.load_state_dict(state["objective"])
            elif self.objective.state_dict():
                logging.getLogger(__name__).warning("checkpoint %s holds no loss state: %s starts afresh", where,
                                                    self.spec.loss.name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError("trainer.resume", message=f"checkpoint {where} does not match this model/loss "
                                                        f"(model={self.spec.model.name}): {_detail(e)}") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            saved = ((state.get("config") or {}).get("optimizer") or {}).get("name", "an unknown optimizer")
            raise ConfigError("trainer.resume", message=(
                f"checkpoint {where}: its optimizer state, saved by optimizer={saved}, does not fit "
                f"optimizer={self.spec.optimizer.name} ({_detail(e)}); resume it with optimizer={saved}")) from None
        self.scheduler.load_state_dict(state["scheduler"])
        if restore_rng:
            ranks = state.get("rng_ranks")  # a many-device checkpoint: this rank's own states, if it has them
            own = ranks[self.cluster.rank] if ranks and len(ranks) == self.cluster.world else state["rng"]
            set_rng_state(own, self.task.train.generator)
        self.task.train.load_state_dict(state.get("data", {}))
        fields = {f.name for f in dataclasses.fields(Progress)}
        return Progress(**{k: v for k, v in state["progress"].items() if k in fields})


def _epoch_state(progress: Progress, batches) -> dict:
    """A checkpoint taken mid-epoch (`trainer.checkpoint_every_steps`): the batch source's state of the epoch (the
    device-resident permutation; nothing for a streamed source, whose order is a function of the epoch)."""
    state = batches.state_dict() if progress.step != progress.epoch * len(batches) else {}
    return {"data": state} if state else {}


def _detail(error: Exception) -> str:
    """The telling line of a state-dict loading error (a KeyError's bare `'step'` says which entry is missing)."""
    if isinstance(error, KeyError):
        return f"no {error} in its state"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__)[:240]


def resolve_device(name: str, option: str = "trainer.device") -> torch.device:
    """auto, cpu, cuda or cuda:N as a device present here; else ConfigError naming `option` (the key or flag)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(option, name, "auto, cpu, cuda, cuda:N with N >= 0")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(option, message=f"{option}={name} but CUDA is not available on this machine; use "
                                              f"{option}=cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(option, name, f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
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


def build(spec: Spec, device: torch.device, cluster: Cluster = SINGLE) -> Experiment:
    """Seed, then build the task's data, the model, the objective, the optimizer and the schedule (in this order:
    the random draws of each, hence the numbers of a run, depend on it). Every rank of a `cluster` builds the same
    (same seed: the same weights, the same data order; each takes its part of each batch in the loop)."""
    trainer = spec.trainer
    channels_last = trainer.channels_last if trainer.channels_last is not None else device.type == "cuda"
    caps = capabilities(spec.optimizer)
    # a loss may need the sample indices too (ALDR-KL's per-sample lambda): it then also gets the train split's size
    loss_indices = bool(spec.loss.entry.capabilities.get("sample_indices", False))
    seed_everything(spec.seed, trainer.deterministic, device)
    task = spec.dataset.build(seed=spec.seed, device=device, channels_last=channels_last,
                              with_indices=caps.sample_indices or loss_indices, cluster=cluster)
    model = spec.model.build(input=task.input, num_classes=task.num_classes).to(device)
    if trainer.dtype == "float64":  # weights, and float inputs as they enter the model (any task, any transform)
        model = model.to(torch.float64)
        model.register_forward_pre_hook(_float64_inputs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cluster.distributed and trainer.sync_bn:  # BN over the global batch (same parameters, before the optimizer)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sized = {"num_samples": task.train.num_samples} if loss_indices else {}
    objective = spec.loss.build(num_classes=task.num_classes, **sized).to(device)  # its buffers on the device
    if hasattr(objective, "cluster"):  # a loss that keeps state per training sample keeps it over all ranks
        objective.cluster = cluster
    optimizer = build_optimizer(spec.optimizer, model.parameters())
    if hasattr(optimizer, "set_parameter_names"):  # methods whose convention depends on names (ASAM's "weight")
        optimizer.set_parameter_names({id(p): name for name, p in model.named_parameters()})
    steps_per_epoch = len(task.train)
    scheduler = build_scheduler(spec.scheduler, optimizer, trainer.total_steps(steps_per_epoch), steps_per_epoch)
    return Experiment(spec, device, task, model, objective, optimizer, scheduler, caps, cluster)


def _float64_inputs(module, args):
    """`trainer.dtype=float64`: floating-point inputs cast to float64 (token inputs stay integers)."""
    return tuple(a.to(torch.float64) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


# ------------------------------------------------------------------------------------------------ checkpoints

def load_safely(path: Path, what: str = "checkpoint") -> object:
    """`torch.load(path, weights_only=True)` onto the CPU, quietly: any failure is a ValueError naming the file
    (torch's own text suggests weights_only=False, unsafe advice not passed on) and torch's warnings about the
    file (an unusual pickle protocol) are not printed, so an unreadable file is one line."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {what} {path} ({type(e).__name__}): corrupt, truncated or not a runner "
                         f"{what}") from None


def read_checkpoint(path: Path) -> dict:
    """Load a runner checkpoint safely (weights_only); raises ValueError saying what is wrong with it."""
    state = load_safely(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a runner checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [k for k in ("model", "optimizer", "scheduler", "rng", "progress") if k not in state]
    if missing:
        raise ValueError(f"{path} is an incomplete runner checkpoint (no {', '.join(missing)})")
    return state


def load_checkpoint(path: str, cached: bool = False) -> dict:
    """`trainer.resume`: a .pt file or a run dir; anything unreadable is a ConfigError. `cached=True` (checks
    only: the optimizer may alias the loaded tensors, so training always loads a fresh copy) reads it once."""
    p = Path(path)
    if p.is_dir():
        p = RunDir(p, create=False).checkpoint_path
    if not p.is_file():
        raise ConfigError("trainer.resume", message=f"trainer.resume={path}: no checkpoint at {p.resolve()}")
    try:
        return _read_cached(str(p.resolve()), p.stat().st_mtime_ns) if cached else read_checkpoint(p)
    except ValueError as e:
        raise ConfigError("trainer.resume", message=f"trainer.resume={path}: {e}") from None


@functools.lru_cache(maxsize=2)
def _read_cached(path: str, mtime_ns: int) -> dict:
    """A sweep whose jobs all resume from one checkpoint reads it once (keyed by path and modification time)."""
    return read_checkpoint(Path(path))


def check_environment(spec: Spec) -> None:
    """What can be checked before any work beyond the config itself, for every job of a sweep before the first
    runs (runner/cli.py) and again when a job starts: the dataset's files, the device, the logger's credentials,
    the checkpoint to resume from (readable, and made by the same model), pca's snapshots (enough of them).
    Raises ConfigError."""
    for choice in (spec.dataset, spec.logger):
        check = choice.entry.capabilities.get("check")
        if check is not None:
            check(**choice.kwargs)
    resolve_device(spec.trainer.device)
    if spec.analysis is not None:  # pca: the run will save enough snapshots to succeed
        from runner.analysis.methods import check_snapshots

        check_snapshots(spec.analysis, spec.trainer)
    if spec.analysis is not None and spec.analysis.other is not None:
        check_other_run(spec.analysis.other, spec.resolved["model"], spec.analysis)
    if spec.trainer.resume:
        state = load_checkpoint(spec.trainer.resume, cached=True)
        saved = (state.get("config") or {}).get("model")
        if saved is not None and not same_model(saved, spec.resolved["model"]):
            raise ConfigError("trainer.resume", message=(
                f"checkpoint trainer.resume={spec.trainer.resume} does not match this job's model: it holds "
                f"{saved}, this job has {spec.resolved['model']}"))


def same_model(a: dict, b: dict) -> bool:
    """Two model configs describe the same architecture; keys added later (runner.spec.ADDED_KEYS, e.g.
    `model.bias`) count only away from their old-behaviour value, so a checkpoint from before they existed still
    matches."""
    import copy

    from runner.signature import _remove
    from runner.spec import ADDED_KEYS

    def normal(model: dict) -> dict:
        node = {"model": copy.deepcopy(model)}
        for key, old in ADDED_KEYS.items():
            if key.startswith("model."):
                _remove(node, key, only_if=old)
        return node["model"]

    return normal(a) == normal(b)


def check_other_run(other: str, model: dict, plan) -> None:
    """`analysis.other` (interpolate's second run): a readable checkpoint of the same model, else ConfigError."""
    which = next((c.params.other_checkpoint for c in plan.choices if hasattr(c.params, "other_checkpoint")), "last")
    path = Path(other)
    if path.is_dir():
        record = RunDir(path, create=False)
        path = {"last": record.checkpoint_path, "best": record.best_checkpoint_path}.get(which, path / which)
    if not path.is_file():
        raise ConfigError("analysis.other", message=f"analysis.other={other}: no checkpoint at {path}")
    try:
        state = _read_cached(str(path.resolve()), path.stat().st_mtime_ns)
    except ValueError as e:
        raise ConfigError("analysis.other", message=f"analysis.other={other}: {e}") from None
    saved = (state.get("config") or {}).get("model")
    if saved is not None and not same_model(saved, model):
        raise ConfigError("analysis.other", message=(
            f"analysis.other={other} holds another model: {saved} vs {model}; interpolation needs the same "
            "architecture"))


def latest_checkpoint(record: RunDir) -> dict | None:
    """The newest readable checkpoint of this run dir (last.pt, else prev.pt); a corrupt one is reported."""
    import logging

    for path in (record.checkpoint_path, record.previous_checkpoint_path):
        if path.exists():
            try:
                return read_checkpoint(path)
            except ValueError as e:
                logging.getLogger(__name__).warning("%s; trying the previous one", e)
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


def load_run(run: str | Path, checkpoint: str = "last", device: str | torch.device | None = None
             ) -> tuple[Experiment, Progress]:
    """Rebuild a trained run: `run` is a run directory (`checkpoint` = "last", "best" or a path, relative to the run
    directory) or a .pt file.

    The config comes from the checkpoint itself (else the run's .hydra/config.yaml). `device` defaults to the
    run's `trainer.device` where available, else the CPU. Returns the experiment, with the checkpoint's weights,
    optimizer and schedule state, data generator state and BN statistics untouched, and the saved progress.
    """
    run = Path(run)
    if run.is_file():
        path = run
    else:
        record = RunDir.existing(run)
        names = {"last": record.checkpoint_path, "best": record.best_checkpoint_path}
        path = names.get(checkpoint, run / checkpoint)  # a relative path: from the run directory
        if checkpoint == "best" and not path.exists():
            raise FileNotFoundError(f"{run} has no {path.name} (train with trainer.save_best=true)")
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = read_checkpoint(path)
    config = state.get("config")
    if config is None:  # checkpoints written before the config was stored in them
        config = RunDir.existing(path.parent.parent).read_config()
        if config is None:
            raise ValueError(f"{path} holds no config and {path.parent.parent} no .hydra/config.yaml")
    spec = validate(OmegaConf.create(config))
    if device is None:
        wanted = spec.trainer.device
        device = wanted if wanted != "auto" and (not wanted.startswith("cuda") or torch.cuda.is_available()) else "auto"
    experiment = build(spec, resolve_device(str(device)))
    progress = experiment.load_state_dict(state, str(path))
    return experiment, progress
