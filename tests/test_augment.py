"""Augmentations as a list (tasks/augment.py): what each one does, per image, seeded, and their checks."""
from __future__ import annotations

import pytest
import torch

from tasks.augment import Augment, check_augment, crop_flip, cutout, per_image, resolve


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cutout_zeroes_one_square_of_its_size_clipped_at_the_border():
    x = torch.ones(512, 3, 32, 32)
    out = cutout(x, 16, generator())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # the same hole in every channel
    holes = out[:, 0] == 0
    rows, cols = holes.any(2), holes.any(1)
    for hole, r, c in zip(holes, rows, cols):
        height, width = int(r.sum()), int(c.sum())
        assert 1 <= height <= 16 and 1 <= width <= 16
        assert int(hole.sum()) == height * width  # one rectangle: the square, clipped
        # contiguous rows and columns: one hole, not several
        assert int(r.nonzero().max() - r.nonzero().min()) + 1 == height
        assert int(c.nonzero().max() - c.nonzero().min()) + 1 == width
    full = [int(h.sum()) for h in holes]
    assert max(full) == 256 and min(full) < 256  # whole squares inside, clipped ones at the border
    assert torch.equal(out, cutout(x, 16, generator()))  # seeded


def test_autoaugment_and_randaugment_draw_per_image_seeded_by_the_data_generator():
    from torchvision.transforms import v2

    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=generator(1))
    batch = image.expand(64, 3, 16, 16).contiguous()
    for transform in (v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), v2.RandAugment()):
        out = per_image(transform, batch, generator(0))
        assert out.shape == batch.shape and out.dtype == torch.uint8
        distinct = {tuple(o.flatten().tolist()) for o in out}
        assert len(distinct) > 10  # one draw per image (a batched v2 call would give one draw for all)
        assert torch.equal(out, per_image(transform, batch, generator(0)))      # reproducible from the generator
        assert not torch.equal(out, per_image(transform, batch, generator(1)))
        torch.manual_seed(123)
        state = torch.random.get_rng_state()
        per_image(transform, batch, generator(0))
        assert torch.equal(torch.random.get_rng_state(), state)  # torch's global generator untouched


def test_true_is_crop_flip_and_the_list_runs_in_order_with_cutout_after_normalization():
    assert resolve(True) == ("crop_flip",) and resolve(False) == () and resolve(["cutout"]) == ("cutout",)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator(2))
    assert torch.equal(Augment(resolve(True)).before_normalize(x, generator()), crop_flip(x, 4, generator()))
    chain = Augment(("crop_flip", "autoaugment", "cutout"), cutout_size=8)
    out = chain.after_normalize(chain.before_normalize(x, generator()).float(), generator())
    assert out.shape == x.shape and bool((out == 0).any())


@pytest.mark.parametrize("augment, cutout_size, needle", [
    (["flip"], None, "flip"), (["cutout", "crop_flip"], None, "cutout last"), (["crop_flip", "crop_flip"], None,
                                                                              "once"),
    ("crop_flip", None, "a list of"), (["cutout"], 0, "cutout_size")])
def test_a_bad_list_is_one_config_error(augment, cutout_size, needle):
    from runner.config import ConfigError

    with pytest.raises(ConfigError) as error:
        check_augment(augment, cutout_size)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_a_run_with_the_list_trains_and_keeps_the_old_folders(compose, run_cli, tmp_path):
    from runner.signature import signature
    from runner.spec import validate

    import copy

    now = validate(compose(["dataset=cifar10"])).resolved
    old = copy.deepcopy(now)
    del old["dataset"]["cutout_size"]  # a config from before the key existed: its run keeps its folder
    assert now["dataset"]["augment"] is True and signature(now) == signature(old)
    out = run_cli("dataset.augment=[crop_flip,autoaugment,cutout]", "dataset.cutout_size=4", "trainer.epochs=1")
    assert out.returncode == 0 and out.stderr.strip().splitlines()[-1].startswith("completed"), out.stderr[-2000:]
