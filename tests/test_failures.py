"""Every failure path ends in a record, a clear line and the right exit code (the reliability issue): signals,
torn files, failures after validation, sweeps whose jobs land in several folders or are spelled differently."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from tests.conftest import cli_env, runner_process
except ImportError:
    from conftest import cli_env, runner_process

TINY = ("model.hidden=[16]", "trainer.progress=false")


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def ignore_signals() -> None:
    """As a process started with `&` from a non-interactive shell (`nohup python -m runner ... &`, a CI script)
    begins: SIGINT ignored. SIGTERM too, the harder case. The runner must install its own handlers regardless."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def start(tmp_path: Path, *args) -> subprocess.Popen:
    """`python -m runner *args` in the background, as `nohup ... &` starts it (signals inherited as ignored): the
    tests below behave the same however pytest itself was launched."""
    return subprocess.Popen([sys.executable, "-m", "runner", *args, "logger=none"], cwd=tmp_path,
                            env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_signals)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not path.exists():
        time.sleep(0.01)
    assert proc.poll() is None and path.exists(), f"{path} never appeared"


# ------------------------------------------------------------------------------------------------ signals

@pytest.mark.slow
@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_is_recorded_as_interrupted_in_one_line_and_the_rerun_resumes(tmp_path, signum, code, name):
    run = tmp_path / "run"
    proc = start(tmp_path, "trainer.epochs=100", *TINY, f"hydra.run.dir={run}")  # 99 epochs left when signalled
    wait_for(run / "checkpoints" / "last.pt", proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and len(lines(stderr)) == 1 and "interrupted" in stderr, stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == ("SIGTERM" if name == "SIGTERM" else
                                                                       "KeyboardInterrupt")
    rerun = runner_process(tmp_path, "trainer.epochs=100", *TINY, f"hydra.run.dir={run}")
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] >= 1


# ---------------------------------------------------------------------------------------------- torn files

@pytest.mark.slow
def test_a_rerun_repairs_a_torn_metrics_line_a_corrupt_summary_and_stale_temporaries(tmp_path):
    run = tmp_path / "run"
    args = ("trainer.epochs=3", "trainer.deterministic=true", *TINY, f"hydra.run.dir={run}")
    twin = runner_process(tmp_path, "trainer.epochs=3", "trainer.deterministic=true", *TINY,
                          f"hydra.run.dir={tmp_path / 'twin'}")
    assert twin.returncode == 0, twin.stderr
    first = runner_process(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    # as if killed while writing: the final checkpoint not yet renamed, a torn last line, a half-written summary
    (run / "checkpoints" / "last.pt").rename(run / "checkpoints" / f".last.pt.tmp{12345}")
    (run / "checkpoints" / "prev.pt").rename(run / "checkpoints" / "last.pt")  # the epoch-2 checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9999, "epoch": 4, "train/lo')
    (run / "summary.json").write_text('{"status": "comp')
    rerun = runner_process(tmp_path, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert "summary.json" in rerun.stdout + rerun.stderr  # the unreadable file is named
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] == 2
    read = lambda d: [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")}
                      for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(run) == read(tmp_path / "twin")  # torn line gone, nothing twice, identical numbers
    assert not list((run / "checkpoints").glob(".*tmp*"))  # the stale temporary is cleaned up


# ------------------------------------------------------------------------------- failures after validation

def test_a_failure_after_validation_is_recorded(compose, tmp_path, monkeypatch):
    """Anything that breaks while building (here: the model builder) leaves summary.json `failed` with the
    error, the traceback in runner.log, and raises RunFailed (one line and exit 1 from the CLI)."""
    from runner.models import MODELS
    from runner.run import RunFailed, run

    entry = MODELS.get("mlp")

    def broken(**kwargs):
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setitem(MODELS._entries, "mlp", type(entry)(entry.name, broken, entry.schema, entry.description,
                                                            entry.capabilities))
    with pytest.raises(RunFailed, match="OverflowError"):
        run(compose(["logger=none", *TINY]), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "OverflowError" in summary["error"] and summary["signature"]
    assert "Traceback" in (tmp_path / "runner.log").read_text()


@pytest.mark.slow
def test_a_training_failure_is_one_line_exit_1_and_a_record(tmp_path):
    """A run that fails in training (a sitecustomize breaks the optimizer step after two epochs): exit 1, one line
    naming the record, summary.json failed, the traceback in runner.log."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import torch\n"
        "original = torch.optim.SGD.step\n"
        "calls = [0]\n"
        "def step(self, closure=None):\n"
        "    calls[0] += 1\n"
        "    if calls[0] > 50:\n"
        "        raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
        "    return original(self, closure)\n"
        "torch.optim.SGD.step = step\n")
    env = cli_env(tmp_path)
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "runner", "trainer.epochs=5", *TINY, "logger=none",
                          f"hydra.run.dir={run}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    (line,) = lines(out.stderr)
    assert "illegal memory access" in line and str(run / "summary.json") in line
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs"] == 2 and "illegal memory access" in summary["error"]
    assert "Traceback" in (run / "runner.log").read_text()


@pytest.mark.slow
def test_an_sgd_checkpoint_continues_with_sam(tmp_path):
    first = runner_process(tmp_path, "trainer.epochs=1", *TINY, f"hydra.run.dir={tmp_path / 'sgd'}")
    assert first.returncode == 0, first.stderr
    out = runner_process(tmp_path, "optimizer=sam", "trainer.epochs=2", *TINY,
                         f"trainer.resume={tmp_path / 'sgd'}", f"hydra.run.dir={tmp_path / 'sam'}")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "sam" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] == 1 and summary["passes_per_step"] == 2


@pytest.mark.slow
def test_batchnorm_never_sees_a_last_batch_of_one(tmp_path):
    """subset 65 with batch 64: the lone last sample joins the batch before (BatchNorm fails on a batch of one)."""
    out = runner_process(tmp_path, "model=cnn", "model.width=4", "dataset.subset=65", "trainer.epochs=2",
                         "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2  # one batch of 65 per epoch


# --------------------------------------------------------------------------------------- where the run went

@pytest.mark.slow
def test_a_run_ends_with_one_line_and_its_log_holds_the_records(tmp_path):
    out = runner_process(tmp_path, "trainer.epochs=3", *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr
    (line,) = lines(out.stderr)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert line == f"completed: test/acc={summary['final']['test/acc']:.4g} " \
                   f"test/loss={summary['final']['test/loss']:.4g} -> {tmp_path / 'run'}"
    log = (tmp_path / "run" / "runner.log").read_text()
    assert log.count(" step ") == 3 and "test/acc=" in log


# ------------------------------------------------------------------------------------------------- sweeps

@pytest.mark.slow
def test_the_tally_counts_jobs_in_every_sweep_folder(tmp_path):
    """`+experiment=sam_cifar,sgd_cifar` lands in multirun/sam_cifar and multirun/sgd_cifar: both are counted; with
    corrupt CIFAR files (present, so the up-front check passes) both jobs fail and the command exits 1."""
    root = tmp_path / "cifar" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    (root / "data_batch_1").write_bytes(b"not a pickle")
    out = runner_process(tmp_path, "-m", "+experiment=sam_cifar,sgd_cifar", "trainer.epochs=1",
                         f"dataset.root={tmp_path / 'cifar'}")
    assert out.returncode == 1, out.stderr[-3000:]
    tally = lines(out.stderr)[-1]
    assert tally.startswith("sweep: 2 failed;") and "sam_cifar" in tally and "sgd_cifar" in tally, tally
    ok = runner_process(tmp_path, "-m", "+experiment=sam_cifar,sgd_cifar", "dataset=digits", "model=mlp",
                        "model.hidden=[8]", "trainer.epochs=1", "trainer.progress=false")
    assert ok.returncode == 0 and lines(ok.stderr)[-1] == "sweep: 2 completed", ok.stderr[-3000:]


@pytest.mark.slow
def test_one_config_one_folder_however_it_is_spelled(tmp_path):
    first = runner_process(tmp_path, "-m", "optimizer=sam", "seed=0,1", "trainer.epochs=1", *TINY)
    assert first.returncode == 0 and lines(first.stderr)[-1] == "sweep: 2 completed", first.stderr[-2000:]
    again = runner_process(tmp_path, "-m", "optimizer=sam", "optimizer.rho=0.05", "seed=0,1", "trainer.epochs=1",
                           *TINY)
    assert again.returncode == 0 and lines(again.stderr)[-1] == "sweep: 2 skipped", again.stderr[-2000:]
    sweep = tmp_path / "multirun" / "default"
    folders = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    real = [p for p in folders if not p.is_symlink()]
    assert len(real) == 1 and sorted(p.name for p in folders if p.is_symlink()) == sorted([  # the readable names
        f"model.hidden=_16_,optimizer=sam,trainer.epochs=1-{real[0].name}",
        f"model.hidden=_16_,optimizer.rho=0.05,optimizer=sam,trainer.epochs=1-{real[0].name}"])
    from runner.report import drop_duplicates, find_runs

    runs = find_runs([sweep])
    assert len(runs) == 2 and len(drop_duplicates(runs)[0]) == 2


@pytest.mark.slow
def test_a_folder_named_the_old_way_is_found_again(tmp_path):
    """Sweeps made before folders were named by the signature alone (`<overrides>-<signature>`) are reused."""
    first = runner_process(tmp_path, "-m", "seed=0", "trainer.epochs=1", *TINY)
    assert first.returncode == 0, first.stderr[-2000:]
    sweep = tmp_path / "multirun" / "default"
    (real,) = [p for p in sweep.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
    for link in [p for p in sweep.iterdir() if p.is_symlink()]:
        link.unlink()
    legacy = real.rename(sweep / f"model.hidden=_16_,trainer.epochs=1-{real.name}")
    again = runner_process(tmp_path, "-m", "seed=0", "trainer.epochs=1", *TINY)
    assert again.returncode == 0 and lines(again.stderr)[-1] == "sweep: 1 skipped", again.stderr[-2000:]
    assert not (sweep / real.name).exists() and (legacy / "seed=0" / "summary.json").exists()
