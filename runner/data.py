"""Batch sources, shared by every task: device-resident splits (`DeviceBatches`, here) and splits streamed from
storage by worker processes (`StreamedBatches`, runner/stream.py), behind one contract the loop, the closure, the
evaluation and the analyses use:
- iterating gives `Batch(x, y, index)`; `epoch(n, first)` gives epoch n's batches from its `first`-th on (a run
  resumed from a checkpoint taken mid-epoch); `len()` is the number of batches of an epoch;
- `num_samples`, `device`, `generator` (the device generator the source's on-device randomness draws from: its
  state is checkpointed), `plain_inputs(index)` (fixed samples without augmentation, for the analyses);
- `state_dict()` / `load_state_dict()`: what a checkpoint taken mid-epoch needs besides the generator.

Device-resident: a whole split lives on the training device (CIFAR-10 as uint8: 150 MB). Each epoch draws one
seeded permutation there; a batch is an index into it, then the task's `transform` (e.g. crop + flip + normalize
for images) runs as a few batched tensor ops (airbench style). No DataLoader, no workers, no host->device copy per
step.
"""
from typing import Callable, Iterator, NamedTuple, Optional

import torch


class Batch(NamedTuple):
    """One mini-batch: inputs, int64 targets and (when asked for) the samples' indices into the split."""
    x: torch.Tensor
    y: torch.Tensor
    index: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        """The global batch's size (the samples every rank's parts of it hold together)."""
        return len(self.y)


class BatchPart(Batch):
    """This rank's part of a global batch of `size` samples, read as such by a source that reads only its part
    (runner/stream.py); `Cluster.shard` leaves it as it is."""

    def __new__(cls, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor], global_size: int):
        part = super().__new__(cls, x, y, index)
        part.global_size = global_size
        return part

    @property
    def size(self) -> int:
        return self.global_size


def batch_bounds(n: int, size: int, shuffle: bool) -> list[tuple[int, int]]:
    """(start, end) of each batch of a split of n samples. A training split whose last batch would hold one sample
    merges it into the batch before (BatchNorm cannot normalize a batch of one; every sample is still seen each
    epoch)."""
    starts = list(range(0, n, size))
    if shuffle and size > 1 and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(start, starts[i + 1] if i + 1 < len(starts) else n) for i, start in enumerate(starts)]


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
        self.order: Optional[torch.Tensor] = None  # the current epoch's permutation (shuffled splits)

    def _bounds(self) -> list[tuple[int, int]]:
        return batch_bounds(len(self.y), self.batch_size, self.shuffle)

    def __len__(self) -> int:
        return len(self._bounds())

    @property
    def num_samples(self) -> int:
        return len(self.y)

    @property
    def device(self) -> torch.device:
        return self.y.device

    def state_dict(self) -> dict:
        """The current epoch's permutation: with the generator's state, what a checkpoint taken mid-epoch needs."""
        return {"order": self.order.cpu()} if self.order is not None else {}

    def load_state_dict(self, state: dict) -> None:
        order = state.get("order")
        self.order = order.to(self.device) if order is not None else None

    def plain_inputs(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's inputs and targets of samples `index`, without augmentation and without drawing from the
        data generator (so the training data order is untouched)."""
        x, y = self.x[index], self.y[index]
        if self.plain_transform is not None:
            x = self.plain_transform(x, None)
        return x, y

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, number: int, first: int = 0) -> Iterator[Batch]:
        """The batches of an epoch from the `first`-th on. The permutation is drawn from the generator when an
        epoch starts (`number` is not used: the generator's state carries the order from epoch to epoch); an epoch
        resumed mid-way (`first` > 0) uses the one saved in the checkpoint (`state_dict`), and the generator,
        restored to its state at the checkpoint, continues the augmentation draws where they stopped."""
        n, dev = len(self.y), self.y.device
        if first == 0:
            self.order = torch.randperm(n, device=dev, generator=self.generator) if self.shuffle else None
        elif self.shuffle and self.order is None:
            raise ValueError("an epoch resumed mid-way needs its permutation (load_state_dict from its checkpoint)")
        order = self.order
        for start, end in self._bounds()[first:]:
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
        self.order = None
