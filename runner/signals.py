"""Ctrl-C and SIGTERM, handled the same way in every command: an exception the code can record, never a silent stop.

- `install()` (first thing in each entry point): SIGINT raises `KeyboardInterrupt` and SIGTERM raises `Interrupted`,
  whatever the process inherited. A process started in the background by a non-interactive shell (`nohup cmd &`,
  a CI script, `pytest &`) inherits SIGINT as *ignored*, and Python keeps an inherited SIG_IGN, so without this
  `kill -INT` did nothing at all and the run trained to the end.
- `sigterm_as_interrupt()`: the same for SIGTERM inside a block, for code called without an entry point (tests,
  notebooks); left alone under submitit, whose own handler requeues preempted SLURM jobs.
- `deferred()`: SIGINT and SIGTERM wait while a record is written (summary.json), then arrive; so a signal never
  leaves a run whose record says something else than what happened.

Importable without torch or Hydra: `python -m runner` installs the handlers before its heavy imports, so a Ctrl-C
during start-up is one line too.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what `kill`, `timeout` and SLURM send), handled like Ctrl-C: the run is recorded `interrupted`."""


def _raise_interrupted(signum, frame):
    raise Interrupted("SIGTERM")


def signal_name(error: BaseException) -> str:
    """`SIGTERM` or `Ctrl-C`, the name a line about an interruption gives."""
    return "SIGTERM" if str(error) == "SIGTERM" else "Ctrl-C"


def exit_code(error: BaseException) -> int:
    """The shell's convention: 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + (signal.SIGTERM if signal_name(error) == "SIGTERM" else signal.SIGINT)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """Ctrl-C raises KeyboardInterrupt, SIGTERM raises Interrupted, whatever handlers were inherited."""
    if _in_main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_interrupted)


def ignore() -> None:
    """Once a command is stopping: further Ctrl-C or SIGTERM are ignored, so its last line is printed whole."""
    if _in_main_thread():
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises `Interrupted` in the main thread while the block runs. Left alone under submitit, whose own
    signal handling requeues preempted SLURM jobs."""
    if not _in_main_thread() or os.environ.get("SUBMITIT_EXECUTOR"):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred():
    """SIGINT and SIGTERM are held while the block runs and delivered right after it (a record is never half
    about one thing and half about another; the write itself is atomic anyway). Done with handlers, not a signal
    mask: torch's threads would take a process signal the main thread masks."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])  # now, to the handler that was in place


def exit_now(code: int | str | None) -> None:
    """End the process as `sys.exit(code)` would, without Python's module teardown.

    Once torch._dynamo is imported (torch.optim's constructors import it), the interpreter spends about a second
    tearing down modules at exit, on every command, for nothing: the process's memory goes back to the system
    anyway. This does what a normal exit does that matters (stops concurrent.futures pools and waits for non-daemon
    threads, as `threading._shutdown`, runs the atexit
    handlers, which flush and close logging's files and wandb's run, flushes stdout and stderr) and then
    `os._exit`. A string code is printed to stderr and exits 1, as `sys.exit` does.
    """
    import atexit
    import sys

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    code = 0 if code is None else int(code)
    # what the interpreter's own exit does first: the callbacks of `threading._register_atexit` (concurrent.futures
    # pools shut down there: torch.compile's pool of compile workers, started on a cold cache), then it joins the
    # non-daemon threads. Joining without the callbacks first waited forever on that pool's thread.
    threading._shutdown()
    ignore()  # the command is done: a late Ctrl-C does not turn its last lines into a traceback
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say there
            pass
    os._exit(code)
