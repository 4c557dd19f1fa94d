"""Streamed batches: a split read from storage by DataLoader worker processes, for datasets that do not fit on the
device (ImageNet, Tiny-ImageNet, a folder of images: tasks/image_folder.py). The same contract as the
device-resident batches (runner/data.py), so every optimizer, loss, callback and analysis runs on it unchanged.

- **Order**: epoch e's permutation is drawn from a generator seeded by (seed, e), and with it one seed per position
  for that sample's augmentation; a worker seeds torch's generator with it before it decodes and augments the
  sample (torchvision's transforms draw from torch's CPU generator). So the batches are a function of (seed,
  epoch, position) alone: the same whatever the number of workers, and an epoch can start at any batch (a run
  resumed from a mid-epoch checkpoint, `trainer.checkpoint_every_steps`, skips the batches it had consumed).
- **Fast**: workers decode and augment (uint8, fixed size), the batch is collated in the worker, copied from pinned
  memory without blocking, one batch ahead, and normalized on the device (where cutout, which acts on the
  normalized image, runs too, drawing from the device generator, checkpointed like the device-resident one's; with
  many devices each rank draws for the whole global batch and keeps its rows, so the draws are one process's).
  Memory is bounded: `workers` x 2 batches in flight, whatever the dataset's size. `workers=0` reads in the
  training process (slow; for tests and debugging).
- **Many devices**: each rank reads only its part of every global batch (`Cluster.bounds` of it); its batches are
  `BatchPart`s (the global batch's size with them), which the loop's `Cluster.shard` leaves as they are.
- **Bad data**: a file that cannot be read or decoded is not a worker traceback: the worker hands back the file's
  name and the reason, and the training process raises `DataError`, one line naming the file (the run is
  recorded `failed`). The layout is checked before any work by the task.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Protocol

import numpy as np
import torch

from runner.cluster import SINGLE, Cluster
from runner.data import Batch, BatchPart, batch_bounds


class DataError(RuntimeError):
    """A sample that cannot be read: the message names the file."""


class SampleReader(Protocol):
    """What a streamed task hands over: `load(i, train)` is sample i (an index into the split's `files`) as a uint8
    (C, H, W) tensor of the model's size, augmented when `train` (drawing from torch's global generator); it raises
    on a file it cannot read. `name(i)` is the file's path, for messages."""
    def load(self, i: int, train: bool) -> torch.Tensor: ...
    def name(self, i: int) -> str: ...


class _Samples(torch.utils.data.Dataset):
    """Worker side: (position in the split, seed or None) -> (uint8 image, position), or an error line naming the
    file."""

    def __init__(self, reader: SampleReader, ids: torch.Tensor, train: bool):
        self.reader, self.ids, self.train = reader, ids, train

    def __len__(self) -> int:  # not used: a batch sampler gives the keys
        return 0

    def __getitem__(self, key: tuple[int, Optional[int]]):
        position, seed = key
        sample = int(self.ids[position])
        # torch's CPU generator (what torchvision's transforms draw from) seeded for this sample, and restored after,
        # so the process's own draws are left as they were (workers=0). Not torch.manual_seed: it also seeds every
        # CUDA device, 100 times slower (0.18 ms a call here, more than decoding a small JPEG).
        generator = torch.random.default_generator
        saved = generator.get_state()
        try:
            if seed is not None:
                generator.manual_seed(seed)
            return self.reader.load(sample, self.train and seed is not None), position
        except Exception as e:  # noqa: BLE001 - any failure to read a file becomes one line naming it
            return unreadable(self.reader, sample, e), position
        finally:
            generator.set_state(saved)


def unreadable(reader: SampleReader, sample: int, error: Exception) -> str:
    """The one line about a file that could not be read: its path and the reader's reason (without the path again)."""
    path = reader.name(sample)
    lines = str(error).replace(repr(path), "").replace(path, "").strip().splitlines()
    reason = lines[0].strip(" :") if lines else ""
    return f"cannot read {path}: {reason[:200] or type(error).__name__}"


def _collate(items: list) -> tuple:
    """(uint8 images, positions) stacked in the worker, or (error line, None)."""
    for x, _ in items:
        if isinstance(x, str):
            return x, None
    return torch.stack([x for x, _ in items]), torch.tensor([i for _, i in items], dtype=torch.int64)


class _EpochSampler:
    """This rank's part of every global batch of an epoch, from batch `first` on: lists of (position, seed)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, cluster: Cluster):
        self.n, self.batch_size, self.shuffle, self.seed, self.cluster = n, batch_size, shuffle, seed, cluster
        self.bounds = batch_bounds(n, batch_size, shuffle)
        self.number, self.first = 0, 0

    def order(self, number: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Epoch `number`'s permutation of the split and one augmentation seed per position (None unshuffled)."""
        if not self.shuffle:
            return torch.arange(self.n), None
        state = np.random.SeedSequence([self.seed, number]).generate_state(1, np.uint64)
        generator = torch.Generator().manual_seed(int(state[0] % 2**63))
        perm = torch.randperm(self.n, generator=generator)
        seeds = torch.randint(0, 2**62, (self.n,), generator=generator)
        return perm, seeds

    def __iter__(self):
        perm, seeds = self.order(self.number)
        perm, seeds = perm.tolist(), [None] * len(perm) if seeds is None else seeds.tolist()
        for start, end in self.bounds[self.first:]:
            lo, hi = self.cluster.bounds(end - start)
            yield list(zip(perm[start + lo:start + hi], seeds[start + lo:start + hi]))

    def __len__(self) -> int:
        return len(self.bounds) - self.first


class StreamedBatches:
    """Mini-batches of a split streamed by DataLoader workers (see the module doc).

    `ids` are the split's samples (indices into the reader's files; a subset, a validation hold-out or a long-tailed
    copy is a choice of ids) and `targets` their labels (int64, same length). A batch's `index` is the position in
    `ids` (what SAF, MESA, ESAM and ALDR-KL key their per-sample state by, as with device-resident data).
    `transform(x, generator)` runs on the device on the uint8 batch (normalization, cutout); `plain_transform`
    without augmentation (the analyses' fixed samples)."""

    def __init__(self, reader: SampleReader, ids: torch.Tensor, targets: torch.Tensor, batch_size: int, *,
                 shuffle: bool, seed: int, device: torch.device, generator: Optional[torch.Generator] = None,
                 transform: Callable, plain_transform: Callable, with_indices: bool = False, workers: int = 0,
                 cluster: Cluster = SINGLE):
        self.reader, self.ids, self.batch_size, self.shuffle = reader, ids, batch_size, shuffle
        self.targets = targets.to(device)
        self.generator, self.transform, self.plain_transform = generator, transform, plain_transform
        self.with_indices, self.cluster, self._device = with_indices, cluster, device
        self.sampler = _EpochSampler(len(ids), batch_size, shuffle, seed, cluster)
        self.loader = torch.utils.data.DataLoader(
            _Samples(reader, ids, train=shuffle), batch_sampler=self.sampler, num_workers=workers,
            collate_fn=_collate, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None)

    def __len__(self) -> int:
        return len(self.sampler.bounds)

    @property
    def num_samples(self) -> int:
        return len(self.ids)

    @property
    def device(self) -> torch.device:
        return self._device

    def state_dict(self) -> dict:
        """Nothing: the order of an epoch is a function of (seed, epoch), and the device generator is saved with the
        checkpoint's RNG states."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (see `state_dict`); `epoch(n, first)` starts a resumed epoch at its batch."""

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, number: int, first: int = 0) -> Iterator[Batch]:
        """Epoch `number`'s batches from the `first`-th on (this rank's part of each), one batch ahead on the
        device."""
        self.sampler.number, self.sampler.first = number, first
        sizes = [end - start for start, end in self.sampler.bounds[first:]]
        pending = None
        for k, (x, positions) in enumerate(self.loader):
            if positions is None:  # a worker could not read a file: one line naming it
                raise DataError(x)
            loaded = (x.to(self.device, non_blocking=True), positions.to(self.device, non_blocking=True), sizes[k])
            if pending is not None:
                yield self._finish(*pending)
            pending = loaded
        if pending is not None:
            yield self._finish(*pending)

    def _finish(self, x: torch.Tensor, index: torch.Tensor, global_size: int) -> Batch:
        if self.cluster.distributed and self.generator is not None:
            # the device's draws (cutout) are the global batch's, as one process makes them: this rank's rows sit
            # at their place in a global-size batch, and the rank keeps its rows of the result
            lo, hi = self.cluster.bounds(global_size)
            full = x.new_zeros((global_size, *x.shape[1:]))
            full[lo:hi] = x
            x = self.transform(full, self.generator)[lo:hi]
        else:
            x = self.transform(x, self.generator)
        y, index = self.targets[index], index if self.with_indices else None
        return BatchPart(x, y, index, global_size) if self.cluster.distributed else Batch(x, y, index)

    def plain_inputs(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples at positions `index`, read here (not by the workers) without augmentation, and their targets."""
        images = []
        for position in index.tolist():
            sample = int(self.ids[position])
            try:
                images.append(self.reader.load(sample, False))
            except Exception as e:  # noqa: BLE001
                raise DataError(unreadable(self.reader, sample, e)) from None
        x = torch.stack(images).to(self.device)
        return self.plain_transform(x, None), self.targets[index.to(self.device)]
