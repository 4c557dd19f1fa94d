"""Validate once: the composed config -> `Spec`, one validated choice per group. Builders take the Spec, never
the raw config node.

`GROUPS` is the one table of the config's groups: the top-level keys, the registry (or schema) behind each, and
the keys that do not define an experiment. Validation, the signature, Hydra's sweep folder names and the tests
all read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runner.config import Choice, ConfigError, structured


def registries() -> dict:
    """group -> Registry (imported here: registering the plugins imports torch)."""
    from runner.logging import LOGGERS
    from runner.losses import LOSSES
    from runner.models import MODELS
    from runner.optim import OPTIMIZERS
    from runner.schedulers import SCHEDULERS
    from tasks import TASKS

    return {"dataset": TASKS, "model": MODELS, "loss": LOSSES, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS,
            "logger": LOGGERS}


#: Every top-level key of a job's config: the groups with a registry, `trainer` (one schema), two values, and
#: the optional `analysis` node (runner/analysis/: several options at once, not part of the run's identity).
GROUP_KEYS = ("dataset", "model", "loss", "optimizer", "scheduler", "trainer", "logger")
TOP_LEVEL_KEYS = (*GROUP_KEYS, "seed", "experiment", "analysis")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: Command-line groups that only choose how jobs are launched (Hydra's side), never part of a job's config.
LAUNCH_GROUPS = ("launcher", "sweep")

#: Keys that do not define the experiment (a key covers its subtree): left out of the signature and of the
#: sweep folder names. Their one list is Hydra's `override_dirname.exclude_keys` in conf/config.yaml (less the
#: launch groups). Two jobs that differ only in these would share a run folder: such a sweep is refused
#: before it starts (runner/cli.py).
NON_IDENTITY_KEYS = tuple(
    str(k) for k in OmegaConf.load(CONF_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys
    if k not in LAUNCH_GROUPS)

#: Keys added after run folders existed, with the value that reproduces the behaviour from before: at that
#: value they are left out of the signature, so older runs keep their folders (and reruns find them).
ADDED_KEYS = {"trainer.steps": None, "trainer.eval_every_steps": None, "trainer.dtype": "float32",
              "model.bias": True, "model.embedding": None, "dataset.imbalance_ratio": None, "loss.dtype": None,
              # the SAM engine's options (issue 9): at their defaults, a SAM run keeps its folder
              "optimizer.weight_decay_in_loss": False, "optimizer.skip_nonfinite": True, "optimizer.m": None,
              # many devices (issue 16): one device, and the engine's default, keep a run's folder
              "trainer.devices": 1, "trainer.sync_bn": False, "optimizer.perturbation_sync": "local",
              # augmentations as a list (issue 17): cutout's side
              "dataset.cutout_size": None}


@dataclass(frozen=True)
class Spec:
    """The validated config. `resolved` is the plain resolved dict (what the signature hashes)."""
    seed: int
    experiment: str
    dataset: Choice
    model: Choice
    loss: Choice
    optimizer: Choice
    scheduler: Choice
    logger: Choice
    trainer: Any  # runner.train.TrainerConfig
    resolved: dict
    analysis: Any = None  # runner.analysis.Plan, or None without analyses


def check_devices(trainer, choices: dict) -> None:
    """Many devices (`trainer.devices` > 1, runner/cluster.py): the global batch splits evenly over them, sync_bn
    needs CUDA, m-sharpness chunks are per device (`perturbation_sync=local`; and not with a loss that keeps state
    per training sample, ALDR-KL, gathered at every pass), and a method defined per device only (`per_device`,
    e.g. ESAM's per-sample selection) is not asked for its global form. State kept per training sample (SAF,
    MESA, ALDR-KL) is gathered over the devices (`Cluster.gather_rows`)."""
    if trainer.devices <= 1:
        return
    batch = getattr(choices["dataset"].params, "batch_size", None)
    if isinstance(batch, int) and batch % trainer.devices:
        raise ConfigError("dataset.batch_size", message=(
            f"dataset.batch_size={batch} does not split over trainer.devices={trainer.devices}: the global batch is "
            f"split evenly over the devices; use a multiple of {trainer.devices}"))
    import torch

    if trainer.sync_bn and (trainer.device == "cpu" or (trainer.device == "auto" and not torch.cuda.is_available())):
        raise ConfigError("trainer.sync_bn", message="trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm runs on "
                                                     "GPUs only); leave it false on the CPU")
    from runner.optim import capabilities

    optimizer = choices["optimizer"]
    chunks = getattr(optimizer.params, "m", None)
    sync = getattr(optimizer.params, "perturbation_sync", None)
    if chunks is not None and sync == "global":
        raise ConfigError("optimizer.m", message=(
            f"optimizer.m={chunks} (m-sharpness) with optimizer.perturbation_sync=global on trainer.devices="
            f"{trainer.devices}: global perturbs with the global batch, m-sharpness with chunks of m samples; use "
            f"perturbation_sync=local (each device chunks its own samples) or optimizer.m=null"))
    keeper = choices["loss"].entry.capabilities.get("sample_indices", False)
    if chunks is not None and keeper:  # its state is gathered at every pass, and ranks may have unequal chunk counts
        raise ConfigError("optimizer.m", message=(
            f"optimizer.m={chunks} (m-sharpness) with loss={choices['loss'].name} on trainer.devices="
            f"{trainer.devices}: the loss keeps state per training sample, gathered from every device at every pass, "
            f"and the devices' last batches may split into different numbers of chunks; use optimizer.m=null"))
    why = capabilities(optimizer).per_device
    if why and getattr(optimizer.params, "perturbation_sync", None) == "global":
        raise ConfigError("optimizer.perturbation_sync", message=(
            f"optimizer={optimizer.name} has no global form over devices: {why}; use "
            f"optimizer.perturbation_sync=local"))


def check_seed(seed: Any) -> int:
    """The seed, an integer in [0, 2**32); else ConfigError."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ConfigError("seed", seed, "an integer in [0, 2**32)")
    return seed


def validate(cfg: DictConfig | dict) -> Spec:
    """Check every group against its schema (types, ranges, unknown keys) and the groups against each other
    (the model and the optimizer take the dataset's input); raises ConfigError."""
    from runner.train import TrainerConfig

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except Exception as e:  # an interpolation that does not resolve
        raise ConfigError("config", message=f"invalid config: {e}".splitlines()[0]) from None
    unknown = sorted(set(resolved) - set(TOP_LEVEL_KEYS) - {"hydra"})
    if unknown:
        raise ConfigError(unknown[0], resolved[unknown[0]], "top-level keys " + ", ".join(sorted(TOP_LEVEL_KEYS)))
    for group in GROUP_KEYS:
        if group not in resolved:
            raise ConfigError(group, message=f"config group '{group}' is missing: add {group}=<option>")
    choices = {group: registry.validate(resolved[group]) for group, registry in registries().items()}
    trainer = structured(TrainerConfig, resolved["trainer"], "trainer")
    seed = check_seed(resolved.get("seed"))
    produces = choices["dataset"].entry.capabilities.get("input")
    accepts = choices["model"].entry.capabilities.get("inputs", ())
    if produces not in accepts:
        raise ConfigError("model.name", message=f"model={choices['model'].name} takes {', '.join(accepts)} input; "
                                                f"dataset={choices['dataset'].name} gives {produces}")
    from runner.optim import capabilities

    restricted = capabilities(choices["optimizer"]).inputs  # e.g. TRAM's reference=noise: float inputs only
    if restricted is not None and produces not in restricted.kinds:
        key = f"optimizer.{restricted.key}"
        raise ConfigError(key, message=(
            f"optimizer={choices['optimizer'].name} with {key}={getattr(choices['optimizer'].params, restricted.key)}"
            f" takes {', '.join(restricted.kinds)} input ({restricted.why}); dataset={choices['dataset'].name} gives "
            f"{produces}"))
    check_devices(trainer, choices)
    from runner.analysis import validate_plan

    analysis = validate_plan(resolved.get("analysis"))
    return Spec(seed=seed, experiment=str(resolved.get("experiment", "default")), trainer=trainer, analysis=analysis,
                resolved={k: v for k, v in resolved.items() if k != "hydra"}, **choices)
