"""Many devices (runner/cluster.py): N processes train what one process with the global batch trains.

The oracles, in float64 on the CPU (2 processes, gloo), through the real loop (`build` + `train`: sharded batches,
DistributedDataParallel, sharded evaluation, reduced train sums):
- every optimizer of conf/optimizer with `perturbation_sync=global` (plain optimizers: their only pass) equals the
  single-process run with the global batch, every parameter after an epoch of digits in batches of 478 (the last
  batch, 3 samples, splits 2/1: the weighting of uneven parts is checked too);
- SAM with `perturbation_sync=local` equals single-process SAM with m-sharpness m = batch / 2 (Foret et al.'s
  definition of SAM over accelerators);
- every method of the SAM family with `perturbation_sync=local`, when both processes are given the whole batch,
  equals the single-process method on it (the per-device form is the method itself on each device's samples:
  no state, random draw or reduction may differ between the ranks);
- a method with no global form (`per_device`: ESAM's selection, TRAM's input noise) is refused in one line;
- state kept per training sample (SAF's stored outputs, MESA's epoch counters, ALDR-KL's lambdas) is the one
  process's over several epochs, although each sample is on another rank from one epoch to the next;
- the train and test metrics of the 2-process run are the single-process ones.
"""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys

import pytest
import torch

from conftest import CONF_DIR, REPO, cli_env, python_m
from tiny import Collect

OPTIMIZERS = sorted(p.stem for p in (CONF_DIR / "optimizer").glob("*.yaml"))
BASE = ["trainer.dtype=float64", "trainer.progress=false", "logger=none", "trainer.device=cpu"]
EPOCH = ["trainer.epochs=1", "dataset.batch_size=478"]  # 4 steps: 3 x 478 digits, then 3 (split 2/1)
BATCHES = ["trainer.steps=6", "trainer.epochs=1"]  # 6 whole batches of 64: 32 per process


def cases(names: list[str], same_data: bool = True) -> dict[str, dict]:
    """case -> {"ranks": overrides of the 2-process run, "oracle": of its single-process oracle, "same_data": both
    ranks get the whole batch}."""
    two = ["trainer.devices=2"]
    out = {}
    for name in names:
        engine = _is_engine(name)
        sync = ["optimizer.perturbation_sync=global"] if engine else []
        out[f"{name}-global"] = {"ranks": [f"optimizer={name}", *sync, *EPOCH, *two],
                                 "oracle": [f"optimizer={name}", *sync, *EPOCH], "same_data": False}
        if engine and same_data:
            out[f"{name}-local-same-data"] = {"ranks": [f"optimizer={name}", *BATCHES, *two],
                                              "oracle": [f"optimizer={name}", *BATCHES], "same_data": True}
    out["sam-local"] = {"ranks": ["optimizer=sam", "optimizer.perturbation_sync=local", "trainer.steps=20",
                                  "trainer.epochs=1", *two],
                        "oracle": ["optimizer=sam", "optimizer.m=32", "trainer.steps=20", "trainer.epochs=1"],
                        "same_data": False}
    for case in set(STATE) & {f"{n}-state" for n in names}:
        out[case] = {"ranks": [*STATE[case], *two], "oracle": STATE[case], "same_data": False}
    return out


# state kept per training sample, over epochs (each sample is on another rank from one epoch to the next): SAF's
# stored outputs from the start, MESA's epoch counters crossing start_epoch, ALDR-KL's lambdas under SAM's two passes
STATE = {
    "saf-state": ["optimizer=saf", "optimizer.perturbation_sync=global", "optimizer.start_epoch=0",
                  "optimizer.epochs_ago=1", "trainer.epochs=3", "dataset.batch_size=478"],
    "mesa-state": ["optimizer=mesa", "optimizer.perturbation_sync=global", "optimizer.start_epoch=1",
                   "optimizer.decay=0.9", "trainer.epochs=3", "dataset.batch_size=478"],
    "sam-state": ["optimizer=sam", "optimizer.perturbation_sync=global", "loss=aldr_kl", "loss.lam0=0.1",
                  "loss.alpha=1.1", "trainer.epochs=3", "dataset.batch_size=478"],
}


def _is_engine(name: str) -> bool:
    text = (CONF_DIR / "optimizer" / f"{name}.yaml").read_text()
    return "perturbation_sync" in text


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=[*BASE, *overrides])


def trained(overrides: list[str], cluster) -> dict:
    """The weights and the last record of one run of the real loop (no run directory)."""
    from runner.experiment import build
    from runner.spec import validate
    from runner.train import Progress, train

    spec = validate(compose(overrides))
    experiment = build(spec, torch.device("cpu"), cluster)
    sink = Collect()
    status = train(experiment, Progress(), sink)
    return {"status": status, "weights": {k: v.clone() for k, v in experiment.model.state_dict().items()},
            "record": sink.records[-1]}


def rank_main(rank: int, world: int, port: int, runs: dict, out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from runner.cluster import Cluster

    class SameData(Cluster):
        """Every rank gets the whole global batch (the oracle of the per-device form)."""
        def shard(self, batch):
            return batch

        def weight(self, local, total):
            return 1.0

    results = {}
    for case, run in runs.items():
        kind = SameData if run["same_data"] else Cluster
        try:
            results[case] = trained(run["ranks"], kind(world=world, rank=rank, local_rank=rank))
        except Exception as e:  # reported per case; the ranks fail together (same code, same data)
            results[case] = {"error": f"{type(e).__name__}: {e}"}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
    # then the single-process oracles, shared out between the ranks (they run side by side, not after them)
    from runner.cluster import SINGLE

    oracles = {}
    for case in sorted(c for c, run in runs.items() if "oracle" in run and "error" not in results[c])[rank::world]:
        try:
            oracles[case] = trained(runs[case]["oracle"], SINGLE)
        except Exception as e:  # noqa: BLE001 - compared (and reported) by the test
            oracles[case] = {"error": f"oracle: {type(e).__name__}: {e}"}
    torch.save(oracles, f"{out}.oracles{rank}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(runs: dict, tmp_path) -> dict:
    """case -> what 2 processes trained; the cases with an "oracle" also get its single-process run ("oracle"),
    made by the two processes once they are done, half each."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "ranks.pt")
    mp.spawn(rank_main, args=(2, free_port(), runs, out), nprocs=2, join=True)
    results = torch.load(out, weights_only=False)
    for rank in range(2):
        for case, oracle in torch.load(f"{out}.oracles{rank}", weights_only=False).items():
            results[case]["oracle"] = oracle
    return results


def compare(case: str, got: dict, expected: dict, metrics: bool = True) -> list[str]:
    if "error" in got or "error" in expected:
        return [f"{case}: {got.get('error') or expected['error']}"]
    bad = []
    for key, value in expected["weights"].items():
        if value.is_floating_point() and not torch.allclose(got["weights"][key], value, rtol=0, atol=1e-6):
            bad.append(f"{case}: {key} differs by {(got['weights'][key] - value).abs().max().item():.3g}")
    for key in ("train/loss", "train/acc", "test/loss", "test/acc") if metrics else ():  # sums in float32: the
        if not math.isclose(got["record"][key], expected["record"][key], rel_tol=2e-6):  # order of additions
            bad.append(f"{case}: {key} {got['record'][key]} vs {expected['record'][key]}")
    return bad


def check(chosen: dict, got: dict) -> None:
    from runner.cluster import SINGLE
    from runner.optim import OPTIMIZERS as REGISTRY, capabilities

    bad = []
    for case, run in chosen.items():
        name = case.split("-")[0]
        spec_params = REGISTRY.validate({"name": name}, prefix="optimizer")
        if case.endswith("-global") and capabilities(spec_params).per_device:  # no global form: refused, one line
            error = got[case].get("error", "")
            if not (error.startswith("ConfigError") and "perturbation_sync=local" in error and "\n" not in error):
                bad.append(f"{case}: not refused in one line: {error or 'it ran'}")
            continue
        oracle = got[case].get("oracle") or trained(run["oracle"], SINGLE)
        bad += compare(case, got[case], oracle, metrics=not run["same_data"])
    assert not bad, "\n".join(bad)


QUICK = ["sgd", "sam", "adamw", "esam", "saf"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    chosen = cases(QUICK, same_data=False)
    return chosen, two_ranks(chosen, tmp_path_factory.mktemp("ranks"))


def test_two_processes_train_what_one_process_trains_with_the_global_batch(quick):
    check(*quick)


@pytest.mark.slow
def test_every_optimizer_under_two_processes_equals_its_single_process_definition(tmp_path):
    """The registry's other cases (those of the quick test above are not run twice)."""
    quick = cases(QUICK, same_data=False)
    chosen = {case: run for case, run in cases(OPTIMIZERS).items() if case not in quick}
    check(chosen, two_ranks(chosen, tmp_path))


# ------------------------------------------------------------------------------------------------ from the CLI
CLI = ["trainer.dtype=float64", "trainer.epochs=2", "trainer.progress=false", "dataset.batch_size=478"]


def final(run_dir) -> tuple[dict, dict, list]:
    """summary.json, the last checkpoint's weights and metrics.jsonl's records (without timings) of a run folder."""
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    records = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, weights, records


def same_run(a, b) -> None:
    (sa, wa, ra), (sb, wb, rb) = final(a), final(b)
    assert sa["status"] == sb["status"] == "completed"
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa if wa[k].is_floating_point())
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == y[key] or math.isclose(x[key], y[key], rel_tol=2e-6), (key, x[key], y[key])


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One run with trainer.devices=2 (the elastic launcher from inside the job) and its 1-process twin."""
    from conftest import runner_process

    tmp = tmp_path_factory.mktemp("launched")
    two = runner_process(tmp, *CLI, *ANALYSES, "trainer.devices=2", f"hydra.run.dir={tmp / 'two'}", timeout=600)
    one = runner_process(tmp, *CLI, *ANALYSES, f"hydra.run.dir={tmp / 'one'}", timeout=600)
    again = runner_process(tmp, *CLI, *ANALYSES, "trainer.devices=2", f"hydra.run.dir={tmp / 'two'}", timeout=600)
    return tmp, two, one, again


# analyses at the end of the run (rank 0 runs them on the trained weights): small settings
ANALYSES = ["analysis=[hessian,landscape_1d]", "analysis.hessian.iterations=6", "analysis.hessian.top_k=2",
            "analysis.hessian.trace_samples=4", "analysis.hessian.samples=256", "analysis.landscape_1d.x_points=5",
            "analysis.landscape_1d.samples=256"]


@pytest.mark.slow
def test_the_analyses_of_a_two_device_run_are_the_single_process_ones(launched):
    """Rank 0 analyses the trained weights (the others wait): the Hessian's numbers and the landscape equal those of
    the 1-process run of the same global batch."""
    import numpy as np

    tmp, two, one, _ = launched
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-3000:] + one.stderr[-3000:]
    ours = json.loads((tmp / "two" / "analysis" / "hessian.json").read_text())["scalars"]
    theirs = json.loads((tmp / "one" / "analysis" / "hessian.json").read_text())["scalars"]
    assert ours.keys() == theirs.keys() and "hessian/lambda_max" in ours
    for key, value in theirs.items():
        assert math.isclose(ours[key], value, rel_tol=1e-6, abs_tol=1e-9), (key, ours[key], value)
    a = np.load(next((tmp / "two" / "analysis").glob("landscape_1d*.npz")))
    b = np.load(next((tmp / "one" / "analysis").glob("landscape_1d*.npz")))
    for key in b.files:
        if np.issubdtype(b[key].dtype, np.floating):
            assert np.allclose(a[key], b[key], rtol=1e-6, atol=1e-9), key


@pytest.mark.slow  # the quick tier has the in-process 2-rank equivalence above (cluster, DDP, sharding, the loop)
def test_trainer_devices_2_from_the_cli_records_the_single_process_run(launched):
    tmp, two, one, again = launched
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-3000:] + one.stderr[-3000:]
    assert any(line.startswith("completed: test/acc=") for line in two.stderr.splitlines())  # then the analyses'
    same_run(tmp / "two", tmp / "one")
    summary = final(tmp / "two")[0]
    assert summary["signature"] != final(tmp / "one")[0]["signature"]  # devices is part of the run's identity
    log = (tmp / "two" / "runner.log").read_text()
    assert log.count("step 4 epoch 1 ") == 1 and "training on 2 processes (cpu)" in log  # rank 0 alone writes
    # the same command again: already done, found before any process starts
    assert again.returncode == 0 and any(line.startswith("already completed") for line in again.stderr.splitlines())
    assert "training on 2 processes" not in again.stderr


@pytest.mark.slow
def test_torchrun_runs_the_same_run_in_the_same_folder_as_trainer_devices(launched, tmp_path):
    """`torchrun --standalone --nproc-per-node=2 -m runner ...`: rank 0's Hydra makes the folder, `trainer.devices=2`
    is added to the config (the run's identity), and the numbers are the single-process ones."""
    from conftest import cli_env

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "runner", *CLI, *ANALYSES, "logger=none", f"hydra.run.dir={tmp_path / 'torchrun'}"],
                         cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    tmp = launched[0]
    same_run(tmp_path / "torchrun", tmp / "one")
    assert final(tmp_path / "torchrun")[0]["signature"] == final(tmp / "two")[0]["signature"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torchrun"]  # the other rank left no folder here


@pytest.mark.slow
def test_a_sweep_of_two_device_runs_completes_and_the_report_reads_it(tmp_path):
    from conftest import runner_process

    out = runner_process(tmp_path, "-m", *CLI, "trainer.devices=2", "seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}",
                         timeout=900)
    assert out.returncode == 0 and out.stderr.strip().splitlines()[-1] == "sweep: 2 completed", out.stderr[-3000:]
    report = python_m("runner.report", [tmp_path / "s"], cwd=tmp_path, env=cli_env(tmp_path))
    assert report.returncode == 0, report.stderr[-2000:]
    assert "n=2" in report.stdout or "2 seeds" in report.stdout or " 2 " in report.stdout, report.stdout
