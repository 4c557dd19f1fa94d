"""Many devices (runner/cluster.py): N processes train what one process with the global batch trains.

The oracles, in float64 on the CPU (2 processes, gloo), through the real loop (`build` + `train`: sharded batches,
DistributedDataParallel, sharded evaluation, reduced train sums):
- every optimizer of conf/optimizer with `perturbation_sync=global` (plain optimizers: their only pass) equals the
  single-process run with the global batch, every parameter after two epochs of digits in batches of 478 (the last
  batch of each epoch, 3 samples, splits 2/1: the weighting of uneven parts is checked too);
- SAM with `perturbation_sync=local` equals single-process SAM with m-sharpness m = batch / 2 (Foret et al.'s
  definition of SAM over accelerators);
- every method of the SAM family with `perturbation_sync=local`, when both processes are given the whole batch,
  equals the single-process method on it (the per-device form is the method itself on each device's samples:
  no state, random draw or reduction may differ between the ranks);
- a method with no global form (`per_device`: ESAM's selection, TRAM's input noise) is refused in one line;
- the train and test metrics of the 2-process run are the single-process ones.
"""
from __future__ import annotations

import math
import socket
import sys

import pytest
import torch

from conftest import CONF_DIR, REPO
from tiny import Collect

OPTIMIZERS = sorted(p.stem for p in (CONF_DIR / "optimizer").glob("*.yaml"))
BASE = ["trainer.dtype=float64", "trainer.progress=false", "logger=none", "trainer.device=cpu"]
EPOCH = ["trainer.epochs=2", "dataset.batch_size=478"]  # 4 steps an epoch: 3 x 478 digits, then 3 (split 2/1)
BATCHES = ["trainer.steps=20", "trainer.epochs=1"]  # 20 whole batches of 64: 32 per process


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
    out["sam-local"] = {"ranks": ["optimizer=sam", "optimizer.perturbation_sync=local", *BATCHES, *two],
                        "oracle": ["optimizer=sam", "optimizer.m=32", *BATCHES], "same_data": False}
    return out


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(runs: dict, tmp_path) -> dict:
    import torch.multiprocessing as mp

    out = str(tmp_path / "ranks.pt")
    mp.spawn(rank_main, args=(2, free_port(), runs, out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def compare(case: str, got: dict, expected: dict, metrics: bool = True) -> list[str]:
    if "error" in got:
        return [f"{case}: {got['error']}"]
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
        bad += compare(case, got[case], trained(run["oracle"], SINGLE), metrics=not run["same_data"])
    assert not bad, "\n".join(bad)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    chosen = cases(["sgd", "sam", "adamw", "esam"], same_data=False)
    return chosen, two_ranks(chosen, tmp_path_factory.mktemp("ranks"))


def test_two_processes_train_what_one_process_trains_with_the_global_batch(quick):
    check(*quick)


@pytest.mark.slow
def test_every_optimizer_under_two_processes_equals_its_single_process_definition(tmp_path):
    chosen = cases(OPTIMIZERS)
    check(chosen, two_ranks(chosen, tmp_path))
