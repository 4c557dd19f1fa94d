"""Shared fixtures: compose configs in-process (Hydra's compose API) and run the real CLI in a subprocess.

`compose(overrides)` returns the config `python -m runner <overrides>` would run (without the `hydra` node
unless asked), so config tests need no subprocess. `run_cli(*args)` runs `python -m runner` for real, in
the test's tmp_path, offline: wandb writes only under tmp_path and never sees a real key.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


# Modules whose wall time is mostly waiting or one long serial test (SLURM's requeue after a time limit, the
# 2-process equivalence of every optimizer, the GPU check's steps on the CPU): collected first, then the others by
# their number of tests, most first. With `-n 3 --dist loadscope --no-loadscope-reorder` (xdist's own reordering
# sorts by test count only) the workers take modules in this order, so the long ones start at once instead of
# ending the suite alone.
START_FIRST = ("test_slurm.py", "test_distributed.py", "test_distributed_failures.py", "test_gpu_check.py")


def pytest_addoption(parser):
    parser.addoption("--claims", action="store_true",
                     help="also run the tests marked `claim`: a paper's finding reproduced at CPU scale (minutes each)")


def pytest_collection_modifyitems(config, items):
    # `claim` tests (a paper's finding at CPU scale, minutes of training) run with --claims only: they are
    # experiments more than tests, and .ci/run runs them after the suite (the suite itself stays under 15 min)
    if not config.getoption("--claims"):
        claims = [item for item in items if item.get_closest_marker("claim")]
        if claims:
            config.hook.pytest_deselected(items=claims)
            items[:] = [item for item in items if not item.get_closest_marker("claim")]
    rank = {name: i for i, name in enumerate(START_FIRST)}
    count: dict = {}
    for item in items:
        count[item.path] = count.get(item.path, 0) + 1
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -count[item.path], str(item.path)))


@pytest.fixture
def compose():
    """`compose(overrides=(), return_hydra_config=False)` -> the composed DictConfig of conf/config.yaml."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(overrides=(), return_hydra_config: bool = False):
        GlobalHydra.instance().clear()  # in case something before left Hydra initialized
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)

    return _compose


def cli_env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a CLI subprocess: the repo importable, wandb offline and confined to tmp_path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WANDB_") and k not in ("HYDRA_FULL_ERROR", "RUNNER_LAUNCH_ID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path / "wandb_dir"),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb_data"), PYTHONUNBUFFERED="1",
               # one intra-op thread: the test models are tiny, and several torch processes spinning on a few
               # shared cores (pytest's pool, other jobs) made a 0.4 s training take 9 s
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def runner_process(tmp_path: Path, *args, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
                   prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m runner *args` (see `run_cli`); usable outside a test function (module fixtures)."""
    args = [str(a) for a in args]
    keys = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a and not a.startswith("-")}
    flags = any(a.startswith("--") for a in args)  # --cfg, --help, ...: Hydra prints and exits
    multirun = "-m" in args or "--multirun" in args
    if not multirun and not flags and "hydra.run.dir" not in keys:
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    if not flags and "logger" not in keys:
        args.append("logger=none")
    if prefix is None:
        return python_m("runner", args, cwd=cwd or tmp_path, env=cli_env(tmp_path, **(env or {})), timeout=timeout)
    return subprocess.run(prefix + args, cwd=str(cwd or tmp_path), env=cli_env(tmp_path, **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------
# `python -m <module> args` through tests/forkserver.py: the same command without re-importing torch each time


def _startup_env(env: dict) -> dict:
    """The variables that change how an interpreter (or torch's thread pools) starts."""
    return {k: v for k, v in env.items()
            if k.startswith("PYTHON") or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}


class _ForkServer:
    """One tests/forkserver.py per pytest process, started on first use, stopped at exit."""

    def __init__(self):
        import atexit
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="runner-forkserver-"))
        self.socket = str(self.folder / "socket")
        self.env = cli_env(self.folder)
        self.log = open(self.folder / "server.err", "w")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkserver.py"), self.socket],
                                     cwd=self.folder, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"tests/forkserver.py did not start: {(self.folder / 'server.err').read_text()[-2000:]}")
        atexit.register(self.stop)

    def usable_for(self, env: dict) -> bool:
        return self.proc.poll() is None and _startup_env(env) == _startup_env(self.env)

    def run(self, module: str, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        import json
        import socket
        import tempfile
        import time

        cmd = [sys.executable, "-m", module, *args]
        fd, out = tempfile.mkstemp(dir=self.folder, suffix=".out")
        os.close(fd)
        err = out[:-4] + ".err"
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.socket)
            conn.sendall((json.dumps({"module": module, "args": args, "cwd": str(cwd), "env": env, "stdout": out,
                                      "stderr": err}) + "\n").encode())
            reader = conn.makefile("r")
            pid = json.loads(reader.readline())["pid"]
            try:
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                returncode = json.loads(reader.readline())["returncode"]
            except (TimeoutError, socket.timeout):
                os.kill(pid, signal.SIGKILL)
                conn.settimeout(60)
                reader.readline()
                raise subprocess.TimeoutExpired(cmd, timeout, self._read(out), self._read(err)) from None
        return subprocess.CompletedProcess(cmd, returncode, self._read(out), self._read(err))

    @staticmethod
    def _read(path: str) -> str:
        text = Path(path).read_text(errors="replace")
        os.unlink(path)
        return text

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


_FORK_SERVER: list[_ForkServer] = []


def python_m(module: str, args, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, module, *args], capture_output=True, text=True)`, forked from tests/forkserver.py
    (imports done once) unless RUNNER_TESTS_FORK=0 or `env` changes how an interpreter starts."""
    args = [str(a) for a in args]
    if os.environ.get("RUNNER_TESTS_FORK", "1") != "0":
        if not _FORK_SERVER or _FORK_SERVER[0].proc.poll() is not None:
            _FORK_SERVER[:] = [_ForkServer()]
        if _FORK_SERVER[0].usable_for(env):
            return _FORK_SERVER[0].run(module, args, Path(cwd), env, timeout)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def run_cli(tmp_path):
    """`run_cli(*args, cwd=tmp_path, env=None, timeout=300, prefix=None)` -> CompletedProcess.

    Runs `python -m runner *args` in a subprocess, in tmp_path, with the repo on PYTHONPATH. Adds
    `hydra.run.dir=<tmp_path>/run` unless a run dir is given or `-m` is used, and `logger=none` unless a logger
    is chosen; wandb is offline and confined to tmp_path either way. `env` entries are added to (or override)
    `cli_env`; `prefix` replaces `[sys.executable, "-m", "runner"]` (e.g. a `python -c` wrapper).
    """

    def _run(*args, **kwargs) -> subprocess.CompletedProcess:
        return runner_process(tmp_path, *args, **kwargs)

    return _run


@pytest.fixture
def one_thread():
    """torch in this process on one thread for the test (as in the CLI subprocesses), restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TIMEOUT = 300  # seconds for one CLI call (a loaded 2-core machine is slow to import torch)


def runner_cmd(*args) -> list[str]:
    """`python -m runner *args`, with `logger=none` unless a logger is chosen."""
    args = [str(a) for a in args]
    if not any(a.split("=", 1)[0].lstrip("+~") == "logger" for a in args):
        args.append("logger=none")
    return [sys.executable, "-m", "runner", *args]


class Job:
    """`python -m runner *args` started in the background; output goes to files (no pipe can fill up)."""

    def __init__(self, tmp_path: Path, name: str, *args):
        self.out_path, self.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(runner_cmd(*args), cwd=tmp_path, env=cli_env(tmp_path), stdout=out,
                                         stderr=err)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()


@pytest.fixture
def spawn(tmp_path):
    """`spawn(name, *args)` -> a started Job; any still running when the test ends is killed."""
    started: list[Job] = []

    def _spawn(name: str, *args) -> Job:
        started.append(Job(tmp_path, name, *args))
        return started[-1]

    yield _spawn
    for job in started:
        if job.proc.poll() is None:
            job.proc.send_signal(signal.SIGCONT)  # in case a test stopped it
            job.proc.kill()
            job.proc.wait()
