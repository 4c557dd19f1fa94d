"""SIGTERM and Ctrl-C at every phase of a command: one true line, the right exit code, and on disk either a record
that says `interrupted` or nothing at all; the same command then resumes (or starts) the run.

Deterministic: a `sitecustomize` in the subprocess sends the signal to the process itself when a named function is
entered (or a named module is first imported), so each phase is hit exactly, however loaded the machine is.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env, runner_process

TINY = ("model.hidden=[16]", "trainer.progress=false", "logger=none")

HOOK = '''
import importlib, os, signal, sys

target, signame = os.environ["SIGNAL_AT"], os.environ.get("SIGNAL_NAME", "SIGTERM")
signum = getattr(signal, signame)
nth, calls = int(os.environ.get("SIGNAL_CALL", "1")), [0]  # the signal on the nth entry (e.g. between two runs)

def fire():
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signum)

if target.startswith("import:"):  # the first import of a module: the middle of start-up
    name = target.split(":", 1)[1]

    class Finder:
        def find_spec(self, fullname, path=None, target=None):
            if fullname == name:
                sys.meta_path.remove(self)
                fire()
            return None

    sys.meta_path.insert(0, Finder())
else:  # module:Class.function or module:function, wrapped to signal on entry
    module_name, qualname = target.split(":")

    def patch():
        module = importlib.import_module(module_name)
        owner, attr = module, qualname
        if "." in qualname:
            owner_name, attr = qualname.split(".")
            owner = getattr(module, owner_name)
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            fire()
            return original(*args, **kwargs)

        setattr(owner, attr, wrapper)

    class Finder:  # patch once the module is imported by the runner itself (imports stay in their order)
        def find_spec(self, fullname, path=None, target=None):
            if fullname in ("runner.app", "runner.analyze"):  # imported after the command's signal handlers
                sys.meta_path.remove(self)
                patch()
            return None

    sys.meta_path.insert(0, Finder())
'''


def run_with_signal(tmp_path: Path, at: str, *args, name: str = "SIGTERM", call: int = 1,
                    module: str = "runner") -> subprocess.CompletedProcess:
    """`python -m <module> *args` whose `call`-th entry into `at` (module:function, or import:module) sends it the
    signal `name`."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = cli_env(tmp_path, SIGNAL_AT=at, SIGNAL_NAME=name, SIGNAL_CALL=str(call))
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


# (where the signal arrives, extra args, what the line says, what is left on disk)
NOTHING = "nothing was recorded"
PHASES = {
    "imports": ("import:torch", (), NOTHING, None),
    "pre-check": ("runner.cli:validate_jobs", (), NOTHING, None),
    "hydra-start-up": ("hydra.core.utils:_save_config", (), NOTHING, None),
    "validation": ("runner.run:check_environment", (), NOTHING, None),
    "data-and-model-build": ("runner.run:build", (), NOTHING, None),
    "first-epoch": ("runner.run:train", (), "recorded as interrupted", "interrupted"),
    "checkpoint-write": ("runner.rundir:RunDir.save_checkpoint", (), "recorded as interrupted", "interrupted"),
    "final-analyses": ("runner.run:analyze", ("analysis=sharpness", "analysis.sharpness.samples=64",
                                              "analysis.sharpness.ascent_steps=1"), "recorded as interrupted",
                       "interrupted"),
    "summary-write": ("runner.rundir:RunDir.write_summary", (), "says completed", "completed"),
}


@pytest.mark.slow  # one CLI run per phase (~4 s each) and one rerun where something was recorded
@pytest.mark.parametrize("phase", sorted(PHASES))
def test_a_signal_in_any_phase_says_what_was_recorded(tmp_path, phase):
    at, extra, says, status = PHASES[phase]
    run = tmp_path / "run"
    name = "SIGINT" if phase in ("imports", "checkpoint-write") else "SIGTERM"  # both kinds, in both outcomes
    args = ("trainer.epochs=2", *TINY, *extra, f"hydra.run.dir={run}")
    out = run_with_signal(tmp_path, at, *args, name=name)
    line = one_line(out)
    assert out.returncode == (130 if name == "SIGINT" else 143), out.stderr
    assert line.startswith(f"interrupted ({'Ctrl-C' if name == 'SIGINT' else 'SIGTERM'})") and says in line, line
    if status is None:  # nothing recorded: no folder that looks like a run
        assert not run.exists(), sorted(p.name for p in run.iterdir())
        if phase != "data-and-model-build":  # nothing on disk: the rerun is a first run (checked once, the latest)
            return
    else:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == status, summary
    again = runner_process(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_signal_while_resuming_leaves_the_record_as_it_was(tmp_path):
    run = tmp_path / "run"
    args = ("trainer.epochs=3", *TINY, f"hydra.run.dir={run}")
    first = run_with_signal(tmp_path, "runner.rundir:RunDir.save_checkpoint", *args)
    assert first.returncode == 143, first.stderr
    before = (run / "summary.json").read_text()
    resuming = run_with_signal(tmp_path, "runner.run:_build_and_resume", *args)
    assert resuming.returncode == 143 and "recorded as interrupted" in one_line(resuming), resuming.stderr
    assert (run / "summary.json").read_text() == before


@pytest.mark.slow
def test_a_signal_in_a_sweep_counts_the_jobs_and_leaves_no_half_made_folder(tmp_path):
    out = run_with_signal(tmp_path, "runner.run:build", "-m", "seed=0,1", "trainer.epochs=1", *TINY)
    assert out.returncode == 143, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted (SIGTERM): the sweep stopped") and "1 not started" in line, out.stderr
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "multirun").rglob("seed=*"))
