"""Raw dataset loading (fake files in the real formats, read by the real torchvision classes) and data helpers."""
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets

from runner.config import ConfigError
from tasks.image_classification import (
    DATASETS, Split, load_image_data, split_train_val, symmetric_label_noise, take_subset as subset,
)

try:
    from tests.fake_data import patch_cifar_md5, write_fake_cifar10, write_fake_cifar100, write_fake_mnist
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from fake_data import patch_cifar_md5, write_fake_cifar10, write_fake_cifar100, write_fake_mnist


def assert_matches(data, fake, channels, size, num_classes):
    assert (data.in_channels, data.image_size, data.num_classes) == (channels, size, num_classes)
    assert len(data.mean) == len(data.std) == channels
    for split, x, y in ((data.train, fake.train_x, fake.train_y), (data.test, fake.test_x, fake.test_y)):
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
        assert split.x.shape == (len(y), channels, size, size) and split.x.is_contiguous()
        assert torch.equal(split.x, torch.from_numpy(x))
        assert split.y.tolist() == y.tolist()


@pytest.mark.parametrize("name, cls, writer, num_classes", [
    ("cifar10", torchvision.datasets.CIFAR10, write_fake_cifar10, 10),
    ("cifar100", torchvision.datasets.CIFAR100, write_fake_cifar100, 100),
])
def test_cifar_fake_files_load(tmp_path, monkeypatch, name, cls, writer, num_classes):
    fake = writer(tmp_path, n_train=12, n_test=5)
    patch_cifar_md5(monkeypatch, cls, fake.md5)
    data = load_image_data(name, str(tmp_path), download=False)
    assert_matches(data, fake, 3, 32, num_classes)
    assert data.augment


def test_cifar_md5_is_really_checked(tmp_path):
    write_fake_cifar10(tmp_path)  # without patch_cifar_md5 the hard-coded sums do not match
    with pytest.raises(ConfigError, match="not found or corrupted"):
        load_image_data("cifar10", str(tmp_path), download=False)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_fake_files_load(tmp_path, name, folder):
    fake = write_fake_mnist(tmp_path, n_train=7, n_test=3, name=folder)
    data = load_image_data(name, str(tmp_path), download=False)
    assert_matches(data, fake, 1, 28, 10)
    assert not data.augment


def test_digits():
    data = load_image_data("digits", "unused", download=False)
    assert (len(data.train), len(data.test), data.num_classes, data.in_channels, data.image_size) == (1437, 360, 10, 1, 8)
    assert data.train.x.dtype == torch.uint8 and data.train.x.shape == (1437, 1, 8, 8)
    assert data.train.x.max() == 255 and sorted(data.test.y.unique().tolist()) == list(range(10))
    assert torch.isclose(data.train.x.double().mean() / 255, torch.tensor(data.mean[0], dtype=torch.float64))
    again = load_image_data("digits", "unused", download=False)
    assert torch.equal(again.test.x, data.test.x) and torch.equal(again.test.y, data.test.y)



def test_digits_is_scikit_learns_load_digits_with_its_train_test_split():
    """Oracle: the runner reads sklearn's digits file itself and splits it without sklearn; the result is
    exactly `load_digits()` split by `train_test_split(stratify=y, test_size=0.2, random_state=0)`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.as_tensor(digits.images * 255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    train, test = train_test_split(list(range(len(y))), test_size=0.2, random_state=0, stratify=y.numpy())
    data = load_image_data("digits", "unused", download=False)
    assert torch.equal(data.train.x, x[train]) and torch.equal(data.train.y, y[train])
    assert torch.equal(data.test.x, x[test]) and torch.equal(data.test.y, y[test])


@pytest.mark.parametrize("n, classes, fraction, seed", [
    (1797, 10, 0.2, 0), (569, 2, 0.2, 0), (178, 3, 0.2, 0), (150, 3, 0.2, 0),  # digits, breast_cancer, wine, iris
    (101, 7, 0.33, 5), (40, 4, 0.5, 1), (23, 3, 0.15, 2), (1000, 13, 0.1, 9),  # uneven classes: ties, remainders
])
def test_stratified_split_equals_scikit_learns_train_test_split(n, classes, fraction, seed):
    import numpy as np
    from sklearn.model_selection import train_test_split

    from tasks import stratified_split

    labels = np.random.RandomState(n + seed).randint(0, classes, size=n)
    labels[:2 * classes] = np.repeat(np.arange(classes), 2)  # every class has two members, as sklearn requires
    expected_train, expected_test = train_test_split(list(range(n)), test_size=fraction, random_state=seed,
                                                     stratify=labels)
    train, test = stratified_split(labels, fraction, seed)
    assert train.tolist() == list(expected_train) and test.tolist() == list(expected_test)


def test_synthetic():
    data = load_image_data("synthetic", "unused", download=False, synthetic_size=200, seed=3)
    assert data.train.x.shape == (200, 3, 32, 32) and data.test.x.shape == (40, 3, 32, 32)
    assert data.train.x.dtype == torch.uint8 and data.train.y.dtype == torch.int64
    assert torch.equal(data.train.x, load_image_data("synthetic", "", False, synthetic_size=200, seed=3).train.x)


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
    ("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
])
def test_missing_files_offline(tmp_path, name, expected):
    with pytest.raises(ConfigError) as info:
        load_image_data(name, str(tmp_path / "data"), download=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"{tmp_path}/data/{expected}" in message and "dataset.download=true" in message


@pytest.mark.parametrize("name, module", [("cifar10", "cifar"), ("mnist", "mnist")])
def test_failed_download_is_a_config_error(tmp_path, monkeypatch, name, module):
    def no_network(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(f"torchvision.datasets.{module}.download_and_extract_archive", no_network)
    with pytest.raises(ConfigError, match="download failed") as info:
        load_image_data(name, str(tmp_path), download=True)
    assert "\n" not in str(info.value)


def test_unknown_dataset_lists_names():
    with pytest.raises(ConfigError) as info:
        load_image_data("imagenet", "", download=False)
    assert all(name in str(info.value) for name in DATASETS)


def test_label_noise():
    y = torch.arange(10000) % 10
    same, flipped = symmetric_label_noise(y, 0.0, 10, seed=0)
    assert torch.equal(same, y) and not flipped.any()
    noisy, flipped = symmetric_label_noise(y, 0.4, 10, seed=1)
    assert 0.37 <= flipped.float().mean().item() <= 0.43
    assert torch.equal(flipped, noisy != y)  # every flipped label differs from the original, the others do not
    assert noisy.dtype == torch.int64 and noisy.min() >= 0 and noisy.max() < 10
    assert torch.equal(y, torch.arange(10000) % 10)  # input untouched
    again, _ = symmetric_label_noise(y, 0.4, 10, seed=1)
    other, _ = symmetric_label_noise(y, 0.4, 10, seed=2)
    assert torch.equal(again, noisy) and not torch.equal(other, noisy)
    with pytest.raises(ConfigError):
        symmetric_label_noise(y, 1.5, 10, seed=0)


def make_split(n=100):
    return Split(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), torch.arange(n))


def test_split_train_val():
    split = make_split()
    train, val = split_train_val(split, 0.2, seed=0)
    assert (len(train), len(val)) == (80, 20)
    assert sorted(train.y.tolist() + val.y.tolist()) == list(range(100))
    assert torch.equal(train.x.flatten().long(), train.y)  # x and y stay paired
    train2, val2 = split_train_val(split, 0.2, seed=0)
    assert torch.equal(val.y, val2.y) and torch.equal(train.y, train2.y)
    assert not torch.equal(val.y, split_train_val(split, 0.2, seed=1)[1].y)
    assert len(split_train_val(split, 30, seed=0)[1]) == 30
    for bad in (0, 100, 1.0, 0.0, True):
        with pytest.raises(ConfigError):
            split_train_val(split, bad, seed=0)


def test_subset():
    split = make_split()
    small = subset(split, 10, seed=0)
    assert len(small) == 10 and len(set(small.y.tolist())) == 10
    assert torch.equal(small.x.flatten().long(), small.y)
    assert torch.equal(small.y, subset(split, 10, seed=0).y)
    assert torch.equal(subset(split, 20, seed=0).y[:10], small.y)  # nested: a larger n keeps the smaller subset
    assert len(subset(split, 100, seed=0)) == 100
    with pytest.raises(ConfigError, match="101"):
        subset(split, 101, seed=0)
