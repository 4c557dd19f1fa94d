"""Progress of long work, shared by training and the analyses: a bar on a terminal, log lines everywhere else.

    with Work("landscape 2-D", total=441, unit="points", detail="on 1437 samples") as work:
        for ...:
            ...
            work.update()

On a terminal (stderr is a TTY, or `show=True`): a tqdm bar that disappears when the work ends; log lines written
meanwhile (the training records) are printed above it, once. Elsewhere (pipes, `nohup`, SLURM output, notebooks;
or `show=False`): a start line saying the work to do (`landscape 2-D: 441 points on 1437 samples`), then, every
`interval` seconds of silence, a heartbeat with progress and ETA (`landscape 2-D: 120/441 points (27%), 31 s
elapsed, ETA 1 min 23 s`), checked when a unit of work ends (no thread, nothing per unit but a counter and a clock
read). `touch()` says a line was just printed by someone else (a training record): the next heartbeat waits a
whole interval from then. Lines go to the `runner.heartbeat` logger at INFO (Hydra's console and runner.log; the
analyze CLI's stderr).

The interval: `interval=` or $RUNNER_HEARTBEAT_S (seconds, default 30; 0: a heartbeat after every unit, for tests).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Callable, Optional

log = logging.getLogger("runner.heartbeat")

DEFAULT_INTERVAL_S = 30.0
_bars: list = []  # open bars, outermost first: only the outermost redirects logging above the bars


def heartbeat_interval() -> float:
    """Seconds between heartbeats: $RUNNER_HEARTBEAT_S, else 30."""
    value = os.environ.get("RUNNER_HEARTBEAT_S")
    try:
        return max(0.0, float(value)) if value not in (None, "") else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def duration(seconds: float) -> str:
    """`12 s`, `9 min 33 s`, `2 h 05 min`."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Work:
    """`total` units of work (`done` of them already done, e.g. a resumed run's steps), reported as a bar
    (`show` True; None: when stderr is a terminal) or as a start line and heartbeats (`show` False)."""

    def __init__(self, what: str, total: int, unit: str = "steps", detail: str = "", show: Optional[bool] = None,
                 done: int = 0, interval: Optional[float] = None):
        self.what, self.total, self.unit, self.detail = what, int(total), unit, detail
        self.done = self.start_done = int(done)
        self.show = sys.stderr.isatty() if show is None else bool(show)
        self.interval = heartbeat_interval() if interval is None else float(interval)
        self.started = self.last_line = time.monotonic()
        self.beats = 0
        self.bar = self._redirect = None
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=what, unit=unit.split()[-1], leave=False,
                            file=sys.stderr, dynamic_ncols=True)
            if not _bars:  # log lines (the records) above the bar, not through it
                from tqdm.contrib.logging import logging_redirect_tqdm

                self._redirect = logging_redirect_tqdm(tqdm_class=type(self.bar))
                self._redirect.__enter__()
            _bars.append(self.bar)
        else:
            log.info("%s: %d %s%s", what, self.total - self.done, unit, f" {detail}" if detail else "")

    def __enter__(self) -> "Work":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """`n` more units done; a heartbeat when `interval` seconds passed since the last line."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self.beats += 1
            log.info("%s", self.status(now))

    def counting(self, function: Callable) -> Callable:
        """`function`, with one unit done per call."""
        def counted(*args, **kwargs):
            out = function(*args, **kwargs)
            self.update()
            return out
        return counted

    def describe(self, text: str) -> None:
        """The bar's label (training: `epoch 3/20`); heartbeats keep `what`."""
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)

    def touch(self) -> None:
        """A line was just printed (a training record): the next heartbeat is due `interval` seconds from now."""
        self.last_line = time.monotonic()

    def status(self, now: Optional[float] = None) -> str:
        """`what: done/total unit (pct%), elapsed, ETA`."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total > 0 else ""
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.what}: {self.done}/{self.total} {self.unit}{share}, {duration(elapsed)} elapsed, "
                f"ETA {duration(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            if self.bar in _bars:
                _bars.remove(self.bar)
            if self._redirect is not None:
                self._redirect.__exit__(None, None, None)
            self.bar = self._redirect = None
        elif self.beats:  # the end of a phase that was long enough to need heartbeats
            self.beats = 0
            log.info("%s: %d %s done in %s", self.what, self.done - self.start_done, self.unit,
                     duration(time.monotonic() - self.started))
