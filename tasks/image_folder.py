"""Image folders, streamed (runner/stream.py): `dataset=imagefolder dataset.root=<dir>`, `dataset=imagenet`,
`dataset=tiny_imagenet`. The images stay on disk; DataLoader workers decode and augment them.

Layouts (torchvision's ImageFolder layout; classes are the folder names, sorted, and go to summary.json):
- imagefolder, imagenet: `<root>/train/<class>/<image>` and `<root>/val/<class>/<image>`;
- tiny_imagenet, as it ships (tiny-imagenet-200.zip unpacked): `<root>/train/<wnid>/images/<image>` and
  `<root>/val/images/<image>` labelled by `<root>/val/val_annotations.txt` (file, wnid, box per line); its test/
  has no labels and is not read.
The `val` folder is the evaluation split, logged as `test/...` (what the papers report as ImageNet accuracy);
`dataset.val_size` holds out part of the training split as `val/...`, as for the other image tasks, and
`subset`, `label_noise`, `imbalance_ratio` act on the training split the same way (tasks/image_classification.py).

Recipes (per image, in the workers, torchvision.transforms on the decoded PIL image, then a uint8 tensor):
- imagefolder, imagenet: training `crop_flip` is RandomResizedCrop(image_size) (scale 0.08-1, ratio 3/4-4/3) +
  horizontal flip; evaluation resizes the short side to image_size / 0.875 (256 for 224) and center-crops
  image_size: the standard ImageNet recipe (He et al. 2016; timm's defaults). ImageNet's mean and std.
- tiny_imagenet: 64x64; `crop_flip` is a random crop with padding 4 + flip (the CIFAR recipe at 64 px, as in the
  SAM papers' Tiny-ImageNet rows); evaluation as is. Its own mean and std.
- `autoaugment` is AutoAugment's ImageNet policy, `randaugment` RandAugment (2 ops, magnitude 9), after the crop;
  `cutout` runs on the device on the normalized batch (tasks/augment.py).
Without `crop_flip` training images get the evaluation transform (then the listed policies).

Bad data is one line before any work where it is cheap to see (the layout: a missing split folder, a class folder
with no image, a file that is not an image by its extension, a val annotation naming an unknown class); a file
that cannot be decoded is found when a worker reads it, and the run ends `failed` with one line naming it.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from runner.cluster import SINGLE
from runner.config import ConfigError, check
from runner.stream import StreamedBatches
from tasks import PER_CLASS_MAX, TASKS, ClassificationMetrics, ImageInput, Task
from tasks.augment import Augment, resolve
from tasks.image_classification import ImageDatasetParams, ImageTransform, Split, training_splits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_MEAN, TINY_STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
# name -> (layout, recipe, image size, mean, std)
FOLDERS = {"imagefolder": ("class_folders", "resized_crop", 224, IMAGENET_MEAN, IMAGENET_STD),
           "imagenet": ("class_folders", "resized_crop", 224, IMAGENET_MEAN, IMAGENET_STD),
           "tiny_imagenet": ("tiny_imagenet", "padded_crop", 64, TINY_MEAN, TINY_STD)}


@dataclass
class FolderParams(ImageDatasetParams):
    """Schema of conf/dataset/{imagefolder,imagenet,tiny_imagenet}.yaml."""
    image_size: int = 224
    workers: Optional[int] = None   # DataLoader worker processes per device; null: the CPUs / local devices, <= 8

    def __post_init__(self):
        super().__post_init__()
        check(not self.download, "download", self.download,
              "false: image folders are not downloaded by the runner; put the files under dataset.root")
        check(16 <= self.image_size <= 1024, "image_size", self.image_size, "16..1024")
        check(self.workers is None or 0 <= self.workers <= 64, "workers", self.workers, "null or 0..64")


@dataclass(frozen=True)
class Layout:
    """The files of a split and their labels, from the folders alone (no image is opened)."""
    classes: tuple[str, ...]
    files: tuple[str, ...]
    targets: tuple[int, ...]


def _images(folder: str, what: str) -> list[str]:
    """The image files of a folder, sorted; a file that is not an image (by its extension) is a ConfigError."""
    entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:  # DirEntry.is_dir: from the directory listing, no stat per file (ImageNet: 1.28M files)
        if entry.is_dir() or not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            raise ConfigError("dataset.root", message=(
                f"{entry.path} is not an image file ({what} holds images only: {', '.join(IMAGE_EXTENSIONS)})"))
    return [os.path.join(folder, entry.name) for entry in entries]


def _folder(path: str, expected: str) -> str:
    if not os.path.isdir(path):
        raise ConfigError("dataset.root", message=f"no folder {path} (expected {expected})")
    return path


def _class_folders(split_dir: str, expected: str, classes: Optional[tuple[str, ...]] = None,
                   images_subfolder: str = "") -> Layout:
    """`<split_dir>/<class>/[images_subfolder/]<image>`; `classes` given: the training split's (a class here that
    it lacks is an error)."""
    _folder(split_dir, expected)
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise ConfigError("dataset.root", message=f"{split_dir} holds no class folder (expected {expected})")
    classes = classes if classes is not None else tuple(found)
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise ConfigError("dataset.root", message=(
            f"{os.path.join(split_dir, unknown[0])}: class {unknown[0]!r} is not a class of the training split"))
    index = {c: k for k, c in enumerate(classes)}
    files, targets = [], []
    for name in found:
        folder = os.path.join(split_dir, name, images_subfolder) if images_subfolder else os.path.join(split_dir, name)
        images = _images(_folder(folder, expected), "a class folder")
        if not images:
            raise ConfigError("dataset.root", message=f"class folder {folder} holds no image")
        files += images
        targets += [index[name]] * len(images)
    return Layout(classes, tuple(files), tuple(targets))


def _tiny_val(root: str, classes: tuple[str, ...]) -> Layout:
    """Tiny-ImageNet's val: `val/images/*` labelled by `val/val_annotations.txt`."""
    expected = "Tiny-ImageNet's val/images/ and val/val_annotations.txt"
    folder = _folder(os.path.join(root, "val", "images"), expected)
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(annotations):
        raise ConfigError("dataset.root", message=f"no file {annotations} (expected {expected})")
    index, label = {c: k for k, c in enumerate(classes)}, {}
    with open(annotations) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or fields[1] not in index:
                raise ConfigError("dataset.root", message=(
                    f"{annotations}, line {number}: expected '<file> <wnid> ...' with a wnid of train/, got "
                    f"{line.strip()[:80]!r}"))
            label[fields[0]] = index[fields[1]]
    files = _images(folder, "val/images")
    missing = [path for path in files if os.path.basename(path) not in label]
    if missing:
        raise ConfigError("dataset.root", message=f"{missing[0]} has no line in {annotations}")
    if not files:
        raise ConfigError("dataset.root", message=f"{folder} holds no image")
    return Layout(classes, tuple(files), tuple(label[os.path.basename(path)] for path in files))


@functools.lru_cache(maxsize=4)
def scan(name: str, root: str) -> tuple[Layout, Layout]:
    """(train, val) layouts of dataset `name` under `root` (cached: the pre-flight check and the build share it)."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise ConfigError("dataset.root", message=f"dataset '{name}': no folder {root} (set dataset.root)")
    if FOLDERS[name][0] == "tiny_imagenet":
        expected = "Tiny-ImageNet's layout: train/<wnid>/images/*.JPEG"
        train = _class_folders(os.path.join(root, "train"), expected, images_subfolder="images")
        return train, _tiny_val(root, train.classes)
    expected = f"{root}/train/<class>/<image> and {root}/val/<class>/<image>"
    train = _class_folders(os.path.join(root, "train"), expected)
    return train, _class_folders(os.path.join(root, "val"), expected, train.classes)


def check_layout(name: str, *, root: str = "data", **_) -> None:
    """Before any job of a sweep runs: the layout is there and holds images only."""
    scan(name, root)


class FolderReader:
    """Decode one image file (Pillow, as torchvision's ImageFolder and timm do; RGB) and transform it; see the module
    doc for the recipes. (torchvision.io's decoders are deprecated since torchvision 0.29.)"""

    def __init__(self, files: tuple[str, ...], recipe: str, size: int, augment: tuple[str, ...]):
        import numpy as np

        # one numpy array of bytes, not a list of str: the forked workers read it without touching a refcount per
        # path, so its pages stay shared (a Python list of ImageNet's 1.28M paths is copied into every worker)
        self.files = np.array([os.fsencode(f) for f in files])  # any file name the OS gives (fsencode)
        self.recipe, self.size, self.augment = recipe, size, augment
        self._transforms = None

    def name(self, i: int) -> str:
        return os.fsdecode(self.files[i])

    def transforms(self):
        """(training, evaluation) transforms, built on first use (in each worker)."""
        if self._transforms is None:
            from torchvision import transforms as T  # v1, on PIL images: 0.2 ms an image where v2 takes 0.35 (64 px)

            size = self.size
            if self.recipe == "resized_crop":
                evaluation = [T.Resize(round(size / 0.875)), T.CenterCrop(size)]
                crop = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
            else:
                evaluation = [T.Resize(size), T.CenterCrop(size)]
                crop = evaluation + [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
            training = crop if "crop_flip" in self.augment else list(evaluation)
            if "autoaugment" in self.augment:
                training.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
            if "randaugment" in self.augment:
                training.append(T.RandAugment())
            to_tensor = [T.PILToTensor()]  # uint8 (C, H, W): normalized on the device
            self._transforms = T.Compose(training + to_tensor), T.Compose(evaluation + to_tensor)
        return self._transforms

    def load(self, i: int, train: bool) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.name(i)) as image:
            image = image.convert("RGB")  # decodes the whole file: a truncated one raises here
        return self.transforms()[0 if train else 1](image).contiguous()


def default_workers(cluster) -> int:
    """The CPUs shared by the devices of this node, at most 8 each (enough for ResNet-50 at 224 px on one GPU)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", cluster.world if cluster is not None else 1))
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local)))


def build_folder_task(name: str, *, seed: int, device: torch.device, channels_last: bool = False,
                      with_indices: bool = False, cluster=None, root: str, download: bool, batch_size: int,
                      eval_batch_size: int, val_size: float, subset: Optional[int], label_noise: float, augment,
                      imbalance_ratio: Optional[float] = None, cutout_size: Optional[int] = None,
                      image_size: int = 224, workers: Optional[int] = None) -> Task:
    """Scan the layout, choose the training samples (long-tailed copy / subset / validation / label noise, seeded,
    on sample ids), and stream each split."""
    cluster = cluster or SINGLE
    _, recipe, _, mean, std = FOLDERS[name]
    train_layout, val_layout = scan(name, root)
    classes, num_classes = train_layout.classes, len(train_layout.classes)
    files = train_layout.files + val_layout.files  # sample ids: training files, then the val folder's
    n_train = len(train_layout.files)
    train, evals, info = training_splits(
        Split(torch.arange(n_train), torch.tensor(train_layout.targets, dtype=torch.int64)),
        Split(torch.arange(n_train, len(files)), torch.tensor(val_layout.targets, dtype=torch.int64)),
        num_classes, seed, imbalance_ratio=imbalance_ratio, subset=subset, val_size=val_size, label_noise=label_noise)
    names = resolve(augment)
    reader = FolderReader(files, recipe, image_size, names)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    on_device = Augment(tuple(a for a in names if a == "cutout"), cutout_size)  # the rest run in the workers
    workers = default_workers(cluster) if workers is None else workers

    def batches(split: Split, size: int, *, train_split: bool) -> StreamedBatches:
        transform = ImageTransform(mean, std, device, augment=on_device if train_split else Augment(()),
                                   channels_last=channels_last)
        plain = ImageTransform(mean, std, device, augment=Augment(()), channels_last=channels_last)
        return StreamedBatches(reader, split.x, split.y, size, shuffle=train_split, seed=seed, device=device,
                               generator=generator if train_split else None, transform=transform,
                               plain_transform=plain, with_indices=with_indices and train_split, workers=workers,
                               cluster=cluster)

    return Task(train=batches(train, batch_size, train_split=True),
                evals={split_name: batches(split, eval_batch_size, train_split=False)
                       for split_name, split in evals.items()},
                input=ImageInput(3, image_size, tuple(mean), tuple(std)), num_classes=num_classes,
                info={**info, "classes": list(classes)},
                metrics=ClassificationMetrics(num_classes, per_class=imbalance_ratio is not None
                                              and num_classes <= PER_CLASS_MAX))


for _name in FOLDERS:
    TASKS.register(_name, FolderParams, f"image classification on {_name} (streamed from disk)", input="image",
                   check=functools.partial(check_layout, _name))(functools.partial(build_folder_task, _name))
