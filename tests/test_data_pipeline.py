"""The device-resident pipeline: crop+flip against a per-image reference, seeded epochs, normalization, indices."""
import math

import pytest
import torch
import torch.nn.functional as F

from runner.data import DeviceBatches
from runner.schedulers import SCHEDULERS, build_scheduler
from tasks import TASKS
from tasks.augment import Augment, crop_flip, resolve
from tasks.image_classification import ImageTransform, Split


def image_batches(split, batch_size, mean, std, *, shuffle, augment=False, generator=None, with_indices=False):
    transform = ImageTransform(mean, std, torch.device("cpu"), augment=Augment(resolve(augment)), channels_last=False)
    return DeviceBatches(split.x, split.y, batch_size, shuffle=shuffle, generator=generator, transform=transform,
                         with_indices=with_indices)


def test_crop_flip_matches_per_image_reference():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = crop_flip(x, 2, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # replay the same draws, in the same order
    dy, dx = torch.randint(0, 5, (16, 1), generator=g), torch.randint(0, 5, (16, 1), generator=g)
    flip = torch.rand(16, 1, generator=g) < 0.5
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(16):
        ref = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        ref = ref.flip(-1) if flip[i] else ref
        assert torch.equal(out[i], ref)
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_batches_cover_every_sample_once_per_epoch_and_are_seeded():
    split = Split(torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1), torch.arange(50))
    make = lambda seed, **kw: image_batches(split, 16, (0.0,), (1 / 255,), shuffle=True,
                                            generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = make(0), make(0), make(1)
    assert len(a) == math.ceil(50 / 16)
    epoch1 = torch.cat([batch.y for batch in a])
    assert sorted(epoch1.tolist()) == list(range(50))
    assert torch.equal(epoch1, torch.cat([batch.y for batch in b]))          # same seed, same order
    assert not torch.equal(epoch1, torch.cat([batch.y for batch in c]))      # another seed, another order
    assert not torch.equal(epoch1, torch.cat([batch.y for batch in a]))      # the next epoch is reshuffled
    for x, y, index in make(0):
        assert torch.equal(x.view(-1), y.float())                     # images stay paired with labels
        assert index is None                                          # indices only when asked for
    for x, y, index in make(0, with_indices=True):
        assert torch.equal(split.y[index], y)                         # each sample's index into the split


def test_indices_do_not_change_the_data_order():
    split = Split(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40))
    plain = image_batches(split, 8, (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=True,
                          generator=torch.Generator().manual_seed(3))
    indexed = image_batches(split, 8, (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=True,
                            generator=torch.Generator().manual_seed(3), with_indices=True)
    for (x1, y1, _), (x2, y2, _) in zip(plain, indexed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_normalization_uses_dataset_mean_and_std():
    split = Split(torch.full((4, 1, 2, 2), 51, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    (x, _, _), = image_batches(split, 8, (0.1,), (0.5,), shuffle=False)
    torch.testing.assert_close(x, torch.full_like(x, (0.2 - 0.1) / 0.5))


def test_build_data_digits_with_subset_val_and_noise():
    choice = TASKS.validate({"name": "digits", "batch_size": 32, "subset": 1000, "val_size": 0.2, "label_noise": 0.5})
    task = choice.build(seed=0, device=torch.device("cpu"))
    assert task.train.num_samples == 800 and task.evals["val"].num_samples == 200
    assert task.evals["test"].num_samples == 360
    assert 0.4 < task.info["label_noise_fraction"] < 0.6
    assert (task.num_classes, task.input.shape) == (10, (1, 8, 8))


def lrs(name, epochs=10, steps=10, **kw):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = build_scheduler(SCHEDULERS.validate({"name": name, **kw}), opt, epochs * steps, steps)
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_closed_form():
    lr = lrs("cosine", warmup_epochs=1.0, min_lr_ratio=0.1)
    assert lr[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])       # linear warmup over 10 steps
    assert lr[10] == pytest.approx(1.0)
    mid = 10 + 45
    assert lr[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_multistep_fractions_and_epochs():
    assert lrs("multistep", milestones=[0.5, 0.75], gamma=0.1)[49:51] == pytest.approx([1.0, 0.1])
    assert lrs("multistep", milestones=[3], gamma=0.5)[29:31] == pytest.approx([1.0, 0.5])
    assert set(lrs("constant")) == {1.0}
