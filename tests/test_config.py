"""The config tree: every experiment and every option of every group composes (as `python -m runner` would
compose it), passes `runner.spec.validate`, and its parts can be built and used for a step.

Models are built for their dataset's input shape: the small ones (mlp, cnn) for digits' 1x8x8, the CIFAR
ones (resnet18, wrn) for 3x32x32. Optimizers, schedulers and losses are built on a tiny model.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision.datasets
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from runner.logging import LOGGERS
from runner.losses import LOSSES
from runner.models import MODELS
from runner.optim import OPTIMIZERS, build_optimizer, capabilities
from runner.schedulers import SCHEDULERS, build_scheduler
from runner.signature import flatten, signature
from runner.spec import GROUP_KEYS, TOP_LEVEL_KEYS, registries, validate
from runner.train import TrainerConfig
from tasks import TASKS, ImageInput

try:
    from tests.conftest import CONF_DIR, cli_env, python_m
    from tests.fake_data import (patch_cifar_md5, write_fake_cifar10, write_fake_cifar100, write_fake_mnist,
                                 write_image_folder, write_tiny_imagenet)
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from conftest import CONF_DIR, cli_env, python_m
    from fake_data import (patch_cifar_md5, write_fake_cifar10, write_fake_cifar100, write_fake_mnist,
                           write_image_folder, write_tiny_imagenet)

#: The groups a job consumes (the one table in runner/spec.py); other folders of conf/ (experiment, launcher,
#: sweep, ...) only rearrange these or Hydra's own settings.
RUN_GROUPS = GROUP_KEYS
DEFAULTS = {k: v for entry in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
            if isinstance(entry, dict) for k, v in entry.items()}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def group_override(group: str, option: str) -> str:
    """`group=option` for a group in the defaults list, `+group=option` for an optional one (experiment)."""
    return f"{group}={option}" if group in DEFAULTS else f"+{group}={option}"


GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
EXTRA_GROUPS = [g for g in GROUPS if g not in RUN_GROUPS and g != "experiment"]
EXPERIMENTS = options("experiment")
ALL_OPTIONS = [(g, o) for g in GROUPS if g != "experiment" for o in options(g)]

# input shape (channels, size) and number of classes of each dataset
SHAPES = {"digits": (1, 8, 10), "mnist": (1, 28, 10), "fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10),
          "cifar100": (3, 32, 100), "synthetic": (3, 32, 10),
          # streamed folders: the 3 classes of the tiny folders the tests write (tests/fake_data.py)
          "imagefolder": (3, 224, 3), "imagenet": (3, 224, 3), "tiny_imagenet": (3, 64, 3)}
FEATURES = {"wine": (13, 3), "breast_cancer": (30, 2)}  # feature datasets: (dim, classes)
TOKENS = {"modular_arithmetic": (2, 113)}  # token datasets: (length, classes)
CIFAR_MODELS = ("resnet18", "wrn")  # checked at 3x32x32; the others at digits' 1x8x8


def test_config_tree_is_what_the_tests_cover():
    assert set(RUN_GROUPS) <= set(GROUPS), "a group runner.run needs has no folder in conf/"
    assert all(DEFAULTS.get(g) for g in RUN_GROUPS), f"defaults list misses a run group: {DEFAULTS}"
    assert "experiment" not in DEFAULTS  # presets are opt-in: +experiment=name
    assert EXPERIMENTS, "no experiments in conf/experiment"
    for group in RUN_GROUPS:
        assert DEFAULTS[group] in options(group)
    assert set(registries()) == set(RUN_GROUPS) - {"trainer"}  # trainer: one schema, no options to register
    composed = OmegaConf.load(CONF_DIR / "config.yaml")
    assert set(TOP_LEVEL_KEYS) == set(RUN_GROUPS) | {k for k in composed if k not in ("defaults", "hydra")}


def test_default_config(compose):
    cfg = compose()
    spec = validate(cfg)
    assert spec.seed == 0 and spec.experiment == "default"
    assert spec.dataset.name == "digits" and spec.dataset.params.batch_size == 64
    assert spec.trainer.epochs == 20 and spec.trainer.steps is None and spec.trainer.eval_every_steps is None
    assert spec.optimizer.kwargs == {"lr": 0.05, "weight_decay": 5e-4, "momentum": 0.9, "nesterov": False}
    assert {cfg[g].name for g in ("model", "optimizer", "scheduler", "loss", "logger")} == {
        "mlp", "sgd", "cosine", "cross_entropy", "wandb"}
    assert "hydra" not in cfg


# ---------------------------------------------------------------------------------------------------------
# building the parts


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def check_model(node, channels: int, size: int, num_classes: int) -> None:
    """Build for inputs (N, channels, size, size); run a forward pass unless it is a big CIFAR model (those are
    run at 3x32x32 in test_models.py and end to end, at a small width, in test_cli.py)."""
    torch.manual_seed(0)
    model = MODELS.validate(node).build(input=ImageInput(channels, size), num_classes=num_classes)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    first_conv = next((m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))))
    assert getattr(first_conv, "in_channels", None) in (channels, None)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.out_features == num_classes
    if node.name in CIFAR_MODELS:
        return
    model.train()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()


def check_optimizer(node, steps: int = 60) -> None:
    """Build on a tiny model and step it with the loop's closure (runner/step.py: subsets, per-sample losses,
    sample indices as the entry declares): the passes a step costs on average are the declared `passes_per_step`
    (exact for deterministic methods, within 5% for data-dependent ones), and the weights move."""
    from runner.optim.bn import FrozenBNStats
    from runner.step import StepClosure

    model = tiny_model()
    choice = OPTIMIZERS.validate(node)
    caps = capabilities(choice)
    optimizer = build_optimizer(choice, model.parameters())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(node.lr)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    passes = 0.0
    for step in range(steps):
        batch = torch.arange(16 * (step % 4), 16 * (step % 4 + 1))
        closure = StepClosure(model, torch.nn.functional.cross_entropy, x[batch], y[batch],
                              autocast=torch.autocast("cpu", enabled=False), frozen_bn=FrozenBNStats(model),
                              params=params, zero_grad=lambda: optimizer.zero_grad(set_to_none=True),
                              indices=batch if caps.sample_indices else None, per_sample=caps.per_sample_loss)
        optimizer.step(closure)
        passes += closure.passes
        assert closure.passes >= 1 or step > 0  # the first step sees the batch at least once
    assert caps.passes_per_step >= 1
    assert passes / steps == pytest.approx(caps.passes_per_step, rel=0.05)  # the declaration is what a step costs
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "stepping did not change the weights"


def check_scheduler(node, optimizer_node, epochs: int, steps_per_epoch: int = 5) -> None:
    peak = optimizer_node.lr
    optimizer = torch.optim.SGD(tiny_model().parameters(), lr=peak)  # a schedule only scales param_groups' lr
    scheduler = build_scheduler(SCHEDULERS.validate(node), optimizer, epochs * steps_per_epoch, steps_per_epoch)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(epochs * steps_per_epoch):
        optimizer.step()  # no gradients: a no-op, keeps torch from warning about the call order
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert all(0 <= lr <= peak * (1 + 1e-9) for lr in lrs), lrs[:10]
    assert max(lrs) == pytest.approx(peak, rel=0.25)  # reaches about its peak (warmup 0 in every preset)


def check_loss(node) -> None:
    loss_fn = LOSSES.validate(node).build(num_classes=10)
    logits, y = torch.randn(8, 10, requires_grad=True), torch.randint(0, 10, (8,))
    loss = loss_fn(logits, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    per_sample = loss_fn(logits, y, reduction="none")  # the loss contract: per-sample values on request
    assert per_sample.shape == (8,) and torch.allclose(per_sample.mean(), loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def check_dataset(node, tmp_path, monkeypatch) -> None:
    """Load it (fake files in the real formats for the file-based ones) and run the default model on a batch."""
    params = OmegaConf.to_container(node, resolve=True)
    name = params["name"]
    if "root" in params:
        params["root"] = str(tmp_path)
    if name == "synthetic":
        params["synthetic_size"] = 40
    elif name in ("cifar10", "cifar100"):
        writer, cls = ((write_fake_cifar10, torchvision.datasets.CIFAR10) if name == "cifar10"
                       else (write_fake_cifar100, torchvision.datasets.CIFAR100))
        patch_cifar_md5(monkeypatch, cls, writer(tmp_path, n_train=12, n_test=4).md5)
    elif name in ("mnist", "fashion_mnist"):
        write_fake_mnist(tmp_path, n_train=12, n_test=4, name={"mnist": "MNIST"}.get(name, "FashionMNIST"))
    elif name in ("imagefolder", "imagenet"):
        write_image_folder(tmp_path, classes=3, train_per_class=2, val_per_class=1)
        params["workers"] = 0
    elif name == "tiny_imagenet":
        write_tiny_imagenet(tmp_path, classes=3, train_per_class=2, val_per_class=1)
        params["workers"] = 0
    task = TASKS.validate(params).build(seed=0, device=torch.device("cpu"))
    if name in FEATURES:
        shape, num_classes = (FEATURES[name][0],), FEATURES[name][1]
    elif name in TOKENS:
        shape, num_classes = (TOKENS[name][0],), TOKENS[name][1]
    else:
        channels, size, num_classes = SHAPES[name]
        shape = (channels, size, size)
    assert (task.input.shape, task.num_classes) == (shape, num_classes)
    x, y, _ = next(iter(task.train))
    assert x.shape[1:] == shape and y.dtype == torch.int64
    assert x.dtype == (torch.int64 if task.input.kind == "tokens" else torch.float32)
    assert set(task.evals) >= {"test"}
    model = MODELS.validate({"name": "mlp", "hidden": [16]}).build(input=task.input, num_classes=num_classes)
    assert model(x).shape == (len(y), num_classes)


# ---------------------------------------------------------------------------------------------------------
# every option of every group, one at a time on top of the default


@pytest.mark.parametrize("group, option", ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_group_option_composes_validates_and_builds(compose, tmp_path, monkeypatch, group, option):
    try:
        needs_other = ["analysis.other=runs/the-other-run"] if (group, option) == ("analysis", "interpolate") else []
        cfg = compose([group_override(group, option), *needs_other])
    except MissingConfigException as e:
        if group in RUN_GROUPS or "hydra/" not in str(e):
            raise
        pytest.skip(f"{group}={option} needs a Hydra plugin that is not installed: {str(e).splitlines()[0]}")
    spec = validate(cfg)
    assert spec.resolved == OmegaConf.to_container(cfg, resolve=True)
    if group == "analysis":  # several at once are a list; each one's settings under its own name
        assert spec.analysis.names == [option] and option in cfg.analysis
        return
    if group not in RUN_GROUPS:
        return  # e.g. launcher, sweep: only Hydra settings; the job's config must still validate
    node = cfg[group]
    if group == "model":
        channels, size, num_classes = SHAPES["cifar10" if node.name in CIFAR_MODELS else "digits"]
        check_model(node, channels, size, num_classes)
    elif group == "optimizer":
        check_optimizer(node)
        check_scheduler(cfg.scheduler, node, spec.trainer.epochs)
    elif group == "scheduler":
        check_scheduler(node, cfg.optimizer, spec.trainer.epochs)
    elif group == "loss":
        check_loss(node)
    elif group == "dataset":
        assert spec.dataset.name == node.name
        check_dataset(node, tmp_path, monkeypatch)
    elif group == "trainer":
        assert spec.trainer == TrainerConfig(**OmegaConf.to_container(node, resolve=True))
    elif group == "logger":
        if node.name == "none":
            logger = LOGGERS.validate(node).build(run_dir=tmp_path, config=spec.resolved, name="t", group="g",
                                                  job_type="j", run_id="r")
            logger.log({"train/loss": 1.0}, step=1)
            logger.finish({"status": "completed"})


def test_every_registered_name_has_a_yaml():
    """Each registry's names are reachable from conf/ (a model may be reached through several files)."""
    for group, registry in registries().items():
        names = {OmegaConf.load(CONF_DIR / group / f"{o}.yaml").name for o in options(group)}
        assert names == set(registry.names()), group


# ---------------------------------------------------------------------------------------------------------
# experiments


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_validates_and_builds(compose, name):
    cfg = compose([f"+experiment={name}"])
    spec = validate(cfg)
    assert spec.experiment == name
    if spec.dataset.name in SHAPES:
        channels, size, num_classes = SHAPES[spec.dataset.name]
        check_model(cfg.model, channels, size, num_classes)
    else:  # feature and token tasks (grokking): the model on the task's own input
        task = spec.dataset.build(seed=0, device=torch.device("cpu"))
        model = spec.model.build(input=task.input, num_classes=task.num_classes)
        x, y, _ = next(iter(task.evals["test"]))
        assert model(x).shape == (len(y), task.num_classes)
    check_optimizer(cfg.optimizer)
    epochs = spec.trainer.epochs or 1  # a preset on the step clock (trainer.steps) has no epochs
    check_scheduler(cfg.scheduler, cfg.optimizer, epochs, steps_per_epoch=2)
    check_loss(cfg.loss)
    # overrides on top of a preset still apply (the command line comes last)
    small = compose([f"+experiment={name}", "trainer.epochs=1", "model.width=8"] if "width" in cfg.model
                    else [f"+experiment={name}", "trainer.epochs=1"])
    assert validate(small).trainer.epochs == 1


def test_sam_and_sgd_cifar_differ_only_in_the_optimizer(compose):
    sam = OmegaConf.to_container(compose(["+experiment=sam_cifar"]), resolve=True)
    sgd = OmegaConf.to_container(compose(["+experiment=sgd_cifar"]), resolve=True)
    assert (sam["experiment"], sgd["experiment"]) == ("sam_cifar", "sgd_cifar")
    assert (sam["optimizer"]["name"], sgd["optimizer"]["name"]) == ("sam", "sgd")
    rest = lambda c: {k: v for k, v in c.items() if k not in ("optimizer", "experiment")}
    assert rest(sam) == rest(sgd)
    # the hyperparameters they share are equal, and SAM's base optimizer is SGD
    assert sam["optimizer"]["base"] == "sgd"
    assert validate(compose(["+experiment=sam_cifar"])).optimizer.params.base.kwargs == {
        "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9, "nesterov": False}  # handed to the base, validated
    shared = set(sam["optimizer"]) & set(sgd["optimizer"]) - {"name"}
    assert shared >= {"lr", "momentum", "weight_decay", "nesterov"}
    assert {k: sam["optimizer"][k] for k in shared} == {k: sgd["optimizer"][k] for k in shared}
    # both are the published setting: ResNet-18 on CIFAR-10, 200 epochs, batch 128, lr 0.1 cosine
    assert (sgd["model"]["name"], sgd["dataset"]["name"], sgd["trainer"]["epochs"]) == ("resnet18", "cifar10", 200)
    assert (sgd["dataset"]["batch_size"], sgd["optimizer"]["lr"], sgd["scheduler"]["name"]) == (128, 0.1, "cosine")
    assert signature(sam) != signature(sgd)
    diff = {k for k, v in flatten(sam).items() if flatten(sgd).get(k, object()) != v}
    assert diff <= {"experiment"} | {f"optimizer.{k}" for k in sam["optimizer"]}


# ---------------------------------------------------------------------------------------------------------
# Hydra's side


def test_hydra_job_name_is_runner(compose):
    cfg = compose(return_hydra_config=True)
    assert cfg.hydra.job.name == "runner"
    assert cfg.hydra.job.chdir is False


def test_cfg_job_prints_the_config_and_exits_0(tmp_path):
    out = python_m("runner", ["--cfg", "job", "optimizer=sam", "trainer.epochs=3"], cwd=tmp_path,
                   env=cli_env(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.optimizer.name == "sam" and printed.trainer.epochs == 3 and printed.dataset.name == "digits"
    assert "hydra" not in printed
    assert not (tmp_path / "outputs").exists()  # printing the config starts no run


def test_cfg_hydra_shows_job_name_runner(tmp_path):
    out = subprocess.run([sys.executable, "-m", "runner", "--cfg", "hydra"], cwd=tmp_path, env=cli_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = OmegaConf.create(out.stdout)
    assert printed.hydra.job.name == "runner"


@pytest.mark.parametrize("overrides, added", [
    (["+experiment=sam_cifar"], ["optimizer.weight_decay_in_loss", "optimizer.skip_nonfinite", "optimizer.m",
                                 "dataset.imbalance_ratio", "analysis"]),
    ([], ["dataset.imbalance_ratio", "model.bias", "model.embedding", "trainer.dtype", "loss.dtype", "analysis"]),
])
def test_keys_added_later_keep_the_signature_of_runs_from_before(compose, overrides, added):
    """A config as it was before these keys existed has the signature a config with them at their defaults has:
    reruns of old commands find their run folders (runner.spec.ADDED_KEYS, NON_IDENTITY_KEYS)."""
    import copy

    from runner.signature import _remove

    now = validate(compose(overrides)).resolved
    before = copy.deepcopy(now)
    for key in added:
        if key == "analysis":
            before.pop("analysis", None)
        else:
            _remove(before, key)
    assert before != now
    assert signature(before) == signature(now)
