"""Benchmark: the analysis instruments (loss-landscape grids, Hessian-vector products, Lanczos) against the plain
passes they are made of, and against the naive way of computing a landscape.

Claims (targets; timings are printed and judged here, never asserted by a test)
    1. Grid evaluation: the time per grid point of `landscape_2d` on an n x n grid over S evaluation samples is
       at most 1.15x the time of ONE plain evaluation forward pass over the same S samples (same batch size).
       Ours: subsets resident on the device, one host sync at the end of the whole grid, the probe's autocast
       (experiment.autocast(): bf16 on CUDA, fp32 on CPU), and several points per vmapped forward for small models.
    2. The naive way (tomgoldstein/loss-landscape): for each point, copy w + a d1 + b d2 into the module's
       parameters (`p.data.copy_`), evaluate with a plain loop that calls `.item()` per batch, in fp32 (as the
       reference does); restore the weights afterwards. Reported: naive / ours per point (no target).
    3. HVP: one Hessian-vector product (`curvature.hvp_function`, forward-over-reverse) over B samples is at most
       3.5x one forward+backward over the same B samples (training-style `loss.backward()`). Double backward
       (Pearlmutter) is timed too, with ours / double backward.
    4. Lanczos: 20 iterations (`curvature.top_eigenvalues(iterations=20)`) over B samples in <= 6 s on an H100 with
       ResNet-18 and B = 2048.
    5. A 51 x 51 grid over 10k samples in <= 60 s on an H100 with ResNet-18 (the naive way took 137 s there, and
       the forward-pass floor is ~36 s). Printed as measured with --grid 51 --samples 10000, else projected from the
       per-point time (x 2601).

How it is measured (one process, one model, the same evaluation subsets for all)
    The experiment is built as `python -m runner` builds it: Hydra compose of conf/ (logger=none, dataset=<...>,
    model=<...>, trainer.device), `runner.spec.validate`, `runner.experiment.build`. The model is left at its
    seeded initialization (speed, not accuracy). Evaluation subsets: `probe.evaluation_sets(task, S, seed=0,
    batch_size, splits=("train",))` for the grid, and the same with B samples for the curvature passes.
    - plain forward: `model(x)` in eval mode under the probe's autocast, summed cross-entropy + correct count on the
      device per batch, one host sync at the end (what `runner.train.evaluate` does). `Probe.sums` at the centre
      (functional_call) is timed too.
    - ours: `landscape_2d(probe, probe.params, d1, d2, sets, xs, ys)` with filter-normalized random directions
      (seeds 0 and 1), xs = ys = linspace(-1, 1, n), points_per_batch = --points-per-batch (default: the automatic
      choice); the whole call is timed (including its final host sync) and divided by n^2.
    - naive: --naive-points points of the same grid, each timed on its own (weights copied in, evaluated, the
      per-batch `.item()`s); the weights are restored by copy at the end and checked bitwise.
    - forward+backward: `F.cross_entropy(model(x), y) * len(y) / B` then `.backward()` per batch (eval mode, fp32,
      like the HVP: BatchNorm with running statistics), gradients reset to None afterwards.
    - HVPs: `hvp_function(Probe(model), params, data, method=...)` (no autocast: curvature is computed in fp32) on
      a fixed Gaussian vector.
    - Lanczos: `top_eigenvalues(hvp, params, k=1, iterations=20)` with the forward-over-reverse HVP, wall time.
    Every measurement is warmed up once first. On CUDA every timed call starts and ends with a synchronize. Each
    repeat (--repeats, default 3) times every measurement once, in the same order, so all of them see the same
    machine state; short ones are called several times per repeat (each call synchronized on its own, until
    0.3 s have passed). Reported: medians over all calls; the headline ratios are ratios of these medians (judged
    against the targets); also printed: the paired ratio (the median over the repeats of the ratio within one
    repeat: load from other processes largely cancels) and the ratio of the minima. Lanczos is timed
    --lanczos-repeats times (default 1: it is itself 20 HVPs), after the repeats.

Usage
    .venv/bin/python scripts/bench_analysis.py                              # mlp on digits, 11x11 grid, S=1024
    .venv/bin/python scripts/bench_analysis.py --model cnn
    .venv/bin/python scripts/bench_analysis.py --model resnet18 --width 16 --samples 256 --grid 5   # CPU-sized
    python scripts/bench_analysis.py --model resnet18 --grid 51 --samples 10000 --hvp-samples 2048   # H100 targets
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGET_GRID = 1.15        # grid time per point / one plain evaluation forward pass, at most
TARGET_HVP = 3.5          # forward-over-reverse HVP / forward+backward, at most
TARGET_LANCZOS_S = 6.0    # 20 Lanczos iterations, H100, ResNet-18, B = 2048, at most
TARGET_GRID51_S = 60.0    # 51 x 51 grid over 10k samples, H100, ResNet-18, at most
REFERENCE_GRID51 = {"naive": 137.0, "floor": 36.0}  # measured on an H100 (ResNet-18, 10k samples), for comparison


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn", "resnet18"))
    p.add_argument("--dataset", default=None, choices=("digits", "synthetic"),
                   help="default: digits for mlp/cnn, synthetic for resnet18")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--grid", type=int, default=11, help="n: the grid is n x n points")
    p.add_argument("--samples", type=int, default=1024, help="S: evaluation samples per grid point")
    p.add_argument("--hvp-samples", type=int, default=512, help="B: samples of the HVP / Lanczos loss")
    p.add_argument("--batch-size", type=int, default=512, help="evaluation batch size (grid, forward, HVP)")
    p.add_argument("--repeats", type=int, default=3, help="each measurement this many times; the median is used")
    p.add_argument("--naive-points", type=int, default=9, help="points the naive way is timed on (per point)")
    p.add_argument("--lanczos-iterations", type=int, default=20)
    p.add_argument("--lanczos-repeats", type=int, default=1)
    p.add_argument("--points-per-batch", type=int, default=None,
                   help="landscape_2d's points_per_batch (default: its automatic choice)")
    p.add_argument("--width", type=int, default=None, help="resnet18 width (default: the config's, 64)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.dataset = args.dataset or ("synthetic" if args.model == "resnet18" else "digits")
    if args.width is not None and args.model != "resnet18":
        p.error("--width is for --model resnet18")
    if min(args.grid, args.samples, args.hvp_samples, args.batch_size, args.repeats, args.naive_points,
           args.lanczos_iterations, args.lanczos_repeats) < 1:
        p.error("sizes and counts must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------ helpers
from bench_train import cpu_name, load  # noqa: E402  (scripts/ is on sys.path when run as a script)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call of `fn`, synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed_calls(fn, device: torch.device, min_s: float = 0.3, max_calls: int = 20) -> list[float]:
    """One call, then more (each synchronized on its own) until `min_s` have passed or `max_calls` were made."""
    times = [timed(fn, device)]
    while sum(times) < min_s and len(times) < max_calls:
        times.append(timed(fn, device))
    return times


def build_experiment(args, device: torch.device):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runner.experiment import build
    from runner.spec import validate

    overrides = [f"dataset={args.dataset}", f"model={args.model}", "logger=none", "trainer.progress=false",
                 f"trainer.device={device}", f"seed={args.seed}"]
    if args.dataset == "synthetic":  # only as many images as the subsets need (the test split is a fifth)
        overrides.append(f"dataset.synthetic_size={max(args.samples, args.hvp_samples, 5)}")
    if args.width is not None:
        overrides.append(f"model.width={args.width}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return build(validate(cfg), device), overrides


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def verdict(value: float, target: float | None, applies: bool = True) -> str:
    if target is None:
        return "no target"
    if not applies:
        return "target not applicable here"
    return "PASS" if value <= target else "FAIL"


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    from runner.analysis import curvature, landscape
    from runner.analysis.probe import Probe, evaluation_sets, modes
    from runner.experiment import resolve_device
    from runner.losses import measured_loss

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    experiment, overrides = build_experiment(args, device)  # seeds, and sets TF32/cudnn.benchmark on CUDA
    model = experiment.model
    model.eval()
    live = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in live)
    probe = Probe(model, experiment.autocast())     # the landscape's probe (autocast as in training)
    exact = Probe(model)                             # curvature: fp32, no autocast
    autocast = experiment.autocast()
    precision = "bf16 autocast" if not isinstance(autocast, contextlib.nullcontext) else "fp32"

    sets = evaluation_sets(experiment.task, args.samples, args.seed, args.batch_size, splits=("train",))
    data = sets["train"]
    hdata = evaluation_sets(experiment.task, args.hvp_samples, args.seed, args.batch_size, splits=("train",))["train"]
    S, B, n = len(data), len(hdata), args.grid

    print(f"# bench_analysis  {time.strftime('%Y-%m-%d %H:%M')}")
    name = torch.cuda.get_device_name(device) if gpu else f"cpu ({cpu_name()}, {os.cpu_count()} cores)"
    print(f"torch {torch.__version__} (python {platform.python_version()}); device {device}: {name}; "
          f"torch threads {torch.get_num_threads()}; load average {load()}")
    print(f"model={args.model} ({n_params:,} trainable parameters in {len(live)} tensors) dataset={args.dataset} "
          f"precision of the grid and forward: {precision}; curvature: fp32")
    print(f"grid {n}x{n} over S={S} samples, HVP/Lanczos over B={B} samples, batch {args.batch_size}, "
          f"repeats {args.repeats} (median)")
    print("overrides: " + " ".join(overrides), flush=True)
    if S < args.samples or B < args.hvp_samples:
        print(f"note: the train split has fewer samples than asked (S={S}, B={B})")

    # directions and grid
    d1 = landscape.random_direction(probe.params, args.seed)
    d2 = landscape.second_direction(probe.params, args.seed)
    xs = np.linspace(-1.0, 1.0, n)
    per = (args.points_per_batch if args.points_per_batch is not None
           else landscape._auto_points_per_batch(probe.params, sets, n * n))
    per = min(per, n * n)
    print(f"points per vmapped forward: {per} ({'given' if args.points_per_batch else 'automatic'}"
          f"{'; 1 = the point-by-point loop' if per == 1 else ''})", flush=True)

    # ---- the measurements
    def plain_forward():
        loss = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        with torch.no_grad():
            for x, y in data.batches():
                with autocast:
                    logits = model(x)
                loss += measured_loss(logits.float(), y, reduction="sum")
                correct += (logits.argmax(1) == y).sum()
        return torch.stack([loss.double(), correct.double()]).tolist()  # one host sync, as runner.train.evaluate

    def probe_centre():
        loss, correct = probe.sums(probe.params, data)
        return torch.stack([loss.double(), correct.double()]).tolist()

    grid_warnings: list[str] = []

    def grid(ys=xs, points_per_batch=args.points_per_batch):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = landscape.landscape_2d(probe, probe.params, d1, d2, sets, xs, ys,
                                         points_per_batch=points_per_batch)
        grid_warnings.extend(str(w.message) for w in caught)
        return out

    saved = [p.detach().clone() for p in live]  # the naive way writes into the live parameters
    coeffs = [(a, b) for b in xs for a in xs]
    picks = [coeffs[round(i * (len(coeffs) - 1) / max(args.naive_points - 1, 1))]
             for i in range(min(args.naive_points, len(coeffs)))]

    def naive_point(a: float, b: float):
        """tomgoldstein/loss-landscape: set_weights (w + a d1 + b d2 into p.data), eval_loss with .item() per batch,
        fp32 (no autocast)."""
        with torch.no_grad():
            for p, w, u, v in zip(live, saved, d1, d2):
                p.data.copy_(w + a * u + b * v)
        total_loss, correct, total = 0.0, 0, 0
        with torch.no_grad():
            for x, y in data.batches():
                outputs = model(x)
                total_loss += F.cross_entropy(outputs, y).item() * len(y)
                correct += outputs.argmax(1).eq(y).sum().item()
                total += len(y)
        return total_loss / total, correct / total

    def naive_restore():
        with torch.no_grad():
            for p, w in zip(live, saved):
                p.data.copy_(w)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        with modes(model, training=False), torch.enable_grad():
            for x, y in hdata.batches():
                (F.cross_entropy(model(x).float(), y) * (len(y) / B)).backward()
        model.zero_grad(set_to_none=True)

    hvp_for = curvature.hvp_function(exact, exact.params, hdata, method="forward_over_reverse")
    hvp_db = curvature.hvp_function(exact, exact.params, hdata, method="double_backward")
    vec = landscape.random_direction(exact.params, args.seed + 7, normalization="none", ignore_vectors=False)

    def lanczos():
        return curvature.top_eigenvalues(hvp_for, exact.params, k=1, iterations=args.lanczos_iterations,
                                          seed=args.seed)

    # warm-up: every measurement once (the grid on enough rows for one full chunk of points)
    rows = min(n, max(1, math.ceil(per / n)))
    plain_forward()
    probe_centre()
    grid(xs[:rows], per)
    naive_point(*picks[0])
    naive_restore()
    forward_backward()
    hvp_for(vec)
    hvp_db(vec)
    sync(device)

    t = {k: [] for k in ("forward", "probe", "grid", "naive", "fwd_bwd", "hvp", "double_backward", "lanczos")}
    per_repeat = {k: [] for k in t}  # the median of each measurement within each repeat, for paired ratios
    check = None
    try:
        for r in range(args.repeats):
            holder = {}
            got = {
                "forward": timed_calls(plain_forward, device),
                "probe": timed_calls(probe_centre, device),
                "grid": [timed(lambda: holder.setdefault("out", grid()), device) / (n * n)],
                "naive": [timed(lambda: naive_point(a, b), device) for a, b in picks],
            }
            naive_restore()
            got["fwd_bwd"] = timed_calls(forward_backward, device)
            got["hvp"] = timed_calls(lambda: hvp_for(vec), device, max_calls=5)
            got["double_backward"] = timed_calls(lambda: hvp_db(vec), device, max_calls=5)
            check = holder["out"]
            for k, v in got.items():
                t[k] += v
                per_repeat[k].append(statistics.median(v))
            print(f"  repeat {r + 1}: " + ", ".join(f"{k} {fmt_s(per_repeat[k][-1])}" for k in got)
                  + f" (grid and naive: per point); load {load()}", flush=True)
    finally:
        naive_restore()  # also when something above raised
    restored = all(torch.equal(p, w) for p, w in zip(live, saved))
    lanczos_out = None
    for _ in range(args.lanczos_repeats):
        holder = {}
        t["lanczos"].append(timed(lambda: holder.setdefault("out", lanczos()), device))
        lanczos_out = holder["out"]
    print(f"load average at the end: {load()}")
    if not restored:
        raise RuntimeError("the naive way did not restore the weights exactly")

    # sanity: the grid's centre is the plain forward's loss (same precision)
    centre = check["train_loss"][n // 2, n // 2] if n % 2 else None
    plain = plain_forward()[0] / S

    med = {k: statistics.median(v) for k, v in t.items() if v}
    ratio_grid = med["grid"] / med["forward"]

    def paired(a: str, b: str) -> float:
        """The median over the repeats of a / b within the same repeat (timed seconds apart: load largely cancels)."""
        return statistics.median(x / y for x, y in zip(per_repeat[a], per_repeat[b]))

    ratio_paired = paired("grid", "forward")
    ratio_min = min(t["grid"]) / min(t["forward"])
    ratio_naive = med["naive"] / med["grid"]
    ratio_hvp = med["hvp"] / med["fwd_bwd"]
    ratio_db = med["double_backward"] / med["fwd_bwd"]
    ratio_hvp_db = med["hvp"] / med["double_backward"]
    h100_resnet = gpu and "H100" in name and args.model == "resnet18" and args.width in (None, 64)
    lanczos_applies = h100_resnet and B == 2048 and args.lanczos_iterations == 20
    grid51_applies = h100_resnet and S == 10000

    P = 51 * 51
    grid51 = med["grid"] * P
    measured51 = n == 51
    na = "n/a"
    rows = [
        (f"plain evaluation forward, S={S} (`model(x)`, batch {args.batch_size})", med["forward"], "1", "", "", ""),
        ("`Probe.sums` at the centre (functional_call)", med["probe"], f"{med['probe'] / med['forward']:.3f}",
         f"{paired('probe', 'forward'):.3f}", "", ""),
        (f"`landscape_2d` {n}x{n}, per point ({per} pt/forward)", med["grid"], f"{ratio_grid:.3f}",
         f"{ratio_paired:.3f}", f"<= {TARGET_GRID}", verdict(ratio_grid, TARGET_GRID)),
        (f"naive per point (`p.data.copy_`, `.item()` per batch, fp32; {len(picks)} points)", med["naive"],
         f"naive/ours {ratio_naive:.2f}", f"{paired('naive', 'grid'):.2f}", "", ""),
        (f"forward+backward, B={B} (`loss.backward()`, fp32)", med["fwd_bwd"], "1", "", "", ""),
        (f"HVP forward-over-reverse, B={B}", med["hvp"], f"{ratio_hvp:.3f}", f"{paired('hvp', 'fwd_bwd'):.3f}",
         f"<= {TARGET_HVP}", verdict(ratio_hvp, TARGET_HVP)),
        (f"HVP double backward, B={B}", med["double_backward"], f"{ratio_db:.3f}",
         f"{paired('double_backward', 'fwd_bwd'):.3f}", "", ""),
        ("forward-over-reverse / double backward", None, f"{ratio_hvp_db:.3f}",
         f"{paired('hvp', 'double_backward'):.3f}", "", ""),
        (f"Lanczos, {args.lanczos_iterations} iterations, B={B}", med["lanczos"], na, na,
         f"<= {TARGET_LANCZOS_S:.0f} s (H100, ResNet-18, B=2048)",
         verdict(med["lanczos"], TARGET_LANCZOS_S, lanczos_applies)),
        (f"51x51 grid, S={S}, {'measured' if measured51 else 'projected'} (floor {fmt_s(med['forward'] * P)}, "
         f"naive {fmt_s(med['naive'] * P)})", grid51, na, na, f"<= {TARGET_GRID51_S:.0f} s (H100, ResNet-18, S=10k)",
         verdict(grid51, TARGET_GRID51_S, grid51_applies)),
    ]
    print()
    print("| measurement | time (median) | ratio (of medians) | paired | target | verdict |")
    print("|---|---|---|---|---|---|")
    for label, seconds, ratio, pair, target, judged in rows:
        print(f"| {label} | {fmt_s(seconds) if seconds is not None else ''} | {ratio} | {pair} | {target} | {judged} |")
    print()
    print(f"grid per point / plain forward = {ratio_grid:.3f} (target <= {TARGET_GRID}; ratio of medians) | paired "
          f"{ratio_paired:.3f} | of the minima {ratio_min:.3f}")
    print(f"points: {n * n}; "
          f"Probe.sums / plain forward = {med['probe'] / med['forward']:.3f}; naive / ours = {ratio_naive:.2f}")
    print(f"HVP (forward-over-reverse) / forward+backward = {ratio_hvp:.3f} (target <= {TARGET_HVP}) | paired "
          f"{paired('hvp', 'fwd_bwd'):.3f} | of the minima {min(t['hvp']) / min(t['fwd_bwd']):.3f}")
    print(f"double backward / forward+backward = {ratio_db:.3f} | paired {paired('double_backward', 'fwd_bwd'):.3f}; "
          f"ours / double backward = {ratio_hvp_db:.3f} | paired {paired('hvp', 'double_backward'):.3f}")
    print(f"Lanczos: {fmt_s(med['lanczos'])} for {lanczos_out['iterations']} iterations "
          f"(lambda_max {lanczos_out['lambda_max']:.4g}, lambda_min {lanczos_out['lambda_min']:.4g})")
    print(f"51x51 grid over {S} samples: {'measured' if measured51 else 'projected (per point x 2601)'} "
          f"{grid51:.1f} s; forward-pass floor {med['forward'] * P:.1f} s; naive {med['naive'] * P:.1f} s "
          f"(H100 reference, ResNet-18, 10k: naive {REFERENCE_GRID51['naive']:.0f} s, floor "
          f"~{REFERENCE_GRID51['floor']:.0f} s, target <= {TARGET_GRID51_S:.0f} s)")
    if centre is not None:
        print(f"check: grid centre loss {centre:.6f}, plain forward loss {plain:.6f}")
    print(f"weights restored bitwise after the naive way: {restored}")
    for message in sorted(set(grid_warnings)):
        print(f"landscape warning: {message}")
    return {"median_s": med, "grid_over_forward": ratio_grid, "grid_over_forward_paired": ratio_paired,
            "naive_over_ours": ratio_naive,
            "hvp_over_fwd_bwd": ratio_hvp, "hvp_over_double_backward": ratio_hvp_db, "points_per_batch": per,
            "grid51_s": grid51, "params": n_params}


if __name__ == "__main__":
    main()
