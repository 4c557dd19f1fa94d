"""The limits of validation (issue 20, part B): no inf or nan where a number is meant, every message naming its
full key, checks that fit the inputs (TRAM's input noise), and a sweep's pre-flight that checks every job
however many there are, composing each distinct config once."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

from runner.config import ConfigError, structured

try:
    from tests.conftest import runner_process
except ImportError:
    from conftest import runner_process

#: Float fields where inf or nan means something (a documented "inf = none"), with the reason. None does: every
#: optional bound is `null` when absent (tram.rho_max, trainer.grad_clip, sharpness.adaptive_rho).
NON_FINITE_ALLOWED: dict[str, str] = {}


def one_line_error(out) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------ inf and nan

def _floats(annotation) -> str | None:
    """'float' or 'list' for a float field (optional or not), else None."""
    if annotation is float:
        return "float"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (list, typing.List) and args and args[0] is float:
        return "list"
    return next((kind for a in args if a is not type(None) and (kind := _floats(a))), None)


def float_fields():
    """(full key, schema, kind, default, validate(node)) for every float field of every registry entry and of
    the trainer."""
    from runner.analysis import ANALYSES
    from runner.spec import registries
    from runner.train import TrainerConfig

    def fields(schema):
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            kind = _floats(hints[f.name])
            if kind:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                yield f.name, kind, default

    for group, registry in {**registries(), "analysis": ANALYSES}.items():
        for name in registry.names():
            prefix = f"analysis.{name}" if group == "analysis" else group
            for field, kind, default in fields(registry.get(name).schema):
                yield (f"{prefix}.{field}", name, field, kind, default,
                       lambda node, r=registry, n=name, p=prefix: r.validate({"name": n, **node}, prefix=p))
    for field, kind, default in fields(TrainerConfig):
        yield (f"trainer.{field}", "trainer", field, kind, default,
               lambda node: structured(TrainerConfig, node, "trainer"))


def test_every_float_field_of_every_schema_refuses_inf_and_nan():
    """optimizer.rho=inf skipped every step and ended `completed` at chance; lr, weight_decay, poly1's epsilon at
    inf were accepted and diverged. Every float field (optimizers, losses, models, schedulers, datasets, analyses,
    trainer) refuses inf, -inf and nan in one line naming its full key."""
    checked = 0
    for key, option, field, kind, default, validate in float_fields():
        if key in NON_FINITE_ALLOWED:
            continue
        for bad in (math.inf, -math.inf, math.nan):
            value = bad if kind == "float" else [*(default or [0.5])[:-1], bad]  # betas=[0.9, inf]
            with pytest.raises(ConfigError) as e:
                validate({field: value})
            message = str(e.value)
            assert "\n" not in message and f"{key}=" in message and "finite" in message, (option, message)
            checked += 1
    assert checked >= 3 * 150  # every optimizer's lr alone is ~25 fields: the walk found the schemas


def test_a_wrappers_nested_base_names_the_nested_key(compose):
    from runner.spec import validate

    with pytest.raises(ConfigError, match=r"optimizer\.base\.lr=nan"):
        validate(compose(["optimizer=sam", "optimizer.base={name: adamw, lr: nan}"]))
    with pytest.raises(ConfigError, match=r"optimizer\.rho=inf"):  # as the command line spells it
        validate(compose(["optimizer=sam", "optimizer.rho=inf"]))


# ------------------------------------------------------------------------------------------- full keys

def test_subset_and_val_size_errors_name_the_full_key(compose):
    """`n=100000` and `val_size=300` (caught when the data is loaded) named neither dataset key."""
    from runner.spec import validate

    for args, key in ((["dataset.subset=100000"], "dataset.subset=100000"),
                      (["dataset.subset=100", "dataset.val_size=300"], "dataset.val_size=300")):
        spec = validate(compose(args))
        with pytest.raises(ConfigError) as e:
            spec.dataset.build(seed=0, device=torch.device("cpu"))
        assert str(e.value).startswith(f"invalid config: {key} "), str(e.value)


def test_resuming_an_sgd_checkpoint_with_adamw_says_whose_optimizer_state_it_is(compose):
    """It ended with a bare `'step'` (AdamW's load_state_dict meeting SGD's momentum buffers)."""
    from runner.experiment import build
    from runner.spec import validate
    from runner.train import Progress

    tiny = ["model.hidden=[8]"]
    sgd = build(validate(compose(tiny)), torch.device("cpu"))
    batch = next(iter(sgd.task.train))
    sgd.objective(sgd.model(batch.x), batch.y).backward()
    sgd.optimizer.step()  # SGD's state: a momentum buffer per parameter
    adamw = build(validate(compose([*tiny, "optimizer=adamw"])), torch.device("cpu"))
    with pytest.raises(ConfigError) as e:
        adamw.load_state_dict(sgd.state_dict(Progress()), "runs/sgd")
    message = str(e.value)
    assert "\n" not in message and "optimizer state" in message, message
    assert "saved by optimizer=sgd" in message and "does not fit optimizer=adamw" in message, message


# --------------------------------------------------------------------------------- TRAM's input noise

def test_tram_noise_reference_on_token_input_is_refused_in_validation(compose):
    """It was caught only at the first step (a failed run folder, exit 1); the optimizer now declares the inputs
    its step can take (`inputs` capability) and validate() checks them like a model's."""
    from runner.spec import validate

    with pytest.raises(ConfigError) as e:
        validate(compose(["dataset=modular_arithmetic", "optimizer=tram", "optimizer.reference=noise"]))
    message = str(e.value)
    assert "optimizer.reference=noise" in message and "tokens" in message and "\n" not in message, message
    validate(compose(["dataset=modular_arithmetic", "optimizer=tram"]))                   # previous: any input
    validate(compose(["optimizer=tram", "optimizer.reference=noise"]))                    # noise on images


# ------------------------------------------------------------------------------------ sweep pre-flight

@pytest.fixture
def preflight(capsys, monkeypatch):
    """`preflight(argv)`: runner.cli.validate_jobs in-process; its one error line (SystemExit 2), or '' when every
    job passes. The tally's module state (runner.sweep) is this test's own."""
    from runner import sweep
    from runner.cli import validate_jobs

    monkeypatch.setattr(sweep, "_expected_jobs", [])
    monkeypatch.setattr(sweep, "_sweep_dirs", [])

    def _preflight(argv) -> str:
        try:
            validate_jobs(argv)
        except SystemExit as e:
            assert e.code == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            return err
        return ""

    return _preflight


def test_a_sweep_of_zero_jobs_is_refused_in_one_line(tmp_path):
    """It printed `sweep: `, left multirun.yaml and exited 0."""
    out = runner_process(tmp_path, "-m", "seed=range(0,0)", "trainer.progress=false",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "seed=range(0,0)" in one_line_error(out) and "no jobs" in out.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_a_sweep_of_more_than_500_jobs_is_checked_up_front(tmp_path):
    """`seed=range(0,501) optimizer.lr=-1` made 501 failed run folders: the check stopped at 500 jobs."""
    out = runner_process(tmp_path, "-m", "seed=range(0,501)", "optimizer.lr=-1", "trainer.progress=false",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "optimizer.lr=-1" in one_line_error(out)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_big_sweeps_folders_and_tally_are_checked_too(tmp_path, preflight):
    """Beyond 500 jobs the folder collision check and the expected-jobs count (the "lost" tally) ran no more."""
    from runner import sweep

    where = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    line = preflight(["-m", "seed=range(0,251)", "dataset.root=A,B", where])  # 502 jobs
    assert "would share the run folder" in line and "dataset.root" in line
    assert preflight(["-m", "seed=range(0,501)", where]) == ""
    assert sweep._expected_jobs == [501]


def test_each_distinct_config_is_composed_once(tmp_path, preflight, monkeypatch):
    """Seeds share a config: 2 optimizers x 3 seeds compose twice (it was twice per job, 12), and the run
    folders still differ by seed."""
    import hydra

    from runner import cli

    calls, folders = [], []
    real_compose, real_check = hydra.compose, cli.check_folder
    monkeypatch.setattr(hydra, "compose", lambda *a, **k: calls.append(k["overrides"]) or real_compose(*a, **k))
    monkeypatch.setattr(cli, "check_folder", lambda folder, spec, *a: folders.append((folder, spec.seed))
                        or real_check(folder, spec, *a))
    assert preflight(["-m", "optimizer=sgd,adam", "seed=0,1,2", f"hydra.sweep.dir={tmp_path}"]) == ""
    assert len(calls) == 2
    assert len({f for f, _ in folders}) == 6 and all(str(f).endswith(f"seed={s}") for f, s in folders)


def test_a_config_that_uses_the_seed_is_validated_for_each_seed(tmp_path, preflight):
    """Where a value interpolates the seed, seeds are not one config: seed=0 makes batch_size 0."""
    line = preflight(["-m", "seed=1,0", "dataset.batch_size=${seed}", f"hydra.sweep.dir={tmp_path}"])
    assert "dataset.batch_size=0" in line and "seed=0" in line


def test_hydras_sweeper_composes_each_distinct_config_once():
    """Hydra's own up-front check (`validate_batch_is_legal`) composed every job too: 200 seeds, 200 composes
    before the first job started. After the pre-flight it composes one job per config."""
    from types import SimpleNamespace

    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from runner.cli import hydra_composes_each_config_once

    hydra_composes_each_config_once()
    composed = []
    sweeper = BasicSweeper(max_batch_size=None)
    sweeper.config = SimpleNamespace()
    sweeper.hydra_context = SimpleNamespace(config_loader=SimpleNamespace(
        load_sweep_config=lambda master_config, sweep_overrides: composed.append(sweep_overrides)))
    sweeper.validate_batch_is_legal([[f"optimizer={o}", f"seed={s}"] for o in ("sgd", "adam") for s in range(3)])
    assert composed == [["optimizer=sgd", "seed=0"], ["optimizer=adam", "seed=0"]]
