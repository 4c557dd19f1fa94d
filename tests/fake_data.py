"""Tiny datasets written in the real on-disk formats, so that torchvision's own loading code reads them.

CIFAR: torchvision checks every file against hard-coded md5 sums, which fake files cannot match. The writers
return the md5 of what they wrote, and `patch_cifar_md5` swaps those into the class's file lists for one test
(via pytest's monkeypatch), so the real check and the real unpickling still run.
MNIST / FashionMNIST: torchvision only checks that the four uncompressed idx files exist under `<name>/raw/`.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field

import numpy as np
from torchvision.datasets.utils import calculate_md5


@dataclass
class FakeFiles:
    """What a writer put on disk: images as (N, C, H, W) uint8, labels as int64, md5 of each file by name."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    md5: dict[str, str] = field(default_factory=dict)


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _pickle(path: str, obj: dict) -> str:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return calculate_md5(path)


def _cifar10_batch(name: str, x: np.ndarray, y: np.ndarray) -> dict:
    return {"batch_label": name, "labels": y.tolist(), "data": x.reshape(len(x), 3072),
            "filenames": [f"{name}_{i}.png" for i in range(len(x))]}


def write_fake_cifar10(root, n_train: int = 10, n_test: int = 4, seed: int = 0) -> FakeFiles:
    """`<root>/cifar-10-batches-py/`: data_batch_1..5 (train split across them), test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    fake = FakeFiles(_images(rng, n_train, (3, 32, 32)), rng.integers(0, 10, n_train),
                     _images(rng, n_test, (3, 32, 32)), rng.integers(0, 10, n_test))
    for i, idx in enumerate(np.array_split(np.arange(n_train), 5)):
        name = f"data_batch_{i + 1}"
        fake.md5[name] = _pickle(os.path.join(folder, name), _cifar10_batch(name, fake.train_x[idx], fake.train_y[idx]))
    fake.md5["test_batch"] = _pickle(os.path.join(folder, "test_batch"),
                                     _cifar10_batch("test_batch", fake.test_x, fake.test_y))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 10000, "num_vis": 3072}
    fake.md5["batches.meta"] = _pickle(os.path.join(folder, "batches.meta"), meta)
    return fake


def write_fake_cifar100(root, n_train: int = 10, n_test: int = 4, seed: int = 0) -> FakeFiles:
    """`<root>/cifar-100-python/`: train, test (fine and coarse labels), meta."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    fake = FakeFiles(_images(rng, n_train, (3, 32, 32)), rng.integers(0, 100, n_train),
                     _images(rng, n_test, (3, 32, 32)), rng.integers(0, 100, n_test))
    for name, x, y in (("train", fake.train_x, fake.train_y), ("test", fake.test_x, fake.test_y)):
        entry = {"filenames": [f"{name}_{i}.png" for i in range(len(y))], "batch_label": name,
                 "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(), "data": x.reshape(len(x), 3072)}
        fake.md5[name] = _pickle(os.path.join(folder, name), entry)
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    fake.md5["meta"] = _pickle(os.path.join(folder, "meta"), meta)
    return fake


def patch_cifar_md5(monkeypatch, cls, md5: dict[str, str]) -> None:
    """Make torchvision's `cls` (CIFAR10 or CIFAR100) expect the md5 sums of the fake files, for one test."""
    monkeypatch.setattr(cls, "train_list", [[name, md5[name]] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5[name]] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5[cls.meta["filename"]]})


def _write_idx(path: str, array: np.ndarray) -> None:
    """The idx format: magic (0, 0, type 0x08 = uint8, number of dims), each dim as big-endian int32, data."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        f.write(np.asarray(array.shape, dtype=">i4").tobytes())
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake_mnist(root, n_train: int = 10, n_test: int = 4, name: str = "MNIST", seed: int = 0) -> FakeFiles:
    """`<root>/<name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`, uncompressed; name MNIST or FashionMNIST."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, name, "raw")
    os.makedirs(folder, exist_ok=True)
    fake = FakeFiles(_images(rng, n_train, (1, 28, 28)), rng.integers(0, 10, n_train),
                     _images(rng, n_test, (1, 28, 28)), rng.integers(0, 10, n_test))
    for prefix, x, y in (("train", fake.train_x, fake.train_y), ("t10k", fake.test_x, fake.test_y)):
        _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), x[:, 0])
        _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), y)
    return fake


def _write_jpeg(path: str, rng: np.random.Generator, label: int, size: tuple[int, int]) -> None:
    """A JPEG whose colour says its class (a tinted noise image), so a tiny model can learn the folder."""
    from PIL import Image

    tint = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 151 + 160) % 256])
    pixels = np.clip(tint + rng.normal(0, 40, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_image_folder(root, classes: int = 3, train_per_class: int = 8, val_per_class: int = 3,
                       size: tuple[int, int] = (40, 36), seed: int = 0) -> list[str]:
    """torchvision's ImageFolder layout: <root>/train/<class>/<i>.jpg and <root>/val/<class>/<i>.jpg (JPEGs of
    `size`, width x height); returns the class names (sorted)."""
    rng = np.random.default_rng(seed)
    names = [f"class_{c}" for c in range(classes)]
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, name in enumerate(names):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                _write_jpeg(os.path.join(root, split, name, f"{i}.jpg"), rng, label, size)
    return names


def write_tiny_imagenet(root, classes: int = 3, train_per_class: int = 6, val_per_class: int = 2,
                        seed: int = 0) -> list[str]:
    """Tiny-ImageNet as it ships: train/<wnid>/images/<wnid>_<i>.JPEG (+ <wnid>_boxes.txt), val/images/val_<i>.JPEG
    with val/val_annotations.txt, wnids.txt; 64x64 JPEGs. Returns the wnids (sorted)."""
    rng = np.random.default_rng(seed)
    wnids = [f"n0{1440764 + 37 * c}" for c in range(classes)]
    with open(os.path.join(_makedirs(root), "wnids.txt"), "w") as f:
        f.write("".join(w + "\n" for w in wnids))
    for label, wnid in enumerate(wnids):
        folder = _makedirs(os.path.join(root, "train", wnid, "images"))
        with open(os.path.join(root, "train", wnid, f"{wnid}_boxes.txt"), "w") as boxes:
            for i in range(train_per_class):
                _write_jpeg(os.path.join(folder, f"{wnid}_{i}.JPEG"), rng, label, (64, 64))
                boxes.write(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
    folder = _makedirs(os.path.join(root, "val", "images"))
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        for i in range(classes * val_per_class):
            label = i % classes
            _write_jpeg(os.path.join(folder, f"val_{i}.JPEG"), rng, label, (64, 64))
            f.write(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t63\t63\n")
    return wnids


def _makedirs(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
