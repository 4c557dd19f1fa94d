"""Benchmark: the runner's training epoch against a minimal hand-written loop and the usual DataLoader pipeline.

Claim
    The runner (`runner.train.train` on `runner.experiment.build(spec)`: Hydra config, registries, closure-driven
    optimizer step, per-step lr schedule, device-side metrics, the step clock and its callbacks, tqdm wrapper) costs no more than a minimal hand-written loop doing the same work:
    runner / minimal <= 1.10 on CPU and <= 1.05 on GPU. On a GPU, device-resident data with batched crop+flip
    makes the runner >= 3x faster than the usual DataLoader + torchvision-transforms pipeline
    (DataLoader / runner >= 3). On a CPU the DataLoader ratio is reported without a target (compute-bound).

How it is measured (one process, the same model and the same data for all three)
    (a) runner:  the real config composed with Hydra's compose API from conf/ (logger=none, trainer.progress=false,
        dataset=synthetic, model=<--model>, optimizer=<--optimizer>, dataset.synthetic_size/batch_size,
        trainer.device), validated, built by `runner.experiment.build` and trained by `runner.train.train` with
        a sink that keeps the records in memory; per-epoch `time/epoch_s` is read from the records. That time is
        the epoch's steps only (evaluations, records and checkpoints are not in it); the last epoch is always
        evaluated, so, to keep the timed epochs free of evaluations altogether, trainer.eval_every is set above
        trainer.epochs, the runner trains 1 warm-up + N timed + 1 final epoch, and only the N middle epochs are
        used (the final, evaluated epoch is dropped; its time is printed). Checkpoints are off
        (trainer.checkpoint_every=0; the final checkpoint is written after the timed region anyway).
    (b) minimal: the same uint8 train tensors on the device (built by the dataset's task plugin from the same
        dataset config and seed), a seeded `randperm` per epoch, index, `crop_flip` (the same batched
        crop + flip), float normalize per batch, forward, cross-entropy, backward, `torch.optim.SGD` step
        (the optimizer config's lr/momentum/weight_decay); for --optimizer sam the two passes by hand (grad norm,
        perturb, second forward/backward with BN running stats frozen, restore by copy, base SGD step).
        No metrics, no scheduler, no closure. On CUDA: bf16 autocast + channels_last, as the runner's defaults.
        1 warm-up + N timed epochs.
    (c) DataLoader: torch.utils.data.DataLoader (--workers, default min(8, cpu_count); pin_memory on CUDA;
        persistent workers, so worker start-up is paid in the warm-up epoch only) over a Dataset that returns PIL
        images made from the same uint8 arrays, with torchvision RandomCrop(32, padding=4),
        RandomHorizontalFlip, ToTensor, Normalize (same mean/std); fp32 on the device, contiguous format, the same
        batch size, model and optimizer step as (b). 1 warm-up + N timed epochs.
    Interleaving: (b) and (c) run from the sink's `record` (which `train` calls after `time/epoch_s` is taken
    and before the next epoch's clock starts), so after runner epoch k come
    epoch k of (b) and of (c): all three see the same machine state within seconds. --rounds repeats the whole
    thing (fresh run, fresh models; default 2), alternating the order of (b) and (c), and pools the timed epochs.
    On CUDA every pipeline runs with TF32 and cudnn.benchmark on (the runner's settings, set process-wide before
    any pipeline) and each timed epoch of (b), (c) starts and ends with a synchronize (the runner's epoch ends
    with its `.item()`). Torch's default thread count is used throughout.
    Reported: the median s/epoch over the timed epochs, images/s (train images / median), the ratio of medians
    to (b) (the headline, judged against the targets), the median of the per-epoch paired ratios (epoch k of
    one pipeline over epoch k of the other) and the fastest epoch. The 1-minute load average is printed at the
    start and the end: on a shared machine, other processes scatter epoch times by several x; the paired ratio
    is the most robust of the three then.

Hardware
    Printed at the top of each run: torch version, device name, CPU model, cores, torch threads, load average.
    Results are recorded in docs/benchmarks.md (so far: a 2-core CPU machine without a GPU, torch 2.14.1).

Usage
    .venv/bin/python scripts/bench_train.py                      # CPU defaults: cnn, 4096 images, batch 128
    .venv/bin/python scripts/bench_train.py --optimizer sam
    .venv/bin/python scripts/bench_train.py --quick              # smoke test: cnn, 2048 images, batch 128
    python scripts/bench_train.py --device cuda                  # GPU defaults: resnet18, 50000 images, batch 512
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGET_RUNNER = {"cpu": 1.10, "cuda": 1.05}   # runner / minimal at most
TARGET_LOADER = {"cuda": 3.0}                 # DataLoader / runner at least (no target on CPU)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--model", default=None, help="a conf/model option: resnet18 | cnn | mlp | wrn16_8 | wrn28_10 "
                                                 "(default: resnet18 on CUDA, cnn on CPU)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "sam"))
    p.add_argument("--size", type=int, default=None, help="synthetic train images (default: 50000 CUDA, 4096 CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default 512 on CUDA (the dataset config's), 128 on CPU")
    p.add_argument("--epochs", type=int, default=None,
                   help="timed epochs per pipeline, after 1 warm-up epoch (default: 3; 2 with --quick)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default min(8, cpu_count))")
    p.add_argument("--rounds", type=int, default=None,
                   help="repeat the whole measurement (a fresh run and fresh models) this many times, alternating the "
                        "order of (b) and (c); the timed epochs of all rounds are pooled (default 2; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke test (cnn, 2048, batch 128)")
    p.add_argument("--no-dataloader", action="store_true", help="skip (c), the DataLoader pipeline")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.device(args.device).type == "cuda"
    if args.quick:
        args.model = args.model or "cnn"
        args.size = args.size or 2048
        args.batch_size = args.batch_size or 128
        args.epochs = args.epochs or 2
        args.rounds = args.rounds or 1
    args.model = args.model or ("resnet18" if gpu else "cnn")
    args.size = args.size or (50000 if gpu else 4096)
    args.batch_size = args.batch_size or (512 if gpu else 128)  # CPU: see docs/benchmarks.md (batch 512 page-faults)
    args.epochs = args.epochs or 3
    args.rounds = args.rounds or 2
    args.workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    args.only = ["runner", "minimal"] + ([] if args.no_dataloader else ["dataloader"])
    if args.epochs < 1 or args.rounds < 1:
        p.error("--epochs and --rounds must be >= 1")
    return args


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    """1-minute load average: other processes on the machine inflate and scatter the epoch times."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def hardware(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = "cpu"
    return info


def compose(args, total_epochs: int):
    from hydra import compose as hydra_compose, initialize_config_dir

    overrides = [
        "logger=none", "trainer.progress=false", "dataset=synthetic", f"model={args.model}",
        f"optimizer={args.optimizer}", f"dataset.synthetic_size={args.size}", f"dataset.batch_size={args.batch_size}",
        f"trainer.epochs={total_epochs}", f"trainer.eval_every={total_epochs + 1}", "trainer.checkpoint_every=0",
        f"trainer.device={args.device}", f"seed={args.seed}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    return cfg, overrides


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- shared by (b), (c)
def make_model_and_optimizer(cfg, data, device, channels_last: bool):
    from runner.models import MODELS

    torch.manual_seed(cfg.seed)  # the runner seeds the same way right before building its model
    model = MODELS.validate(cfg.model).build(input=data.input, num_classes=data.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optimizer
    sgd = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                          nesterov=o.nesterov)
    return model, sgd


class Stepper:
    """forward, loss, backward, SGD step; or SAM's two passes written out. No metrics, no scheduler."""

    def __init__(self, model, opt, optimizer_name: str, rho: float, autocast):
        self.model, self.opt, self.sam, self.rho, self.autocast = model, opt, optimizer_name == "sam", rho, autocast
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.saved = [p.detach().clone() for p in self.params] if self.sam else None

    def loss(self, x, y):
        with self.autocast():
            logits = self.model(x)
        return F.cross_entropy(logits.float(), y)

    def __call__(self, x, y) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(x, y).backward()
        if self.sam:
            with torch.no_grad():
                grads = [p.grad for p in self.params]
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)), 2)
                torch._foreach_copy_(self.saved, self.params)
                torch._foreach_add_(self.params, torch._foreach_mul(grads, self.rho / (norm + 1e-12)))
            self.opt.zero_grad(set_to_none=True)
            momenta = [m.momentum for m in self.bns]
            for m in self.bns:
                m.momentum = 0.0            # second pass: BN running stats untouched (as the runner's loop)
            self.loss(x, y).backward()
            for m, mom in zip(self.bns, momenta):
                m.momentum = mom
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.saved)
        self.opt.step()


def autocast_factory(device: torch.device, bf16: bool):
    if bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    import contextlib
    return contextlib.nullcontext


# -------------------------------------------------------------------------------------------------- (b) minimal
class MinimalLoop:
    """The same device tensors, randperm, crop_flip, normalize, forward/backward/step. `epoch()` -> seconds."""

    def __init__(self, cfg, data, device, gpu: bool):
        model, opt = make_model_and_optimizer(cfg, data, device, channels_last=gpu)
        model.train()
        self.step = Stepper(model, opt, cfg.optimizer.name, cfg.optimizer.get("rho", 0.0),
                            autocast_factory(device, gpu))
        self.X, self.Y, self.bs = data.train.x, data.train.y, cfg.dataset.batch_size
        self.mean, self.std = data.train.transform.mean, data.train.transform.std  # (1, C, 1, 1), 0..255 units
        self.fmt = torch.channels_last if gpu else torch.contiguous_format
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.device = device

    def epoch(self) -> float:
        from tasks.augment import crop_flip

        X, Y, bs, n = self.X, self.Y, self.bs, len(self.Y)
        sync(self.device)
        start = time.perf_counter()
        order = torch.randperm(n, device=self.device, generator=self.gen)
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            x = crop_flip(X[idx], 4, self.gen)
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.fmt)
            self.step(x, Y[idx])
        sync(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------- (c) DataLoader
class PILDataset(torch.utils.data.Dataset):
    """uint8 (N, H, W, C) array -> PIL image -> torchvision transforms, as a CIFAR10 dataset does."""

    def __init__(self, x_nhwc: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x_nhwc, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


class LoaderLoop:
    """torch DataLoader + torchvision transforms on the CPU, fp32 on the device. `epoch()` -> seconds."""

    def __init__(self, cfg, data, device, gpu: bool, workers: int):
        import torchvision.transforms as T

        model, opt = make_model_and_optimizer(cfg, data, device, channels_last=False)
        model.train()
        self.step = Stepper(model, opt, cfg.optimizer.name, cfg.optimizer.get("rho", 0.0),
                            autocast_factory(device, False))
        mean = (data.train.transform.mean / 255).flatten().tolist()
        std = (data.train.transform.std / 255).flatten().tolist()
        transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(mean, std)])
        x = data.train.x.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) like CIFAR10.data
        ds = PILDataset(x, data.train.y.cpu().numpy(), transform)
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=cfg.dataset.batch_size, shuffle=True, num_workers=workers, pin_memory=gpu,
            persistent_workers=workers > 0, drop_last=False, generator=torch.Generator().manual_seed(cfg.seed))
        self.device = device

    def epoch(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        for xb, yb in self.loader:
            self.step(xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True))
        sync(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        del self.loader  # shuts the persistent workers down


# ------------------------------------------------------------------------------- (a) runner, with (b), (c) paired
def bench_round(cfg, data, device, args, gpu: bool, reverse: bool) -> tuple[dict, float]:
    """One `train()` of 1 + N + 1 epochs; after each of its first N + 1 epochs, one epoch of each other loop.

    The other loops run from the sink's `record` (called after `time/epoch_s` has been taken and before the
    next epoch's clock starts), so they never fall inside a runner epoch, and epoch k of
    every pipeline runs within seconds of the others: load from other processes hits them alike.
    Returns the timed epochs per pipeline (epoch 1 is warm-up everywhere) and the runner's final epoch time.
    """
    from runner.experiment import build
    from runner.spec import validate
    from runner.train import Progress, train

    n = args.epochs
    loops = {}
    if "minimal" in args.only:
        loops["minimal"] = MinimalLoop(cfg, data, device, gpu)
    if "dataloader" in args.only:
        loops["dataloader"] = LoaderLoop(cfg, data, device, gpu, args.workers)
    order = list(loops)[::-1] if reverse else list(loops)
    times = {k: [] for k in loops}
    records = []

    class PairedSink:
        """Keeps the runner's records; after each, one epoch of every other loop."""

        def record(self, record: dict) -> None:
            records.append(record)
            if record.get("epoch", n + 2) <= n + 1:
                for k in order:
                    t = loops[k].epoch()
                    if record["epoch"] >= 2:
                        times[k].append(t)

        def checkpoint(self) -> None:  # checkpoints are not part of the timed work
            pass

        def best(self) -> None:
            pass

    try:
        status = train(build(validate(cfg), device), Progress(), PairedSink())
        if status != "completed":
            raise RuntimeError(f"runner run ended {status}")
    finally:
        for loop in loops.values():
            loop.close()
    epoch_s = {r["epoch"]: r["time/epoch_s"] for r in records if "time/epoch_s" in r}
    assert sorted(epoch_s) == list(range(1, n + 3)), sorted(epoch_s)
    for r in records:  # only the final epoch carries an evaluation
        assert ("test/acc" in r) == (r["epoch"] == n + 2), r
    return {"runner": [epoch_s[e] for e in range(2, n + 2)], **times}, epoch_s[n + 2]


# --------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:  # the runner's settings (runner.run.seed_everything), set for every pipeline alike
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    hw = hardware(device)
    cfg, overrides = compose(args, total_epochs=args.epochs + 2)
    print(f"# bench_train  {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"torch {hw['torch']} (python {hw['python']}); device {hw['device']} ({hw['device_name']}); "
          f"CPU {hw['cpu']}, {hw['cpu_cores']} cores, torch threads {hw['torch_threads']}; "
          f"load average {load()}")
    print(f"model={args.model} optimizer={args.optimizer} size={args.size} batch={args.batch_size} "
          f"timed epochs={args.epochs} (after 1 warm-up) workers={args.workers} "
          f"precision={'bf16 autocast + channels_last' if gpu else 'fp32'} (runner, minimal); fp32 (DataLoader)")
    print("runner overrides: " + " ".join(overrides), flush=True)

    from runner.spec import validate
    spec = validate(cfg)
    data = spec.dataset.build(seed=spec.seed, device=device, channels_last=gpu)  # the tensors the runner builds

    results, finals = {}, []
    for r in range(args.rounds):  # the other loops' order alternates between rounds
        times, final = bench_round(cfg, data, device, args, gpu, reverse=r % 2 == 1)
        finals.append(final)
        for k, v in times.items():
            results.setdefault(k, []).extend(v)
            print(f"  round {r + 1} {k:<10} " + " ".join(f"{t:.3f}" for t in v), flush=True)

    print(f"load average at the end: {load()} (on {os.cpu_count()} cores)")
    med = {k: statistics.median(v) for k, v in results.items()}
    low = {k: min(v) for k, v in results.items()}

    def paired(a: str, b: str) -> float:
        """Median over the timed epochs of a's epoch k / b's epoch k (run seconds apart: load largely cancels)."""
        return statistics.median(x / y for x, y in zip(results[a], results[b]))

    names = {"runner": "(a) runner: `train(build(spec))`",
             "minimal": "(b) minimal loop, device data + crop_flip",
             "dataloader": f"(c) DataLoader ({args.workers} workers) + torchvision, fp32"}
    print()
    print(f"| pipeline | s/epoch (median of {len(results['runner'])}) | images/s | / minimal | "
          f"/ minimal (paired) | s/epoch (min) |")
    print("|---|---|---|---|---|---|")
    for k in results:
        print(f"| {names[k]} | {med[k]:.3f} | {args.size / med[k]:,.0f} | {med[k] / med['minimal']:.3f} | "
              f"{paired(k, 'minimal'):.3f} | {low[k]:.3f} |")
    print()
    kind = device.type
    out = {"hardware": hw, "args": vars(args), "epoch_s": results, "median_s": med, "min_s": low}
    final = statistics.median(finals)
    print(f"runner's final epoch (evaluated, not used; its time/epoch_s leaves the evaluation out): median "
          f"{final:.3f} s")
    r = med["runner"] / med["minimal"]
    t = TARGET_RUNNER[kind]
    print(f"runner / minimal     = {r:.3f}  (ratio of medians; target <= {t:.2f} on {kind}: "
          f"{'PASS' if r <= t else 'FAIL'}) | paired {paired('runner', 'minimal'):.3f} | "
          f"of the minima {low['runner'] / low['minimal']:.3f}")
    out["runner_over_minimal"] = r
    if "dataloader" in med:
        r = med["dataloader"] / med["runner"]
        t = TARGET_LOADER.get(kind)
        verdict = f"target >= {t:.0f} on {kind}: {'PASS' if r >= t else 'FAIL'}" if t else f"no target on {kind}"
        print(f"DataLoader / runner  = {r:.3f}  (ratio of medians; {verdict}) | paired "
              f"{paired('dataloader', 'runner'):.3f} | of the minima {low['dataloader'] / low['runner']:.3f}")
        out["dataloader_over_runner"] = r
    return out


if __name__ == "__main__":
    main()
