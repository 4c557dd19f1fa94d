"""`python -m runner` for real, in a subprocess, in a tmp dir: the run-directory contract, wandb offline, real
dataset files, sweeps, divergence, and bad input (one line on stderr, non-zero exit, no run left behind).

Run dir contract: `.hydra/`, `metrics.jsonl` (one JSON object per epoch), `summary.json`, `checkpoints/last.pt`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torchvision.datasets

try:
    from tests.conftest import CONF_DIR, runner_process
    from tests.fake_data import patch_cifar_md5, write_fake_cifar10, write_fake_mnist
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from conftest import CONF_DIR, runner_process
    from fake_data import patch_cifar_md5, write_fake_cifar10, write_fake_mnist

METRIC_KEYS = {"step", "epoch", "train/loss", "train/acc", "test/loss", "test/acc", "lr", "time/epoch_s"}
SUMMARY_KEYS = {"status", "final", "best", "seed", "epochs", "steps", "passes", "wall_s", "error", "versions",
                "git", "device"}
DIGITS_TRAIN = 1437  # scikit-learn digits, 80% stratified train split (runner default dataset)


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def finite(value) -> bool:
    """Non-finite floats are written as the strings "nan" / "inf" (JSON has no NaN)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_completed(out: subprocess.CompletedProcess, run_dir: Path, epochs: int, steps_per_epoch: int,
                    passes_per_step: int = 1) -> tuple[dict, list[dict]]:
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    summary, metrics = summary_of(run_dir), metrics_of(run_dir)
    assert summary["status"] == "completed" and summary["error"] is None
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["epochs"] == epochs
    assert summary["steps"] == epochs * steps_per_epoch > 0
    assert summary["passes"] == passes_per_step * summary["steps"]
    assert len(metrics) == epochs
    for epoch, record in enumerate(metrics, start=1):
        assert METRIC_KEYS <= set(record), METRIC_KEYS - set(record)
        assert record["epoch"] == epoch and record["step"] == epoch * steps_per_epoch
        assert all(finite(record[k]) for k in METRIC_KEYS)
    assert summary["final"]["test/acc"] == metrics[-1]["test/acc"]
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    return summary, metrics


# ---------------------------------------------------------------------------------------------------------
# the default command


@pytest.mark.slow
def test_default_command_end_to_end(run_cli, tmp_path):
    start = time.perf_counter()
    out = run_cli("logger=none")
    elapsed = time.perf_counter() - start
    run_dir = tmp_path / "run"
    summary, metrics = check_completed(out, run_dir, epochs=20, steps_per_epoch=math.ceil(DIGITS_TRAIN / 64))
    assert elapsed < 60, f"the default run took {elapsed:.0f} s"
    assert summary["final"]["test/acc"] >= 0.90, summary["final"]
    assert summary["best"]["test/acc"] >= summary["final"]["test/acc"] and 1 <= summary["best"]["epoch"] <= 20
    assert summary["seed"] == 0 and summary["device"] == "cpu" and summary["wall_s"] > 0
    assert summary["versions"]["torch"] and "rev" in summary["git"]
    assert metrics[-1]["lr"] < metrics[0]["lr"]  # cosine schedule decays
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"]

    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["progress"]["epoch"] == 20 and state["progress"]["step"] == summary["steps"]
    from omegaconf import OmegaConf

    from runner.models import MODELS
    from tasks import ImageInput

    model = MODELS.validate(OmegaConf.load(CONF_DIR / "model" / "mlp.yaml")).build(input=ImageInput(1, 8),
                                                                                   num_classes=10)
    model.load_state_dict(state["model"])  # the checkpoint is the default model's weights
    assert not list(tmp_path.glob("outputs")), "hydra.run.dir was given: nothing goes to ./outputs"


# ---------------------------------------------------------------------------------------------------------
# wandb

FAKE_KEY = "deadbeef" * 5  # 40 characters, like a real API key


def files_under(root: Path):
    for dirpath, _, filenames in os.walk(root):  # does not follow symlinked folders
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


@pytest.mark.slow
def test_wandb_offline_run_and_no_key_on_disk(run_cli, tmp_path):
    out = run_cli("logger=wandb", "trainer.epochs=2", env={"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY})
    run_dir = tmp_path / "run"
    check_completed(out, run_dir, epochs=2, steps_per_epoch=math.ceil(DIGITS_TRAIN / 64))
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].is_dir(), list((run_dir / "wandb").iterdir())
    assert list(offline[0].glob("*.wandb")), "no offline run data to `wandb sync`"
    files = list(files_under(tmp_path))  # the run dir and wandb's own dirs (WANDB_DIR etc. are in tmp_path)
    assert len(files) > 5
    leaked = [str(p) for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"
    assert FAKE_KEY not in out.stdout + out.stderr


@pytest.mark.slow
def test_wandb_disabled(run_cli, tmp_path):
    out = run_cli("logger=wandb", "logger.mode=disabled", "trainer.epochs=1")
    run_dir = tmp_path / "run"
    check_completed(out, run_dir, epochs=1, steps_per_epoch=math.ceil(DIGITS_TRAIN / 64))
    assert not list(run_dir.glob("wandb/offline-run-*")) and not list(run_dir.glob("wandb/run-*"))


# ---------------------------------------------------------------------------------------------------------
# real dataset files (fake contents in the real on-disk formats, read by torchvision's own loaders)

CIFAR_ARGS = ("+experiment=sam_cifar", "trainer.epochs=1", "dataset.subset=64", "dataset.batch_size=32",
              "dataset.eval_batch_size=64", "model.width=8", "logger=none")




def test_sam_cifar_in_process_on_fake_cifar10(compose, tmp_path, monkeypatch, one_thread):
    from runner.run import run

    fake = write_fake_cifar10(tmp_path / "data", n_train=80, n_test=16)
    patch_cifar_md5(monkeypatch, torchvision.datasets.CIFAR10, fake.md5)
    cfg = compose([*CIFAR_ARGS, f"dataset.root={tmp_path / 'data'}"])
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["experiment"] == "sam_cifar"
    assert (summary["epochs"], summary["steps"], summary["passes"]) == (1, 2, 4)  # 64 / 32; SAM: 2 passes a step
    assert summary_of(tmp_path / "run")["status"] == "completed"
    (record,) = metrics_of(tmp_path / "run")
    assert METRIC_KEYS <= set(record) and all(finite(record[k]) for k in METRIC_KEYS)


#: `python -c` wrapper: make torchvision's CIFAR10 expect the fake files' md5 sums (from a json file), then run
#: `python -m runner` unchanged; torchvision's real integrity check and unpickling still run in the subprocess.
CIFAR_WRAPPER = """
import json, runpy, sys
import torchvision.datasets
md5 = json.load(open(sys.argv[1]))
cls = torchvision.datasets.CIFAR10
cls.train_list = [[name, md5[name]] for name, _ in cls.train_list]
cls.test_list = [[name, md5[name]] for name, _ in cls.test_list]
cls.meta = {**cls.meta, "md5": md5[cls.meta["filename"]]}
sys.argv = ["runner", *sys.argv[2:]]
runpy.run_module("runner", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_sam_cifar_cli_on_fake_cifar10(run_cli, tmp_path):
    fake = write_fake_cifar10(tmp_path / "data", n_train=80, n_test=16)
    (tmp_path / "md5.json").write_text(json.dumps(fake.md5))
    out = run_cli(*CIFAR_ARGS, f"dataset.root={tmp_path / 'data'}",
                  prefix=[sys.executable, "-c", CIFAR_WRAPPER, str(tmp_path / "md5.json")])
    summary, _ = check_completed(out, tmp_path / "run", epochs=1, steps_per_epoch=2, passes_per_step=2)
    assert summary["experiment"] == "sam_cifar"
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_mnist_cli_on_fake_files_relative_root(run_cli, tmp_path):
    """MNIST idx files under ./data; hydra.job.chdir is false, so `dataset.root=data` is relative to the launch dir."""
    write_fake_mnist(tmp_path / "data", n_train=40, n_test=10)
    out = run_cli("dataset=mnist", "dataset.root=data", "model=cnn", "model.width=8", "trainer.epochs=1",
                  "dataset.batch_size=16")
    summary, _ = check_completed(out, tmp_path / "run", epochs=1, steps_per_epoch=3)  # 40 / 16
    assert summary["final"]["test/acc"] in [i / 10 for i in range(11)]  # 10 test images


# ---------------------------------------------------------------------------------------------------------
# sweeps


@pytest.mark.slow
def test_multirun_over_seeds(run_cli, tmp_path):
    out = run_cli("-m", "seed=0,1", "trainer.epochs=1", "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = sorted((tmp_path / "sweep").rglob("summary.json"))
    assert len(summaries) == 2, summaries
    results = [json.loads(p.read_text()) for p in summaries]
    assert all(r["status"] == "completed" for r in results)
    assert sorted(r["seed"] for r in results) == [0, 1]
    assert len({p.parent for p in summaries}) == 2  # one run dir per job
    for path in summaries:
        assert len(metrics_of(path.parent)) == 1 and (path.parent / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / "run").exists() and not (tmp_path / "multirun").exists()


# ---------------------------------------------------------------------------------------------------------
# divergence: a result, not an error


#: Coupled L2 with lr * weight_decay = 5.3 multiplies the weights of a linear model (no hidden layer) by -4.3
#: each step, whatever the gradients do: the logits grow about 2^48-fold an epoch and overflow float32 in epoch
#: 3 (epoch 2's loss is ~1e27, far from the limit): a divergence that does not depend on chaotic dynamics.
DIVERGING = ("model.hidden=[]", "optimizer.lr=1", "optimizer.momentum=0.0", "optimizer.weight_decay=5.3",
             "scheduler=constant", "trainer.epochs=5")


@pytest.mark.slow
def test_divergence_is_a_result_and_keeps_the_epochs_before(run_cli, tmp_path):
    out = run_cli(*DIVERGING)
    assert out.returncode == 0, out.stderr[-3000:]  # a divergence is a result, not an error
    assert "Traceback" not in out.stderr
    run_dir = tmp_path / "run"
    summary, metrics = summary_of(run_dir), metrics_of(run_dir)
    assert summary["status"] == "diverged", summary
    assert summary["epochs"] == 3 and summary["steps"] == 3 * math.ceil(DIGITS_TRAIN / 64)
    # the epochs before the divergence are kept, complete; the last line has the non-finite loss
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for record in metrics[:2]:
        assert all(finite(record[k]) for k in METRIC_KEYS), record
    assert metrics[-1]["step"] == summary["steps"]
    assert metrics[-1]["train/loss"] in ("nan", "inf", "-inf")
    assert summary["final"]["train/loss"] in ("nan", "inf", "-inf")


# ---------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, nothing that looks like a run


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Run every bad command at once (each in its own tmp dir); they are independent and mostly import time."""
    from hydra import compose, initialize_config_dir

    from runner.run import run

    shared = tmp_path_factory.mktemp("shared")
    (shared / "empty").mkdir()
    (shared / "garbage.pt").write_bytes(b"\x00\xffnot a checkpoint\x80\x02" * 64)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        mlp = compose("config", overrides=["logger=none", "trainer.epochs=1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(mlp, shared / "mlp_run")["status"] == "completed"
    finally:
        torch.set_num_threads(threads)
    mlp_checkpoint = shared / "mlp_run" / "checkpoints" / "last.pt"
    torch.save({"format": 1}, shared / "format_only.pt")  # a runner checkpoint's header and nothing else
    raw = shared / "garbage_mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"")

    cases = {
        "unknown-option": (["optimizer=foo"], ["optimizer", "'foo'", "available: adam, adamw", "sam, sgd"]),
        "unknown-experiment": (["+experiment=nope"], ["experiment", "nope", "sam_cifar", "sgd_cifar"]),
        "negative-lr": (["optimizer.lr=-1"], ["optimizer.lr", "-1"]),
        "negative-rho": (["optimizer=sam", "optimizer.rho=-0.1"], ["optimizer.rho", "-0.1"]),
        "zero-batch": (["dataset.batch_size=0"], ["dataset.batch_size", "0"]),
        "label-noise-above-1": (["dataset.label_noise=1.5"], ["dataset.label_noise", "1.5"]),
        "lr-not-a-number": (["optimizer.lr=abc"], ["optimizer.lr", "abc", "float"]),
        "cuda-missing": (["trainer.device=cuda"], ["trainer.device=cuda", "CUDA"]),
        "cifar-missing": (["dataset=cifar10", f"dataset.root={shared / 'empty'}"],
                          [str(shared / "empty" / "cifar-10-batches-py")]),
        "resume-garbage": ([f"trainer.resume={shared / 'garbage.pt'}"], ["trainer.resume", str(shared / "garbage.pt")]),
        "resume-other-model": (["model=cnn", f"trainer.resume={mlp_checkpoint}"], ["checkpoint", "does not match"]),
        "typo-key": (["+optimizer.rhoo=1"], ["optimizer.rhoo"]),
        "typo-key-sam": (["optimizer=sam", "+optimizer.rhoo=1"], ["optimizer.rhoo", "rho"]),
        "unknown-top-level-key": (["+trainer_epochs=3"], ["trainer_epochs", "top-level keys"]),
        # hydra.run.dir is a folder that already holds the user's files: they must survive the failed start
        "existing-run-dir": (["optimizer.lr=0"], ["optimizer.lr", "0"]),
        # values that used to pass validation and then break the run halfway
        "warmup-inf": (["scheduler.warmup_epochs=inf"], ["scheduler.warmup_epochs", "inf"]),
        "milestones-inf": (["scheduler=multistep", "scheduler.milestones=[inf]"], ["scheduler.milestones"]),
        "seed-2-to-the-32": (["seed=4294967296"], ["seed", "4294967296"]),
        "cuda-negative": (["trainer.device=cuda:-1"], ["trainer.device", "cuda:-1"]),
        "val-size-inf": (["dataset.val_size=inf"], ["dataset.val_size", "inf"]),
        "epochs-1e21": (["trainer.epochs=1000000000000000000000"], ["trainer.epochs"]),
        "steps-1e21": (["trainer.steps=1000000000000000000000"], ["trainer.steps"]),
        "mnist-empty-files": (["dataset=mnist", f"dataset.root={shared / 'garbage_mnist'}"],
                              ["mnist", "corrupted", str(shared / "garbage_mnist")]),
        "checkpoint-format-only": ([f"trainer.resume={shared / 'format_only.pt'}"],
                                   ["trainer.resume", "incomplete", "progress"]),
        "resume-nothing-left": ([f"trainer.resume={mlp_checkpoint}", "trainer.epochs=1"],
                                ["trainer.resume", "nothing left to train", "trainer.epochs"]),
        "wandb-online-without-key": (["logger=wandb"], ["WANDB_API_KEY", "wandb login"]),
        "slurm-not-found": (["-m", "launcher=slurm", "seed=0,1"], ["SLURM was not found", "sbatch"]),
        # sweeps: everything that can be checked up front is, for every job, before any job runs
        "sweep-cifar-missing": (["-m", "+experiment=sam_cifar", "seed=0,1", f"dataset.root={shared / 'empty'}"],
                                [str(shared / "empty" / "cifar-10-batches-py"), "in sweep job"]),
        "sweep-cuda-missing": (["-m", "trainer.device=cuda", "seed=0,1"], ["CUDA", "in sweep job"]),
        "sweep-resume-garbage": (["-m", f"trainer.resume={shared / 'garbage.pt'}", "seed=0,1"],
                                 ["trainer.resume", "in sweep job"]),
        "sweep-resume-other-model": (["-m", "model=cnn", f"trainer.resume={mlp_checkpoint}", "seed=0,1"],
                                     ["does not match", "in sweep job"]),
        # many devices: refused before any process starts
        "devices-zero": (["trainer.devices=0"], ["trainer.devices", "0"]),
        "devices-batch-indivisible": (["trainer.devices=2", "dataset.batch_size=63"],
                                      ["dataset.batch_size=63", "trainer.devices=2", "multiple of 2"]),
        "devices-esam-global": (["trainer.devices=2", "optimizer=esam", "optimizer.perturbation_sync=global"],
                                ["optimizer.perturbation_sync", "esam", "perturbation_sync=local"]),
        "devices-sync-bn-cpu": (["trainer.devices=2", "trainer.sync_bn=true", "trainer.device=cpu"],
                                ["trainer.sync_bn", "CUDA"]),
        "perturbation-sync-typo": (["optimizer=sam", "optimizer.perturbation_sync=globl"],
                                   ["optimizer.perturbation_sync", "globl"]),
        "devices-m-global": (["trainer.devices=2", "optimizer=sam", "optimizer.m=8",
                              "optimizer.perturbation_sync=global"], ["optimizer.m=8", "perturbation_sync=local"]),
        "devices-m-per-sample-loss": (["trainer.devices=2", "optimizer=sam", "optimizer.m=8", "loss=aldr_kl"],
                                      ["optimizer.m=8", "loss=aldr_kl", "optimizer.m=null"]),
    }
    environments = {"wandb-online-without-key": {"WANDB_MODE": "online", "HOME": str(shared / "home"),
                                                 "NETRC": str(shared / "no.netrc")}}
    if torch.cuda.is_available():
        del cases["cuda-missing"], cases["sweep-cuda-missing"]
    if shutil.which("sbatch"):
        del cases["slurm-not-found"]

    def launch(item):
        name, (args, _) = item
        cwd = tmp_path_factory.mktemp(name)
        if name == "existing-run-dir":
            (cwd / "run").mkdir()
            (cwd / "run" / "notes.txt").write_text("keep me")
        return name, cwd, runner_process(cwd, *args, env=environments.get(name), timeout=180)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = {name: (cwd, out) for name, cwd, out in pool.map(launch, cases.items())}
    return {name: (results[name][0], results[name][1], needles) for name, (_, needles) in cases.items()}


BAD = ["unknown-option", "unknown-experiment", "negative-lr", "negative-rho", "zero-batch", "label-noise-above-1",
       "lr-not-a-number", "cuda-missing", "cifar-missing", "resume-garbage", "resume-other-model", "typo-key",
       "typo-key-sam", "unknown-top-level-key", "existing-run-dir", "warmup-inf", "milestones-inf",
       "seed-2-to-the-32", "cuda-negative", "val-size-inf", "epochs-1e21", "steps-1e21", "mnist-empty-files",
       "checkpoint-format-only", "resume-nothing-left", "wandb-online-without-key", "slurm-not-found",
       "sweep-cifar-missing", "sweep-cuda-missing", "sweep-resume-garbage", "sweep-resume-other-model",
       "devices-zero", "devices-batch-indivisible", "devices-esam-global", "devices-sync-bn-cpu",
       "perturbation-sync-typo", "devices-m-global", "devices-m-per-sample-loss"]


def assert_one_line_error(out: subprocess.CompletedProcess, needles) -> str:
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines, "no message on stderr"
    message = lines[-1]
    for needle in needles:
        assert needle in message, f"{needle!r} not in the last stderr line: {message!r}"
    return message


@pytest.mark.slow  # the commands all run in the module fixture: ~40 s together on 2 cores
@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_line_and_leaves_no_run(bad_inputs, name):
    if name not in bad_inputs:
        pytest.skip("CUDA (or SLURM) is available here")
    cwd, out, needles = bad_inputs[name]
    message = assert_one_line_error(out, needles)
    assert len(message) < 1000 and out.returncode == 2
    run_dir = cwd / "run"
    for artifact in ("summary.json", "metrics.jsonl", "checkpoints"):
        assert not (run_dir / artifact).exists(), f"a failed start left {artifact}"
    assert not list(cwd.rglob("summary.json")) and not (cwd / "outputs").exists() and not (cwd / "multirun").exists()


def test_typo_key_without_plus_fails_cleanly(run_cli, tmp_path):
    """`optimizer.rhoo=1` (no +): Hydra refuses it itself and says to use +; nothing runs."""
    out = run_cli("optimizer.rhoo=1")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "optimizer.rhoo" in out.stderr
    assert not (tmp_path / "run" / "summary.json").exists() and not list(tmp_path.rglob("summary.json"))


@pytest.mark.slow
def test_bad_input_keeps_files_already_in_the_run_dir(bad_inputs):
    """A failed start removes only what it created: `hydra.run.dir` may be a folder the user keeps things in."""
    cwd, out, _ = bad_inputs["existing-run-dir"]
    assert out.returncode != 0
    assert (cwd / "run" / "notes.txt").read_text() == "keep me"
