"""A local pool launcher: the jobs of a sweep in separate processes, one per visible GPU.

`launcher=pool` (or `hydra/launcher=gpu_pool`). Hydra only accepts launchers from the `hydra_plugins`
namespace package, hence this file's place; Hydra discovers it by scanning that namespace. Each worker process owns one GPU (CUDA_VISIBLE_DEVICES is set
before it touches CUDA) and runs jobs one after another, so N GPUs train N jobs at once. We measured no gain
from packing several ResNet-18 jobs on one H100, hence one job per GPU. Without GPUs, `workers` CPU processes
(default 1) run the jobs. Failed jobs come back as Hydra JobReturns; the sweep goes on (runner/sweep.py).
"""
import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import open_dict

log = logging.getLogger(__name__)


@dataclass
class GPUPoolLauncherConf:
    _target_: str = "hydra_plugins.runner_launcher.gpu_pool_launcher.GPUPoolLauncher"
    gpus: Optional[List[int]] = None   # GPU ids to use; null = all visible
    workers: Optional[int] = None      # processes; null = one per GPU (1 without GPUs)


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _run_pickled(payload: bytes) -> bytes:
    """Worker entry: the launcher, the job's arguments and the JobReturn travel cloudpickled (Hydra's state
    holds closures, and its plugin scan loads this module under a second class identity)."""
    launcher, args = cloudpickle.loads(payload)
    return cloudpickle.dumps(launcher(*args))


def _claim_gpu(queue, threads: int) -> None:
    """Worker initializer: take one GPU id for the life of this process (before CUDA is initialized) and a
    fair share of the CPU threads (torch's default, one per core in every worker, oversubscribes the CPU)."""
    gpu = queue.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


class GPUPoolLauncher(Launcher):
    def __init__(self, gpus: Optional[List[int]] = None, workers: Optional[int] = None) -> None:
        self.gpus, self.workers = gpus, workers
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def __call__(self, overrides: List[str], job_num: int, singleton_state) -> JobReturn:
        """Runs in a worker process: compose this job's config and run it as Hydra would."""
        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config.hydra.job) as job:
            job.id = f"pool_{job_num}"
            job.num = job_num
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        gpus = [str(g) for g in self.gpus] if self.gpus is not None else _visible_gpus()
        workers = self.workers or max(1, len(gpus))
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: CUDA must not be initialized by a fork
        queue = ctx.Manager().Queue()
        for i in range(workers):
            queue.put(gpus[i % len(gpus)] if gpus else None)
        log.info("pool: %d jobs on %d worker(s), GPUs %s", len(job_overrides), workers, gpus or "none")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_claim_gpu,
                                 initargs=(queue, max(1, (os.cpu_count() or 1) // workers))) as pool:
            futures = []
            for i, overrides in enumerate(job_overrides):
                log.info("\t#%d : %s", initial_job_idx + i, " ".join(filter_overrides(overrides)))
                args = (list(overrides), initial_job_idx + i, Singleton.get_state())
                futures.append(pool.submit(_run_pickled, cloudpickle.dumps((self, args))))
            return [cloudpickle.loads(f.result()) for f in futures]


ConfigStore.instance().store(group="hydra/launcher", name="gpu_pool", node=GPUPoolLauncherConf, provider="runner")
