"""README claims about the trainer, checked through the real CLI (`python -m runner ...` in a subprocess) and the
files a run writes (metrics.jsonl, summary.json, checkpoints/*.pt, wandb's offline folders). No runner module is
imported: the numbers are recomputed independently with torch / numpy / scikit-learn.

1. `trainer.grad_clip` clips the global gradient norm (a tiny clip freezes training; a huge one changes nothing).
2. `trainer.eval_every=N` evaluates on epochs divisible by N and on the last one; `final` is the last epoch's.
3. `trainer.precision=bf16` on the CPU: autocast is really applied (also in evaluation), the run completes.
4. `trainer.compile=true` on the CPU: completes, close to the eager twin.
5. `trainer.resume=<run_dir>` into a new folder: continues from the checkpoint, the schedule rebuilt for the new
   `trainer.epochs`, the optimizer's hyperparameters taken from the checkpoint, the source folder untouched.
6. Reported losses are plain cross-entropy under label smoothing (recomputed from last.pt on the digits test split).
7. A run killed with SIGKILL and rerun keeps its wandb run id.
8. A second process on a folder that another one is training exits non-zero with one line, touching nothing.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

try:
    from tests.conftest import TIMEOUT, Job, runner_process
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from conftest import TIMEOUT, Job, runner_process
TINY = ("model.hidden=[16]", "trainer.progress=false")  # 64 -> 16 -> 10 MLP on digits
STEPS_PER_EPOCH = math.ceil(1437 / 64)  # digits: 1437 training images, batch 64
SGD_LR, SGD_MOMENTUM = 0.05, 0.9  # conf/optimizer/sgd.yaml


# ------------------------------------------------------------------------------------------------- helpers

def ok(result: subprocess.CompletedProcess, what: str = "runner") -> None:
    if result.returncode != 0:
        raise AssertionError(f"{what} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
                             f"--- stderr\n{result.stderr[-3000:]}")


def run_all(tmp_path: Path, jobs: dict[str, tuple], env: dict | None = None) -> dict[str, Path]:
    """Run `python -m runner *args` for each job at once (import time overlaps); job name -> its run dir."""
    def one(item):
        name, args = item
        run_dir = tmp_path / name
        return name, run_dir, runner_process(tmp_path, *args, f"hydra.run.dir={run_dir}", timeout=TIMEOUT, env=env)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(one, jobs.items()))
    for name, _, result in results:
        ok(result, name)
    return {name: run_dir for name, run_dir, _ in results}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def checkpoint(run_dir: Path, name: str = "last.pt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def weights(run_dir: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return checkpoint(run_dir, name)["model"]


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def completed(run_dir: Path, epochs: int) -> tuple[dict, list[dict]]:
    s, m = summary(run_dir), metrics(run_dir)
    assert s["status"] == "completed" and s["error"] is None, s
    assert s["epochs"] == epochs and [r["epoch"] for r in m] == list(range(1, epochs + 1))
    for record in m:
        assert all(finite(v) for k, v in record.items() if k.startswith(("train/", "test/"))), record
    return s, m


def global_norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run folder that a second process must not touch (Hydra's .hydra/ and log aside)."""
    files = [run_dir / "summary.json", run_dir / "metrics.jsonl", *sorted((run_dir / "checkpoints").glob("*"))]
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in files if f.is_file()}


def wait_for(condition, job: Job, what: str, timeout: float = TIMEOUT, poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.proc.poll() is None, f"the run ended before {what}:\n{job.stderr[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


# -------------------------------------------------------------- independent model and data (no runner code)

def digits_test_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits test split as the runner documents it, normalized per batch with the train pixels' mean/std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.as_tensor(digits.images * 255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(list(range(len(y))), test_size=0.2, random_state=0,
                                           stratify=digits.target)
    assert (len(idx_train), len(idx_test)) == (1437, 360)
    pixels = x[idx_train].double() / 255.0
    mean = torch.tensor([pixels.mean().item()]).view(1, -1, 1, 1) * 255  # float32, as a device tensor would be
    std = torch.tensor([pixels.std(unbiased=False).item()]).view(1, -1, 1, 1) * 255
    return (x[idx_test].float() - mean) / std, y[idx_test]


def mlp_from(state: dict[str, torch.Tensor]) -> nn.Module:
    """flatten -> Linear(64, 16) -> ReLU -> Linear(16, 10), loaded with the checkpoint's weights."""
    assert set(state) == {"1.weight", "1.bias", "3.weight", "3.bias"}, sorted(state)
    assert tuple(state["1.weight"].shape) == (16, 64) and tuple(state["3.weight"].shape) == (10, 16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    model.load_state_dict(state)
    return model.eval()


def cosine_lr(step: int, total: int, lr: float = SGD_LR) -> float:
    """conf/scheduler/cosine.yaml (no warmup, min_lr_ratio 0): the lr after `step` scheduler steps."""
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))


# ------------------------------------------------------------------------------------------ 1. grad_clip

CLIP = 1e-4


@pytest.mark.slow
def test_grad_clip_clips_the_global_gradient_norm(tmp_path):
    common = (*TINY, "trainer.epochs=2", "trainer.deterministic=true", "optimizer.weight_decay=0")
    dirs = run_all(tmp_path, {"free": common, "tiny_clip": (*common, f"trainer.grad_clip={CLIP}"),
                              "huge_clip": (*common, "trainer.grad_clip=1e9")})
    runs = {name: completed(d, 2) for name, d in dirs.items()}

    # a clip that never binds changes nothing, bit for bit
    assert untimed(runs["huge_clip"][1]) == untimed(runs["free"][1])
    free_w, huge_w = weights(dirs["free"]), weights(dirs["huge_clip"])
    assert free_w.keys() == huge_w.keys()
    assert all(torch.equal(free_w[k], huge_w[k]) for k in free_w)

    # a clip of 1e-4 freezes training: the loss stays at chance (ln 10 = 2.30) while the free twin learns
    clipped, free = runs["tiny_clip"][1], runs["free"][1]
    assert clipped[0]["train/loss"] > 2.0 and clipped[1]["train/loss"] > 2.0, clipped
    assert abs(clipped[1]["train/loss"] - clipped[0]["train/loss"]) < 0.01, clipped
    assert abs(clipped[1]["test/loss"] - clipped[0]["test/loss"]) < 0.01, clipped
    assert free[1]["train/loss"] < 1.5 and free[1]["train/loss"] < clipped[1]["train/loss"] - 0.5, free

    # epoch 2 in weights: SGD with momentum m and |g| <= c moves w by at most sum_t lr_t * c / (1 - m)
    bound = sum(cosine_lr(t, 2 * STEPS_PER_EPOCH) for t in range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
    bound *= CLIP / (1 - SGD_MOMENTUM)
    moved = global_norm(weights(dirs["tiny_clip"], "last.pt"), weights(dirs["tiny_clip"], "prev.pt"))
    assert checkpoint(dirs["tiny_clip"], "prev.pt")["progress"]["epoch"] == 1
    # 1.2: slack for float32 rounding; clipping each parameter tensor to CLIP separately (4 tensors, up to 2x the
    # global norm) moves it ~1.5x the bound here, the global clip ~0.8x
    assert moved <= 1.2 * bound, (moved, bound)
    free_moved = global_norm(weights(dirs["free"], "last.pt"), weights(dirs["free"], "prev.pt"))
    assert free_moved > 1000 * bound, (free_moved, bound)


# ----------------------------------------------------------------------------------------- 2. eval_every

@pytest.mark.slow  # ~5 s on 2 cores: one CLI run
def test_eval_every_evaluates_on_multiples_and_the_last_epoch(tmp_path):
    dirs = run_all(tmp_path, {"run": (*TINY, "trainer.epochs=5", "trainer.eval_every=2")})
    s, records = completed(dirs["run"], 5)
    evaluated = [r["epoch"] for r in records if any(k.startswith("test/") for k in r)]
    assert evaluated == [2, 4, 5]
    for r in records:
        assert {"train/loss", "train/acc", "lr", "step"} <= set(r), r
        if r["epoch"] in evaluated:
            assert {"test/loss", "test/acc"} <= set(r), r
    last = records[-1]
    assert s["final"] == {k: last[k] for k in ("train/loss", "train/acc", "test/loss", "test/acc",
                                               "train/balanced_acc", "test/balanced_acc")}
    best = max((r for r in records if r["epoch"] in evaluated), key=lambda r: r["test/acc"])
    assert s["best"]["test/acc"] == best["test/acc"] and s["best"]["epoch"] in evaluated


# --------------------------------------------------------------------------------------- 3. bf16 on CPU

@pytest.mark.slow
def test_bf16_on_cpu_really_autocasts(tmp_path):
    common = (*TINY, "trainer.epochs=2", "trainer.deterministic=true", "trainer.device=cpu")
    dirs = run_all(tmp_path, {"fp32": (*common, "trainer.precision=fp32"),
                              "bf16": (*common, "trainer.precision=bf16")})
    (fp32, fp32_m), (bf16, bf16_m) = completed(dirs["fp32"], 2), completed(dirs["bf16"], 2)
    assert fp32["device"] == bf16["device"] == "cpu"
    assert bf16_m[0]["train/loss"] != fp32_m[0]["train/loss"]  # the same seed and data: only precision differs
    assert weights(dirs["bf16"])["1.weight"].dtype == torch.float32  # autocast: the master weights stay fp32
    assert abs(bf16["final"]["test/acc"] - fp32["final"]["test/acc"]) < 0.1  # still the same training
    assert bf16["final"]["train/loss"] < bf16_m[0]["train/loss"]

    # the evaluation ran under bf16 autocast too: the reported test/loss is that of the bf16 forward pass
    model = mlp_from(weights(dirs["bf16"]))
    x, y = digits_test_split()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_bf16 = model(x)
        logits_fp32 = model(x)
    assert logits_bf16.dtype == torch.bfloat16
    reported = bf16["final"]["test/loss"]
    as_bf16 = F.cross_entropy(logits_bf16.float(), y).item()
    as_fp32 = F.cross_entropy(logits_fp32, y).item()
    assert abs(reported - as_bf16) < abs(reported - as_fp32), (reported, as_bf16, as_fp32)
    assert abs(reported - as_bf16) < 1e-3, (reported, as_bf16)


# ----------------------------------------------------------------------------------- 4. compile on CPU

@pytest.mark.slow
def test_compile_on_cpu_completes_close_to_eager(tmp_path):
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("torch.compile on the CPU needs a C compiler (no gcc/cc on PATH)")
    common = (*TINY, "trainer.epochs=2", "trainer.device=cpu")
    # a cold compile cache, as on a fresh machine: inductor then starts a pool of compile workers, whose shutdown
    # at exit once hung the command after it had completed (runner.signals.exit_now joined the pool's thread
    # before shutting the pool down)
    dirs = run_all(tmp_path, {"eager": common, "compiled": (*common, "trainer.compile=true")},
                   env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor_cache")})
    (eager, _), (compiled, _) = completed(dirs["eager"], 2), completed(dirs["compiled"], 2)
    assert abs(compiled["final"]["test/acc"] - eager["final"]["test/acc"]) <= 0.05, (compiled["final"],
                                                                                     eager["final"])
    assert compiled["final"]["test/loss"] == pytest.approx(eager["final"]["test/loss"], rel=0.1)
    assert compiled["final"]["test/acc"] > 0.5
    # the checkpoint holds the plain model's weights (no torch.compile wrapper prefix), so it can be resumed
    assert weights(dirs["compiled"]).keys() == weights(dirs["eager"]).keys()


# ------------------------------------------------------------------------------- 5. resume into a new folder

RESUME_A = (*TINY, "trainer.epochs=2", "trainer.deterministic=true")


@pytest.fixture(scope="module")
def resume_source(tmp_path_factory):
    """Run A: 2 deterministic epochs, run once and never changed; (tmp dir, run dir, snapshot of its files)."""
    root = tmp_path_factory.mktemp("resume_source")
    dirs = run_all(root, {"A": RESUME_A})
    completed(dirs["A"], 2)
    return root, dirs["A"], snapshot(dirs["A"])


@pytest.mark.slow
def test_resume_into_a_new_folder_continues_from_the_checkpoint(resume_source, tmp_path):
    _, a_dir, a_files = resume_source
    a_records = metrics(a_dir)
    dirs = run_all(tmp_path, {"B": (*TINY, "trainer.deterministic=true", "trainer.epochs=4",
                                    f"trainer.resume={a_dir}")})
    b_dir = dirs["B"]
    assert snapshot(a_dir) == a_files  # the source folder is untouched
    assert not (a_dir / "wandb").exists()

    b = summary(b_dir)
    assert b["status"] == "completed" and b["resumed_from_epoch"] == 2
    # the log names the checkpoint it continues from, and the folder it writes to
    assert (f"resuming from {a_dir / 'checkpoints' / 'last.pt'} (epoch 2, step {2 * STEPS_PER_EPOCH}) into {b_dir}"
            in (b_dir / "runner.log").read_text())
    assert (b["epochs"], b["steps"]) == (4, 4 * STEPS_PER_EPOCH)
    b_records = metrics(b_dir)
    assert [r["epoch"] for r in b_records] == [3, 4]
    assert [r["step"] for r in b_records] == [3 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH]
    assert b["final"]["test/loss"] == b_records[-1]["test/loss"]

    # the cosine schedule is rebuilt for 4 epochs (A's own schedule had reached lr 0 at its end)
    assert a_records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert b_records[0]["lr"] == pytest.approx(cosine_lr(3 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH), rel=1e-9)
    assert b_records[1]["lr"] == pytest.approx(0.0, abs=1e-12)

    # it continues from A's weights: epoch 3 starts where A's epoch 2 ended, far below a fresh first epoch
    # (A's epoch 1 is a fresh run's epoch 1: same seed, deterministic)
    assert b_records[0]["train/loss"] < 1.1 * a_records[1]["train/loss"], (b_records[0], a_records[1])
    assert b_records[0]["train/loss"] < 0.6 * a_records[0]["train/loss"], (b_records[0], a_records[0])
    assert global_norm(weights(b_dir), weights(a_dir)) > 0  # and then trained (lr > 0 in epoch 3)


@pytest.mark.slow
def test_resume_takes_the_optimizer_hyperparameters_from_the_checkpoint(resume_source, tmp_path):
    """README: 'The optimizer state comes from the checkpoint, including its learning rate and other
    hyperparameters'. A continuation asked with other optimizer.lr / momentum keeps the checkpoint's."""
    _, a_dir, a_files = resume_source
    dirs = run_all(tmp_path, {"C": (*TINY, "trainer.deterministic=true", "trainer.epochs=4",
                                    "optimizer.lr=0.5", "optimizer.momentum=0.5", f"trainer.resume={a_dir}")})
    assert snapshot(a_dir) == a_files
    c = summary(dirs["C"])
    assert c["status"] == "completed" and c["resumed_from_epoch"] == 2
    c_records = metrics(dirs["C"])
    # the peak lr is the checkpoint's 0.05, not the 0.5 on the command line
    assert c_records[0]["lr"] == pytest.approx(cosine_lr(3 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH), rel=1e-9)
    (group,) = checkpoint(dirs["C"])["optimizer"]["param_groups"]
    assert group["momentum"] == SGD_MOMENTUM
    assert group["initial_lr"] == pytest.approx(SGD_LR)


# ------------------------------------------------------------------ 6. reported loss under label smoothing

@pytest.mark.slow  # ~5 s on 2 cores: one CLI run
def test_reported_test_loss_is_plain_cross_entropy_under_label_smoothing(tmp_path):
    dirs = run_all(tmp_path, {"run": (*TINY, "trainer.epochs=2", "loss.label_smoothing=0.5")})
    s, records = completed(dirs["run"], 2)
    reported = s["final"]["test/loss"]
    assert reported == records[-1]["test/loss"]

    model = mlp_from(weights(dirs["run"]))
    x, y = digits_test_split()
    with torch.no_grad():
        logits = model(x)
    plain = F.cross_entropy(logits.double(), y).item()
    smoothed = F.cross_entropy(logits.double(), y, label_smoothing=0.5).item()
    assert abs(plain - reported) < 1e-4, (plain, reported)
    assert abs(smoothed - reported) > 0.1, (smoothed, reported)
    # the split is the runner's own: the accuracy matches to the image
    assert (logits.argmax(1) == y).double().mean().item() == pytest.approx(s["final"]["test/acc"], abs=1e-12)


# --------------------------------------------------------------------- 7. wandb id kept across a SIGKILL

WANDB_ARGS = ("logger=wandb", "trainer.epochs=100", "trainer.progress=false")  # default MLP: ~20 ms an epoch


def offline_ids(run_dir: Path) -> list[str]:
    names = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*") if p.is_dir())
    ids = []
    for name in names:
        match = re.fullmatch(r"offline-run-\d{8}_\d{6}-(.+)", name)
        assert match, name
        ids.append(match.group(1))
    return ids


@pytest.mark.slow
def test_wandb_run_id_is_kept_when_a_killed_run_resumes(tmp_path, spawn):
    run_dir = tmp_path / "run"
    args = (*WANDB_ARGS, f"hydra.run.dir={run_dir}")
    victim = spawn("victim", *args)
    wait_for(lambda: (run_dir / "checkpoints" / "last.pt").exists(), victim, "its first checkpoint")
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    assert len(offline_ids(run_dir)) == 1

    time.sleep(1.1)  # wandb names offline folders to the second: the rerun gets a folder of its own
    rerun = runner_process(tmp_path, *args, timeout=TIMEOUT)
    ok(rerun, "rerun")
    s, _ = completed(run_dir, 100)
    assert s["resumed_from_epoch"] is not None and s["resumed_from_epoch"] > 0
    ids = offline_ids(run_dir)
    assert len(ids) == 2, ids  # one offline run folder per launch
    assert len(set(ids)) == 1, ids  # the same wandb run id


# ------------------------------------------------------------------------------------------ 8. run lock

@pytest.mark.slow
def test_second_process_on_a_running_folder_exits_with_one_line(tmp_path, spawn):
    run_dir = tmp_path / "run"
    args = ("trainer.epochs=100000", "trainer.progress=false", f"hydra.run.dir={run_dir}")
    first = spawn("first", *args)
    wait_for(lambda: (run_dir / "checkpoints" / "last.pt").exists(), first, "its first checkpoint")
    first.proc.send_signal(signal.SIGSTOP)  # holds its lock, writes nothing: its files can be compared exactly
    try:
        before = snapshot(run_dir)
        assert "metrics.jsonl" in before
        second = spawn("second", *args)
        try:  # startup is a few seconds; if it ignored the lock it would train for minutes
            code = second.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the second process did not exit within 120 s: it is training in the locked folder")
        after = snapshot(run_dir)
    finally:
        first.proc.send_signal(signal.SIGCONT)
    assert first.proc.poll() is None, "the first run died"
    assert code != 0, second.stderr[-3000:]
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, second.stderr[-3000:]
    assert "being trained by another process" in lines[0] and str(run_dir) in lines[0], lines[0]
    assert after == before  # no summary.json, no truncated metrics, no new checkpoint
    first.proc.kill()
    first.wait()
