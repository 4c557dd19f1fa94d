"""`model=timm`: any timm architecture by name, sized from the task, checked before any work (runner/models/timm_zoo.py).

Oracle: the model is timm's own `create_model` with the task's classes and channels (same seed, same weights); a
run from the CLI trains it and records it like any other model."""
from __future__ import annotations

import json

import pytest
import torch

from tasks import ImageInput


@pytest.mark.parametrize("arch, kwargs, size, takes_size", [("resnet18", {}, 8, False),
                                                             ("vit_tiny_patch16_224", {"patch_size": 4}, 8, True),
                                                             ("mixer_s16_224", {}, 32, True)])
def test_the_model_is_timms_own_with_the_tasks_classes_channels_and_image_size(compose, arch, kwargs, size,
                                                                               takes_size):
    import timm

    from runner.spec import validate

    overrides = ["model=timm", f"model.arch={arch}"] + [f"+model.kwargs.{k}={v}" for k, v in kwargs.items()]
    spec = validate(compose(overrides))
    torch.manual_seed(0)
    ours = spec.model.build(input=ImageInput(channels=1, size=size), num_classes=7)
    torch.manual_seed(0)
    theirs = timm.create_model(arch, num_classes=7, in_chans=1, **({"img_size": size} if takes_size else {}), **kwargs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ours(torch.randn(3, 1, size, size)).shape == (3, 7)


@pytest.mark.parametrize("overrides, needles", [
    (["model.arch=no_such_net"], ["model.arch", "no_such_net", "timm model name"]),
    (["model.arch=vit_tiny_patch16_224"], ["model.arch=vit_tiny_patch16_224", "1x8x8"]),  # a 16-patch on 8x8 digits
    (["+model.kwargs.bogus=1"], ["model.kwargs", "bogus"]),
])
def test_an_architecture_that_cannot_take_the_task_is_one_config_error_before_any_work(compose, overrides, needles):
    from runner.config import ConfigError
    from runner.spec import validate

    with pytest.raises(ConfigError) as error:
        spec = validate(compose(["model=timm", *overrides]))
        spec.model.build(input=ImageInput(channels=1, size=8), num_classes=10)
    message = str(error.value)
    assert "\n" not in message and all(needle in message for needle in needles), message


def test_a_timm_run_from_the_cli_trains_and_records(run_cli, tmp_path):
    out = run_cli("model=timm", "model.arch=resnet18", "trainer.steps=3", "trainer.epochs=1", "dataset.batch_size=32")
    assert out.returncode == 0 and out.stderr.strip().splitlines()[-1].startswith("completed"), out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final"]["test/acc"] >= 0
    from omegaconf import OmegaConf

    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.model.name == "timm" and saved.model.arch == "resnet18" and saved.model.pretrained is False


@pytest.mark.slow
def test_every_optimizer_runs_on_a_timm_vit_without_batchnorm(tmp_path):
    """The SAM family assumes nothing about BN (their first-pass BN rule has nothing to do on a ViT): one sweep of
    every optimizer of conf/optimizer on a timm ViT with 4x4 patches (digits' 8x8 images: 4 tokens; 2 blocks of width
    48: timm's ViT code, small), 2 steps each."""
    from omegaconf import OmegaConf

    from conftest import CONF_DIR, runner_process

    optimizers = sorted(p.stem for p in (CONF_DIR / "optimizer").glob("*.yaml"))
    out = tmp_path / "sweep"
    result = runner_process(tmp_path, "-m", f"optimizer={','.join(optimizers)}", "model=timm",
                            "model.arch=vit_tiny_patch16_224", "+model.kwargs.patch_size=4", "+model.kwargs.depth=2",
                            "+model.kwargs.embed_dim=48", "+model.kwargs.num_heads=2", "trainer.steps=2",
                            "trainer.epochs=1", "dataset.batch_size=32", "dataset.subset=256",
                            f"hydra.sweep.dir={out}", "trainer.progress=false", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    done = {}
    for path in out.rglob("summary.json"):
        config = OmegaConf.load(path.parent / ".hydra" / "config.yaml")
        summary = json.loads(path.read_text())
        done[config.optimizer.name] = summary
        assert summary["status"] == "completed", (config.optimizer.name, summary["error"])
        assert all(isinstance(v, float) and v == v for k, v in summary["final"].items() if k.endswith("/loss"))
    assert sorted(done) == optimizers
