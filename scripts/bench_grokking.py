"""Benchmark: the four grokking experiments (Prieto et al. 2025) - steps to 95% test accuracy and ms per step,
the runner against a minimal hand-written full-batch loop.

Claim
    The grokking presets reproduce the paper's picture: ⊥AdamW reaches 95% test accuracy within a few hundred
    full-batch steps, AdamW with weight decay later, AdamW without weight decay never (it memorizes into softmax
    collapse), StableMax without weight decay only after tens of thousands of steps (a GPU run). The runner's step
    costs no more than a minimal hand-written loop's: runner / minimal <= 1.10, evaluations excluded.

How it is measured (one process; per experiment, the same composed config for both loops)
    (a) runner: `+experiment=<name>` composed with Hydra's compose API from conf/ (logger=none,
        trainer.progress=false, trainer.checkpoint_every=0, trainer.device, seed; trainer.steps capped at
        --max-steps when given), validated, built by `runner.experiment.build` and trained by `runner.train.train`
        (the loop `python -m runner` runs) with a sink that keeps the records in memory. Steps to 95%: the first
        record (every trainer.eval_every_steps) with test/acc >= 0.95. Wall time: around `train()`, after a
        10-step warm-up run of the same config (first-call costs are paid there). ms/step all in: wall / steps,
        evaluations and the grokking diagnostics at the preset's cadence included. The cost of one evaluation
        (ms/eval) is timed apart by calling the loop's own evaluation callbacks 5 times on the trained experiment.
    (b) minimal: the same config built again (the same seeded initial weights, the same objective and optimizer
        classes), the full training split's inputs and targets as two device tensors, and per step: a randperm
        of the full batch (the runner and the paper's loop shuffle it every step), zero_grad, forward, the
        objective, backward, `optimizer.step(closure)` with a plain closure. No metrics, no schedule, no
        StepClosure, no callbacks. 10 warm-up steps, then --timing-steps timed (synchronized on CUDA).
    Side by side: --rounds blocks of --timing-steps steps of each loop, alternating which goes first; a runner
    block is a `train()` of --timing-steps steps with its one evaluation's cost taken off. runner / minimal: the
    ratio of the median ms/step; paired: the median of the blocks' ratios.

Hardware
    Printed at the top: torch version, device name, CPU model, cores, torch threads, load average.
    Results are recorded in docs/benchmarks.md with the card and the date.

Usage
    .venv/bin/python scripts/bench_grokking.py                          # CPU: every preset capped at 2000 steps
    .venv/bin/python scripts/bench_grokking.py --quick                  # smoke test: 60 steps each
    python scripts/bench_grokking.py --device cuda --max-steps 0        # GPU: the presets' full length
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import cpu_name, load  # noqa: E402

EXPERIMENTS = ["grok_orthograd", "grok_adamw_wd", "grok_adamw", "grok_stablemax"]
TARGET = 0.95


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--experiments", nargs="+", default=EXPERIMENTS, choices=EXPERIMENTS)
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap on trainer.steps (default: 2000 on CPU, none on CUDA; 0 = no cap)")
    p.add_argument("--timing-steps", type=int, default=200, help="steps in each timed block of either loop")
    p.add_argument("--rounds", type=int, default=3, help="timed blocks of each loop, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 60 steps, 20 timed")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.max_steps, args.timing_steps, args.rounds = 60, 20, 2
    if args.max_steps is None:
        args.max_steps = 0 if args.device.startswith("cuda") else 2000
    if args.max_steps < 0 or args.timing_steps < 1 or args.rounds < 1:
        p.error("--max-steps must be >= 0, --timing-steps and --rounds >= 1")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose(name: str, args, steps: int | None = None):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"+experiment={name}", "logger=none", "trainer.progress=false", "trainer.checkpoint_every=0",
                 f"trainer.device={args.device}", f"seed={args.seed}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    if steps is not None:   # a timing block: one evaluation, at its end
        cfg.trainer.steps = cfg.trainer.eval_every_steps = steps
    elif args.max_steps:
        cfg.trainer.steps = min(cfg.trainer.steps, args.max_steps)
    cfg.trainer.eval_every_steps = min(cfg.trainer.eval_every_steps, cfg.trainer.steps)
    return cfg


class MemorySink:
    """The loop's sink for a benchmark: records kept in memory, no checkpoints (they are not the timed work)."""

    def __init__(self):
        self.records = []

    def record(self, record: dict) -> None:
        self.records.append(record)

    def checkpoint(self) -> None:
        """No checkpoint is written: the benchmark never resumes."""

    def best(self) -> None:
        """No best checkpoint either."""


def runner_run(cfg, device: torch.device) -> tuple[list[dict], float, object]:
    """`train()` of the composed config: (records, wall seconds, the trained experiment)."""
    from runner.experiment import build
    from runner.spec import validate
    from runner.train import Progress, train

    experiment = build(validate(cfg), device)
    sink = MemorySink()
    sync(device)
    start = time.perf_counter()
    status = train(experiment, Progress(), sink)
    sync(device)
    wall = time.perf_counter() - start
    if status != "completed":
        raise RuntimeError(f"{cfg.experiment}: the run ended {status}")
    return sink.records, wall, experiment


def evaluation_seconds(experiment, device: torch.device, calls: int = 5) -> float:
    """The median cost of one evaluation as the loop runs it: test metrics and the task's diagnostics."""
    from runner.train import Cadence, Evaluate, autocast_for

    cadence = Cadence(every_steps=1)
    autocast = autocast_for(device, experiment.spec.trainer.precision)
    callbacks = [Evaluate(cadence, experiment.model, autocast), *(make(cadence) for make in experiment.task.callbacks)]
    times = []
    for _ in range(calls + 1):
        sync(device)
        start = time.perf_counter()
        for callback in callbacks:
            callback(experiment, None)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def minimal_ms_per_step(cfg, device: torch.device, steps: int) -> float:
    """(b): the same model, objective and optimizer, a plain full-batch loop; ms per step."""
    from runner.experiment import build
    from runner.spec import validate

    experiment = build(validate(cfg), device)
    model, objective, optimizer = experiment.model, experiment.objective, experiment.optimizer
    split = experiment.task.train
    x, y = split.plain_inputs(torch.arange(split.num_samples, device=split.y.device))
    with_indices = getattr(objective, "needs_indices", False)   # ALDR-KL: the samples' indices
    model.train()

    generator = torch.Generator(device=y.device).manual_seed(0)

    def closure():   # the full batch in a fresh order each step, as the runner and the paper's loop do
        order = torch.randperm(len(y), device=y.device, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = objective(model(x[order]), y[order], **({"indices": order} if with_indices else {}))
        loss.backward()
        return loss

    for _ in range(10):
        optimizer.step(closure)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step(closure)
    sync(device)
    return (time.perf_counter() - start) / steps * 1000


def bench(name: str, args, device: torch.device) -> dict:
    runner_run(compose(name, args, steps=10), device)               # warm-up: first-call costs
    cfg = compose(name, args)
    records, wall, experiment = runner_run(cfg, device)
    steps, every = cfg.trainer.steps, cfg.trainer.eval_every_steps
    evaluations = sum(1 for r in records if "test/acc" in r)
    eval_s = evaluation_seconds(experiment, device)
    reached = next((r["step"] for r in records if r.get("test/acc", 0) >= TARGET), None)
    last = records[-1]
    # the step cost side by side: --rounds blocks of --timing-steps steps of each loop, alternating which goes
    # first; a runner block evaluates once (at its end), and that evaluation's cost is taken off
    timed = compose(name, args, steps=args.timing_steps)
    runner_ms, minimal_ms = [], []
    for round_ in range(args.rounds):
        for which in (("runner", "minimal") if round_ % 2 == 0 else ("minimal", "runner")):
            if which == "runner":
                _, block, _ = runner_run(timed, device)
                runner_ms.append(max(block - eval_s, 0.0) / args.timing_steps * 1000)
            else:
                minimal_ms.append(minimal_ms_per_step(timed, device, args.timing_steps))
    runner, minimal = statistics.median(runner_ms), statistics.median(minimal_ms)
    paired = statistics.median(a / b for a, b in zip(runner_ms, minimal_ms))
    return {"experiment": name, "steps": steps, "eval_every_steps": every, "evaluations": evaluations,
            "steps_to_95": reached, "final_train_acc": last.get("train/acc"), "final_test_acc": last.get("test/acc"),
            "final_softmax_collapse": last.get("train/softmax_collapse"),
            "runner_ms_per_step_all_in": wall / steps * 1000, "evaluation_ms": eval_s * 1000,
            "runner_ms_per_step": runner, "minimal_ms_per_step": minimal, "runner_over_minimal": runner / minimal,
            "paired_ratio": paired}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # the presets are float32: no TF32 matmuls either
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} | device {name} | cpu {cpu_name()} | threads {torch.get_num_threads()} | "
          f"load {load()}")
    results = []
    header = (f"{'experiment':<16} {'steps':>6} {'to 95%':>7} {'train acc':>9} {'test acc':>8} {'collapse':>8} "
              f"{'ms/step all-in':>14} {'ms/eval':>8} {'ms/step':>8} {'minimal':>8} {'ratio':>6} {'paired':>6}")
    print(header)
    for experiment in args.experiments:
        r = bench(experiment, args, device)
        results.append(r)
        to95 = str(r["steps_to_95"]) if r["steps_to_95"] is not None else f">{r['steps']}"
        fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
        print(f"{experiment:<16} {r['steps']:>6} {to95:>7} {fmt(r['final_train_acc']):>9} "
              f"{fmt(r['final_test_acc']):>8} {fmt(r['final_softmax_collapse']):>8} "
              f"{r['runner_ms_per_step_all_in']:>14.2f} {r['evaluation_ms']:>8.2f} {r['runner_ms_per_step']:>8.2f} "
              f"{r['minimal_ms_per_step']:>8.2f} {r['runner_over_minimal']:>6.2f} {r['paired_ratio']:>6.2f}", flush=True)
    print(f"load at the end {load()}; ratio = median runner ms/step (its evaluation excluded) / median minimal "
          f"ms/step over {args.rounds} alternating blocks of {args.timing_steps} steps; paired = median of the "
          f"blocks' ratios; target <= 1.10")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
