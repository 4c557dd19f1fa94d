"""The process group as a value: `Cluster`, handed to the loop, so that many devices enter through one seam.

One run over N processes (one per device; torch.distributed, gloo on the CPU, nccl on CUDA) trains exactly what one
process with the global batch would, up to what is per device by definition:
- **data**: every rank draws the same seeded global permutation and the same augmentation of the global batch
  (`DeviceBatches` with the same generator), then keeps its contiguous slice (`shard`): the global batch of a step
  is the same set of samples, augmented the same way, whatever N. (Each rank augments the whole global batch: a few
  batched tensor ops, cheap next to the model, and the price of exact equivalence.) A batch that does not divide
  by N is split as evenly as possible, and each rank's loss is weighted by its share (`weight`), so the mean over
  ranks is the global batch's mean;
- **gradients**: the model is wrapped in `DistributedDataParallel`, which averages the gradient of a pass over the
  ranks during its backward. A pass run inside `no_sync` keeps the rank's own gradient: the SAM family's ascent
  under `optimizer.perturbation_sync=local` (runner/optim/perturbation.py), which then averages once, before the
  base step (`mean_grads`);
- **BN**: without `trainer.sync_bn` each rank normalizes with its own sub-batch's statistics, and the running
  statistics are rank 0's (as DDP's default buffer broadcast leaves them): they are broadcast from rank 0 before
  every evaluation and checkpoint. `trainer.sync_bn=true` (CUDA) uses the global batch's statistics;
- **metrics**: evaluation is sharded and its sums are reduced (sums, not means of means), as are the train sums;
  so the numbers equal the single-device ones.
With one process every method is the identity (`SINGLE`), so single-device numbers never change.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
import torch
import torch.distributed as dist

from runner.data import Batch, BatchPart


@dataclass(frozen=True)
class Cluster:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------------------------------- set-up
    @classmethod
    def from_env(cls, device_type: str, timeout_s: float = 1800) -> "Cluster":
        """The process group of torchrun's / torch's elastic launcher's / SLURM's environment (WORLD_SIZE, RANK,
        LOCAL_RANK, MASTER_ADDR, MASTER_PORT), joined once per process; `SINGLE` without one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return SINGLE
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls(world=dist.get_world_size(), rank=dist.get_rank(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK on CUDA (one process per GPU), the CPU as is."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """`net` in DistributedDataParallel (gradients averaged during backward), or `net` itself on one process.
        Buffers are not synced at each forward: `broadcast_buffers` does it where it matters."""
        if not self.distributed:
            return net
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, forward_sync_buffers=False)

    @staticmethod
    def unwrap(net: torch.nn.Module) -> torch.nn.Module:
        """The module inside DistributedDataParallel (`net` itself otherwise)."""
        return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net

    def no_sync(self, net: torch.nn.Module):
        """A pass inside keeps this rank's own gradient (forward and backward must both run inside)."""
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            return net.no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------- data
    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) of n items split as evenly as possible (the first n % world get one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def shard(self, batch: Batch) -> Batch:
        """This rank's contiguous slice of a global batch (a `BatchPart`, read by the rank as its part, is one
        already: runner/stream.py)."""
        if not self.distributed or isinstance(batch, BatchPart):
            return batch
        start, end = self.bounds(len(batch.y))
        return Batch(batch.x[start:end], batch.y[start:end], None if batch.index is None else batch.index[start:end])

    def weight(self, local: int, total: int) -> float:
        """The factor of this rank's batch-mean loss so that the mean over ranks is the global batch's mean."""
        return 1.0 if not self.distributed or local * self.world == total else local * self.world / total

    # ------------------------------------------------------------------------------------------- reductions
    def sum_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each tensor over the ranks, in place (one collective for all)."""
        if self.distributed and tensors:
            flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
            dist.all_reduce(flat)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        return tensors

    def mean_grads(self, params: list[torch.Tensor]) -> None:
        """Average the parameters' gradients over the ranks (after passes run inside `no_sync`)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.distributed and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            parts = torch.split(flat, [g.numel() for g in grads])
            torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(parts, grads)])

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """A boolean device tensor that is true on every rank."""
        if not self.distributed:
            return flag
        value = flag.to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value[0].bool()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a (detached) tensor."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world

    @torch.no_grad()
    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `tensor` (the first dimension may differ between ranks: an uneven last batch),
        concatenated in rank order, on every rank: the global batch's values of a per-sample quantity (SAF's stored
        outputs, the epoch counters of SAF and MESA, ALDR-KL's lambdas), so that state kept per training sample is
        the same on every rank. `tensor` itself on one process."""
        if not self.distributed:
            return tensor
        size = torch.tensor([len(tensor)], dtype=torch.int64, device=tensor.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        counts = [int(n) for n in torch.cat(sizes).tolist()]
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @torch.no_grad()
    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BN running statistics) on every rank."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def broadcast(self, obj: object) -> object:
        """Rank 0's picklable `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def gather(self, obj: object) -> list:
        """Every rank's picklable `obj`, in rank order, on every rank ([obj] on one process)."""
        if not self.distributed:
            return [obj]
        box = [None] * self.world
        dist.all_gather_object(box, obj)
        return box


SINGLE = Cluster()


def env_rank() -> tuple[int, int]:
    """(rank, world) that torchrun (or torch's elastic launcher) gave this process; (0, 1) outside one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def export_slurm_ranks() -> None:
    """In a SLURM job with several tasks (`launcher=slurm hydra.launcher.tasks_per_node=N`, each task runs the job):
    torch's env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's, by submitit's
    own helper; each task then is one rank, on cuda:LOCAL_RANK."""
    if (os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and int(os.environ.get("SLURM_NTASKS", "1")) > 1
            and "WORLD_SIZE" not in os.environ):
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def slurm_devices(argv: list[str]) -> int:
    """The processes a SLURM job of this command line has: tasks per node x nodes (1 without launcher=slurm)."""
    values = {a.split("=", 1)[0].lstrip("+~"): a.split("=", 1)[1] for a in argv if "=" in a}
    if values.get("launcher") != "slurm":
        return 1
    try:
        return int(values.get("hydra.launcher.tasks_per_node", 1)) * int(values.get("hydra.launcher.nodes", 1))
    except ValueError:
        return 1


def rank_argv(argv: list[str]) -> list[str]:
    """The command line of one rank started by `torchrun --nproc-per-node=N -m runner ...`: `trainer.devices=N` is
    added (it is part of the run's identity, so the folder is the one `trainer.devices=N` alone would use; the same
    for `launcher=slurm` with N tasks per job), and the
    ranks other than 0 get a throwaway Hydra output folder and log to the console only: rank 0's Hydra makes the run
    folder and writes its config and log, and rank 0 tells the others where it is (runner/app.py)."""
    rank, world = env_rank()
    given = any(a.split("=", 1)[0].lstrip("+~") == "trainer.devices" for a in argv)
    if world <= 1:
        tasks = slurm_devices(argv)  # launcher=slurm with several tasks: the job's processes are the devices
        return argv + [f"trainer.devices={tasks}"] if tasks > 1 and not given else argv
    argv = list(argv)
    if not given:
        argv.append(f"trainer.devices={world}")
    if rank > 0:
        import atexit
        import shutil
        import tempfile

        scratch = tempfile.mkdtemp(prefix=f"runner-rank{rank}-")
        atexit.register(shutil.rmtree, scratch, True)
        argv += [f"hydra.run.dir={scratch}/run", f"hydra.sweep.dir={scratch}/sweep", "hydra.output_subdir=null",
                 "hydra/job_logging=stdout"]
    return argv

