"""Device-resident batching, shared by every task.

A whole split lives on the training device (CIFAR-10 as uint8: 150 MB). Each epoch draws one seeded permutation
there; a batch is an index into it, then the task's `transform` (e.g. crop + flip + normalize for images) runs
as a few batched tensor ops (airbench style). No DataLoader, no workers, no host->device copy per step.
"""
from typing import Callable, Iterator, NamedTuple, Optional

import torch


class Batch(NamedTuple):
    """One mini-batch: inputs, int64 targets and (when asked for) the samples' indices into the split."""
    x: torch.Tensor
    y: torch.Tensor
    index: Optional[torch.Tensor] = None


class DeviceBatches:
    """Mini-batches of one device-resident split.

    Shuffling and the transform's randomness draw from `generator` (on the same device), whose state is
    checkpointed, so the data order of a resumed run is the uninterrupted run's. `transform(x, generator)` maps
    the stored inputs of a batch to the model's input; `with_indices` adds each batch's sample indices (for
    methods that declare `sample_indices`, e.g. ESAM's per-sample selection). `plain_transform` is the transform
    without augmentation (analyses evaluate fixed training samples with it, runner/analysis/probe.py).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
                 generator: Optional[torch.Generator] = None,
                 transform: Optional[Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]] = None,
                 with_indices: bool = False,
                 plain_transform: Optional[Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]] = None):
        self.x, self.y = x, y
        self.plain_transform = plain_transform if plain_transform is not None else transform
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator
        self.transform, self.with_indices = transform, with_indices

    def _bounds(self) -> list[tuple[int, int]]:
        """(start, end) of each batch. A training split whose last batch would hold one sample merges it into
        the batch before (BatchNorm cannot normalize a batch of one; every sample is still seen each epoch)."""
        n, size = len(self.y), self.batch_size
        starts = list(range(0, n, size))
        if self.shuffle and size > 1 and len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()
        return [(start, starts[i + 1] if i + 1 < len(starts) else n) for i, start in enumerate(starts)]

    def __len__(self) -> int:
        return len(self._bounds())

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def plain_inputs(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's inputs and targets of samples `index`, without augmentation and without drawing from the
        data generator (so the training data order is untouched)."""
        x, y = self.x[index], self.y[index]
        if self.plain_transform is not None:
            x = self.plain_transform(x, None)
        return x, y

    def __iter__(self) -> Iterator[Batch]:
        n, dev = len(self.y), self.y.device
        order = torch.randperm(n, device=dev, generator=self.generator) if self.shuffle else None
        for start, end in self._bounds():
            if order is None:
                x, y = self.x[start:end], self.y[start:end]
                index = torch.arange(start, end, device=dev) if self.with_indices else None
            else:
                index = order[start:end]
                x, y = self.x[index], self.y[index]
                index = index if self.with_indices else None
            if self.transform is not None:
                x = self.transform(x, self.generator)
            yield Batch(x, y, index)
