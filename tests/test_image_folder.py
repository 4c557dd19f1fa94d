"""Streamed image folders (tasks/image_folder.py, runner/stream.py), on tiny folders of JPEGs the tests write:
the layouts (ImageFolder, Tiny-ImageNet as it ships) and their classes; bad data in one line (before any work for
the layout, a `failed` record naming the file for one that cannot be decoded); batches that are a function of
(seed, epoch, position) whatever the number of workers; a run resumed from a mid-epoch checkpoint ends bitwise where
the uninterrupted run ends (streamed and device-resident data); 2 processes, each reading its part of every batch,
train what one process trains."""
from __future__ import annotations

import io
import json

import pytest
import torch

from conftest import CONF_DIR, runner_process
from fake_data import write_image_folder, write_tiny_imagenet
from tiny import Collect

BASE = ["trainer.progress=false", "logger=none", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {"folder": root / "folder", "tiny": root / "tiny",
            "classes": write_image_folder(root / "folder", classes=3, train_per_class=8, val_per_class=3),
            "wnids": write_tiny_imagenet(root / "tiny", classes=3, train_per_class=6, val_per_class=2)}


def folder_run(root, *extra, batch_size: int = 7, model: tuple = ("model=cnn", "model.width=4")) -> list[str]:
    """A tiny CNN on 16-pixel crops of the folder: 24 images, by default in batches of 7 (4 steps: 7, 7, 7, 3)."""
    return ["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=16", f"dataset.batch_size={batch_size}",
            "dataset.workers=0", *model, *extra]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=[*BASE, *overrides])


def experiment_of(overrides: list[str]):
    from runner.experiment import build
    from runner.spec import validate

    return build(validate(compose(overrides)), torch.device("cpu"))


class StopAfterCheckpoint(Collect):
    """A sink that keeps each checkpoint as the run directory would (serialized) and stops the run, as a kill
    would, right after the checkpoint at step `stop`."""

    class Stopped(Exception):
        pass

    def __init__(self, experiment, progress, stop: int | None = None):
        super().__init__()
        self.experiment, self.progress, self.stop, self.saved, self.checkpoints = experiment, progress, stop, None, []

    def checkpoint(self):
        self.checkpoints.append(self.progress.step)
        buffer = io.BytesIO()
        torch.save(self.experiment.state_dict(self.progress), buffer)
        self.saved = buffer.getvalue()
        if self.progress.step == self.stop:
            raise self.Stopped


def train_from(overrides: list[str], state: bytes | None = None, stop: int | None = None):
    """(experiment, sink) after training from scratch, or from a serialized checkpoint; `stop`: stop after the
    checkpoint at that step."""
    from runner.train import Progress, train

    experiment = experiment_of(overrides)
    progress = Progress()
    if state is not None:
        progress = experiment.load_state_dict(torch.load(io.BytesIO(state), weights_only=True), "memory")
    sink = StopAfterCheckpoint(experiment, progress, stop)
    try:
        train(experiment, progress, sink)
    except StopAfterCheckpoint.Stopped:
        pass
    return experiment, sink


def weights(experiment) -> dict:
    return {k: v.clone() for k, v in experiment.model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------- layouts

def test_the_layouts_give_sorted_classes_and_the_labels_of_their_folders_and_annotations(folders):
    from tasks.image_folder import scan

    train, val = scan("imagefolder", str(folders["folder"]))
    assert train.classes == tuple(folders["classes"]) == val.classes
    assert len(train.files) == 24 and len(val.files) == 9
    assert all(f"/train/{train.classes[t]}/" in f for f, t in zip(train.files, train.targets))
    train, val = scan("tiny_imagenet", str(folders["tiny"]))
    assert train.classes == tuple(sorted(folders["wnids"]))
    assert all(f"/train/{train.classes[t]}/images/" in f for f, t in zip(train.files, train.targets))
    annotated = dict(line.split("\t")[:2] for line in (folders["tiny"] / "val" / "val_annotations.txt").read_text()
                     .splitlines())
    assert len(val.files) == 6
    assert [val.classes[t] for t in val.targets] == [annotated[f.rsplit("/", 1)[1]] for f in val.files]


def test_a_tiny_imagenet_task_builds_64_pixel_batches_and_records_its_classes(folders):
    experiment = experiment_of(["dataset=tiny_imagenet", f"dataset.root={folders['tiny']}", "dataset.workers=0",
                                "dataset.batch_size=5", "model=cnn", "model.width=4"])
    task = experiment.task
    batch = next(iter(task.train))
    assert batch.x.shape == (5, 3, 64, 64) and batch.x.dtype == torch.float32
    assert task.num_classes == 3 and task.info["classes"] == sorted(folders["wnids"])
    assert task.evals["test"].num_samples == 6 and len(task.train) == 4  # 18 images: 5, 5, 5, 3


@pytest.mark.parametrize("damage, expected", [
    ("no-val", "no folder {root}/val"),
    ("empty-class", "class folder {root}/train/class_1 holds no image"),
    ("text-file", "{root}/train/class_2/notes.txt is not an image file"),
    ("unknown-val-class", "{root}/val/extra: class 'extra' is not a class of the training split"),
    ("no-root", "no folder {root}"),
])
def test_a_bad_layout_is_one_line_before_any_work(folders, tmp_path, damage, expected):
    import shutil

    from runner.config import ConfigError
    from tasks.image_folder import check_layout

    root = tmp_path / "data"
    shutil.copytree(folders["folder"], root)
    if damage == "no-val":
        shutil.rmtree(root / "val")
    elif damage == "empty-class":
        for image in (root / "train" / "class_1").iterdir():
            image.unlink()
    elif damage == "text-file":
        (root / "train" / "class_2" / "notes.txt").write_text("hello")
    elif damage == "unknown-val-class":
        shutil.copytree(root / "val" / "class_0", root / "val" / "extra")
    elif damage == "no-root":
        shutil.rmtree(root)
    with pytest.raises(ConfigError) as error:
        check_layout("imagefolder", root=str(root))
    assert expected.format(root=root) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["tiny-annotation", "tiny-unannotated"])
def test_a_bad_tiny_imagenet_val_is_one_line(folders, tmp_path, damage):
    import shutil

    from runner.config import ConfigError
    from tasks.image_folder import check_layout

    root = tmp_path / "tiny"
    shutil.copytree(folders["tiny"], root)
    annotations = root / "val" / "val_annotations.txt"
    if damage == "tiny-annotation":
        annotations.write_text(annotations.read_text() + "val_0.JPEG\tn09999999\t0\t0\t1\t1\n")
        expected = f"{annotations}, line 7: expected '<file> <wnid> ...' with a wnid of train/"
    else:
        shutil.copy(root / "val" / "images" / "val_0.JPEG", root / "val" / "images" / "val_99.JPEG")
        expected = f"{root}/val/images/val_99.JPEG has no line in {annotations}"
    with pytest.raises(ConfigError) as error:
        check_layout("tiny_imagenet", root=str(root))
    assert expected in str(error.value)


def test_from_the_cli_a_bad_layout_is_one_line_and_no_run_folder(folders, tmp_path):
    out = runner_process(tmp_path, *BASE, *folder_run(tmp_path / "missing"), f"hydra.run.dir={tmp_path / 'run'}")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and lines == [f"error: dataset 'imagefolder': no folder {tmp_path / 'missing'} "
                                             "(set dataset.root)"], out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_an_undecodable_image_ends_the_run_failed_with_one_line_naming_it(folders, tmp_path, content):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(folders["folder"], root)
    bad = root / "train" / "class_1" / "3.jpg"
    bad.write_bytes(b"not an image" if content == "garbage" else bad.read_bytes()[:400])
    run_dir = tmp_path / "run"
    out = runner_process(tmp_path, *BASE, *folder_run(root, "dataset.workers=2", "trainer.epochs=1"),
                         f"hydra.run.dir={run_dir}")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: failed: DataError: cannot read {bad}: ") and "Traceback" not in out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and str(bad) in summary["error"]


# ------------------------------------------------------------------------------------------- order and resume

def test_the_batches_are_the_same_whatever_the_number_of_workers(folders):
    """Order and augmentation are a function of (seed, epoch, position): 0 and 2 workers train the same weights."""
    overrides = folder_run(folders["folder"], "trainer.epochs=2", "dataset.augment=[crop_flip,randaugment]")
    alone, _ = train_from(overrides)
    with_workers, _ = train_from([*overrides, "dataset.workers=2"])
    assert all(torch.equal(v, weights(with_workers)[k]) for k, v in weights(alone).items())
    train = experiment_of(overrides).task.train
    first = [b.x for b in train.epoch(1)]
    assert all(torch.equal(a, b.x) for a, b in zip(first, train.epoch(1)))  # epoch 1 again: the same batches
    assert not any(torch.equal(a, b.x) for a, b in zip(first, train.epoch(2)))


@pytest.mark.parametrize("source", ["streamed", "device-resident"])
def test_a_run_resumed_from_a_mid_epoch_checkpoint_ends_bitwise_where_the_uninterrupted_run_ends(folders, source):
    """3 epochs of 4 steps, a checkpoint every 3 steps: stopped right after the one at step 6 (epoch 2, batch 2 of
    4), rebuilt from it, resumed: the weights and every record after it are the uninterrupted run's. The
    device-resident case (digits, crop + flip drawing from the data generator) checks the saved permutation."""
    if source == "streamed":
        overrides = folder_run(folders["folder"], "trainer.epochs=3", "dataset.augment=[crop_flip,cutout]",
                               "dataset.workers=2", "trainer.checkpoint_every_steps=3")
    else:
        overrides = ["dataset=digits", "dataset.batch_size=400", "dataset.augment=true", "model=cnn",
                     "model.width=4", "trainer.epochs=3", "trainer.checkpoint_every_steps=3"]
    uninterrupted, whole = train_from(overrides)
    stopped, first_part = train_from(overrides, stop=6)
    assert first_part.checkpoints == [3, 4, 6] and len(first_part.records) == 1  # the record of epoch 1 (step 4)
    state = torch.load(io.BytesIO(first_part.saved), weights_only=True)
    assert state["progress"]["step"] == 6 and state["progress"]["epoch"] == 1
    assert ("data" in state) == (source == "device-resident")  # streamed: the order is a function of the epoch
    resumed, rest = train_from(overrides, state=first_part.saved)
    assert all(torch.equal(v, weights(uninterrupted)[k]) for k, v in weights(resumed).items())
    strip = lambda records: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]  # noqa: E731
    assert strip(rest.records) == strip(whole.records[1:])


# ----------------------------------------------------------------------------------------------- many devices

@pytest.mark.slow
def test_two_processes_each_reading_its_part_of_every_batch_train_what_one_process_trains(folders, tmp_path):
    from runner.cluster import Cluster
    from test_distributed import compare, trained, two_ranks

    overrides = [*folder_run(folders["folder"], "trainer.epochs=2", "dataset.augment=[crop_flip,cutout]",
                             batch_size=10, model=("model=mlp",)),  # no BatchNorm: its statistics are per device
                 "optimizer=sam", "optimizer.perturbation_sync=global"]  # float64: test_distributed's BASE
    got = two_ranks({"streamed": {"ranks": [*overrides, "trainer.devices=2"], "same_data": False}}, tmp_path)
    assert not compare("streamed", got["streamed"], trained(overrides, Cluster()))

    # what each rank reads of the batches of 10, 10, 4: its half only, together every sample once
    sampler = experiment_of(overrides).task.train.sampler
    parts = []
    for rank in (0, 1):
        sampler.cluster = Cluster(world=2, rank=rank)
        parts.append(list(sampler))
    assert [len(keys) for keys in parts[0]] == [len(keys) for keys in parts[1]] == [5, 5, 2]
    assert sorted(p for batch in parts[0] + parts[1] for p, _ in batch) == list(range(24))


# ----------------------------------------------------------------------------------- against device-resident data

def test_streamed_training_equals_the_same_images_held_on_the_device(folders):
    """No augmentation, full batches (the order inside a batch does not change its mean gradient), float64: the
    streamed run and a run on the same images decoded once and held on the device (DeviceBatches, the task's own
    transforms) log the same metrics and end with the same weights."""
    from runner.data import DeviceBatches
    from runner.train import Progress, train

    overrides = [*folder_run(folders["folder"], "trainer.epochs=3", "dataset.augment=false", "trainer.dtype=float64",
                             batch_size=24, model=("model=mlp", "model.hidden=[32]"))]
    streamed, streamed_sink = train_from(overrides)
    resident = experiment_of(overrides)

    def held(batches, shuffle: bool) -> DeviceBatches:
        x = torch.stack([batches.reader.load(int(i), False) for i in batches.ids])  # the evaluation transform
        return DeviceBatches(x, batches.targets, batches.batch_size, shuffle=shuffle,
                             generator=batches.generator, transform=batches.transform,
                             plain_transform=batches.plain_transform)

    task = resident.task
    task.train, task.evals = held(task.train, True), {k: held(v, False) for k, v in task.evals.items()}
    sink = Collect()
    assert train(resident, Progress(), sink) == "completed"
    for got, expected in zip(sink.records, streamed_sink.records, strict=True):
        for key, value in expected.items():
            if not key.startswith("time/"):
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert all(torch.allclose(v, weights(streamed)[k], rtol=0, atol=1e-10) for k, v in weights(resident).items())


# ------------------------------------------------------------------------------------------------- the presets

@pytest.mark.parametrize("preset", ["resnet50_imagenet", "vit_s16_imagenet"])
def test_the_imagenet_presets_take_their_first_steps_on_a_tiny_folder(folders, tmp_path, preset):
    """The preset's settings (timm model, optimizer, schedule, mid-epoch checkpoints), scaled down: 32 px, batches
    of 8, 2 steps."""
    out = runner_process(tmp_path, *BASE, f"+experiment={preset}", f"dataset.root={folders['folder']}",
                         "dataset.image_size=32", "dataset.batch_size=8", "dataset.workers=0", "trainer.steps=2",
                         "trainer.checkpoint_every_steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["classes"] == folders["classes"]
    assert summary["experiment"] == preset and summary["steps"] == 2
    config = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert config["model"]["arch"] == {"resnet50_imagenet": "resnet50",
                                       "vit_s16_imagenet": "vit_small_patch16_224"}[preset]


# ------------------------------------------------------------------------------------------ kill -9 mid-epoch

@pytest.mark.slow
def test_kill_9_mid_epoch_resumes_to_the_uninterrupted_run_and_leaves_no_worker(folders, tmp_path, spawn):
    """12 steps an epoch (24 images in batches of 2), a checkpoint every 5 steps: the run is killed with SIGKILL
    while its 2 workers read; they exit on their own (they watch their parent), and the same command resumes from
    the checkpoint (mid-epoch as a rule: epochs end at multiples of 12) to the uninterrupted run's records and
    weights."""
    import os
    import signal
    import subprocess
    import time

    args = [*BASE, *folder_run(folders["folder"], "trainer.epochs=40", "dataset.workers=2",
                               "trainer.checkpoint_every_steps=5", "trainer.checkpoint_every=0", batch_size=2)]
    twin = runner_process(tmp_path, *args, f"hydra.run.dir={tmp_path / 'twin'}")
    assert twin.returncode == 0, twin.stderr[-2000:]
    victim_dir = tmp_path / "victim"
    victim = spawn("victim", *args, f"hydra.run.dir={victim_dir}")
    metrics = victim_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    assert victim.proc.poll() is None, "the run ended before it could be killed"
    workers = subprocess.run(["pgrep", "-P", str(victim.pid)], capture_output=True, text=True).stdout.split()
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.wait()
    assert workers, "the run had no worker processes"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "a worker outlived its killed run"
    # the newest checkpoint, as the rerun finds it: last.pt, or prev.pt when the kill fell between the two moves of a
    # checkpoint's rotation (a checkpoint every 5 steps: it happens)
    from runner.experiment import latest_checkpoint
    from runner.rundir import RunDir

    step = latest_checkpoint(RunDir(victim_dir, create=False))["progress"]["step"]
    rerun = runner_process(tmp_path, *args, f"hydra.run.dir={victim_dir}")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    read = lambda d: [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}  # noqa: E731
                      for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(victim_dir) == read(tmp_path / "twin"), f"resumed from step {step}"
    resumed = torch.load(victim_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    expected = torch.load(tmp_path / "twin" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, expected[k]) for k, v in resumed.items()), f"resumed from step {step}"
