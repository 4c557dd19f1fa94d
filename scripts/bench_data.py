"""Benchmark: the runner's streamed image folder (runner/stream.py, tasks/image_folder.py) against timm's loader and
the usual DataLoader + torchvision pipeline, on the same folder of JPEGs.

Claim
    The streamed source is at least as fast as timm's own loader on the CPU (images/s ratio runner / timm >= 1.0):
    both decode with Pillow in worker processes and normalize on the device, and the runner's exact-resume
    bookkeeping (a seed per sample, the order a function of (seed, epoch)) costs nothing measurable.

How it is measured (one process, the same folder, the same worker count and batch size for all three)
    The folder: --images JPEGs of --size x --size pixels (tinted noise, 10 classes) under --root, written once and
    reused (the train/ and val/ of torchvision's ImageFolder layout).
    (a) runner: `build_folder_task("imagefolder", ...)` with the ImageNet recipe (RandomResizedCrop(size) + flip
        in the workers, uint8 to the device, normalized there), one epoch = `task.train.epoch(e)` consumed.
    (b) timm: `timm.data.create_dataset("", root=<train>)` + `timm.data.create_loader(is_training=True,
        color_jitter=0, use_prefetcher=True, device=<device>)`: RandomResizedCrop + flip in the workers, uint8 to
        the device, normalized there by timm's prefetcher (the same work as (a); timm's default colour jitter is
        turned off because the runner's recipe has none).
    (c) DataLoader: torchvision.datasets.ImageFolder with RandomResizedCrop, RandomHorizontalFlip, ToTensor,
        Normalize in the workers (float32 batches), pin_memory on CUDA, persistent workers, then `.to(device)`.
    Each epoch ends with the last batch on the device (a synchronize on CUDA). The pipelines' epochs interleave
    (epoch k of a, b, c, then k + 1; the first is a warm-up: worker start-up), so all three see the same machine
    state. Reported: median seconds per epoch of the timed epochs, images/s, and the ratios of images/s.
    With --model (e.g. resnet50, on a GPU) each pipeline also trains that timm model (SGD, bf16 autocast on CUDA)
    and the device-resident synthetic batches of the same shape give the loader-free reference: the streamed
    source's ratio to it is the "within 10% when the loader is not the bottleneck" check of issue 17.

Usage
    python scripts/bench_data.py                       # 20000 images of 64 px, 2 workers, CPU: about 3 minutes here
    python scripts/bench_data.py --images 2000 --epochs 2     # a quick look
    python scripts/bench_data.py --size 224 --workers 8 --model resnet50 --device cuda   # the GPU check
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_folder(root: Path, images: int, size: int, classes: int = 10) -> Path:
    """`images` training JPEGs (and 1 per class in val/) under root, once; returns root."""
    from PIL import Image

    done = root / f".complete-{images}-{size}"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            label = i % classes
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            tint = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 151 + 160) % 256])
            pixels = np.clip(tint + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    done.touch()
    return root


def runner_pipeline(root: Path, size: int, batch: int, workers: int, device: torch.device):
    from tasks.image_folder import build_folder_task

    task = build_folder_task("imagefolder", seed=0, device=device, root=str(root), download=False,
                             batch_size=batch, eval_batch_size=batch, val_size=0, subset=None, label_noise=0.0,
                             augment=True, image_size=size, workers=workers)
    return lambda epoch: ((b.x, b.y) for b in task.train.epoch(epoch))


def timm_pipeline(root: Path, size: int, batch: int, workers: int, device: torch.device):
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("", root=str(root / "train"), is_training=True)
    loader = create_loader(dataset, input_size=(3, size, size), batch_size=batch, is_training=True,
                           color_jitter=0.0, num_workers=workers, mean=MEAN, std=STD, use_prefetcher=True,
                           device=device, pin_memory=device.type == "cuda", persistent_workers=True)
    return lambda epoch: iter(loader)


def dataloader_pipeline(root: Path, size: int, batch: int, workers: int, device: torch.device):
    import torchvision
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return lambda epoch: ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)


def trainer(model_name: str | None, classes: int, device: torch.device):
    """A step function (x, y) -> None of a timm model, or one that only touches the batch."""
    if model_name is None:
        return lambda x, y: x.float().sum()
    import timm

    model = timm.create_model(model_name, num_classes=classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(x, y):
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def timed_epoch(batches, step, device: torch.device) -> tuple[float, int]:
    start, seen = time.perf_counter(), 0
    for x, y in batches:
        step(x, y)
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, seen


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/runner-bench-data"))
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs, after one warm-up epoch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="a timm model to train on each pipeline's batches")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    root = write_folder(args.root / f"{args.images}x{args.size}", args.images, args.size)
    pipelines = {"runner (streamed)": runner_pipeline, "timm create_loader": timm_pipeline,
                 "DataLoader + torchvision": dataloader_pipeline}
    made = {name: make(root, args.size, args.batch, args.workers, device) for name, make in pipelines.items()}
    steps = {name: trainer(args.model, 10, device) for name in made}
    if args.model is not None:  # the loader-free reference: device-resident batches of the same shape
        x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        n_batches = args.images // args.batch
        made["device-resident (no loader)"] = lambda epoch: (((x.float() - 128) / 64, y) for _ in range(n_batches))
        steps["device-resident (no loader)"] = trainer(args.model, 10, device)
    times: dict[str, list[float]] = {name: [] for name in made}
    seen: dict[str, int] = {}
    for epoch in range(1 + args.epochs):
        for name, batches in made.items():
            seconds, seen[name] = timed_epoch(batches(epoch), steps[name], device)
            if epoch > 0:
                times[name].append(seconds)
            print(f"epoch {epoch}{' (warm-up)' if epoch == 0 else ''} {name}: {seconds:.2f} s", flush=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"\n{args.images} JPEGs of {args.size} px, batch {args.batch}, {args.workers} workers, {card}"
          f"{', model ' + args.model if args.model else ', no model (loading only)'}")
    rate = {name: seen[name] / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:30s} {statistics.median(t):7.2f} s/epoch  {rate[name]:9.0f} images/s")
    ours = rate["runner (streamed)"]
    print(f"  runner / timm: {ours / rate['timm create_loader']:.2f} (target >= 1.0)   "
          f"runner / DataLoader: {ours / rate['DataLoader + torchvision']:.2f}")
    if "device-resident (no loader)" in rate:
        print(f"  runner / device-resident: {ours / rate['device-resident (no loader)']:.2f} (target >= 0.9 on a "
              "GPU when the loader is not the bottleneck)")


if __name__ == "__main__":
    main()
