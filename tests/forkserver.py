"""A start-up server for the CLI tests: `python -m runner ...` without paying Python's and torch's imports each time.

Every CLI call of the suite used to start a fresh interpreter that imported torch, torch._dynamo (torch.optim imports
it), Hydra and the runner: 4-7 CPU-seconds before any work, for runs that then train for a second, and the suite
makes hundreds of them. This server (one per pytest process, started on first use by `tests/conftest.py`) imports
them once and forks a child per call; the child is then `python -m <module> <args>` in every way a test can see:
its own pid, working directory, environment, stdin/stdout/stderr, argv, default signal dispositions, `__main__`
run by runpy exactly as `python -m` runs it, and an exit that waits for threads and runs the atexit handlers
(runner.signals.exit_now). Only the imports are shared, and they are the same files either way.

What it cannot stand in for is start-up itself: calls whose environment changes how an interpreter starts
(PYTHON* variables such as a sitecustomize on PYTHONPATH, other thread counts) or that need a different
executable go through a real subprocess (tests/conftest.py decides); so do the tests that signal or kill a
process by pid while it starts. RUNNER_TESTS_FORK=0 makes every call a real subprocess (to compare).

Protocol (a Unix socket): the client sends one JSON line {module, args, cwd, env, stdout, stderr}; the server
forks a handler, which forks the child, sends back `{"pid": N}`, waits for the child and sends `{"returncode": R}`
(negative: killed by signal R, as subprocess reports it).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys

PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "hydra", "omegaconf", "numpy", "runner.app", "runner.cli",
           "runner.cluster", "runner.sweep", "runner.run", "runner.experiment", "runner.train", "runner.report",
           "runner.analyze", "runner.launch", "tasks")


def _child(request: dict) -> None:
    """Become `python -m module args` (never returns)."""
    code: object = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((stdin, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
        sys.argv = [request["module"], *request["args"]]
        # `python -m runner.analyze` has not imported runner.analyze when it starts running it as __main__ (a module
        # that imports it later gets a second copy): the same here, and no runpy warning about it
        sys.modules.pop(request["module"], None)
        sys.modules.pop(request["module"] + ".__main__", None)
        import runpy

        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:  # what an uncaught exception does at the top of `python -m`
            import traceback

            traceback.print_exc()
            code = 1
        from runner.signals import exit_now

        exit_now(code)
    finally:
        os._exit(code if isinstance(code, int) else 1)


def _handle(conn: socket.socket) -> None:
    """Read one request, fork its child, report its pid and its exit status (never returns)."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        reader = conn.makefile("r")
        request = json.loads(reader.readline())
        pid = os.fork()
        if pid == 0:
            conn.close()
            _child(request)
        conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall((json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())
    finally:
        os._exit(0)


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            _handle(conn)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
