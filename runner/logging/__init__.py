"""Where a run's numbers go: the run directory (always) and a dashboard logger chosen by `conf/logger/`.

A logger's builder is called with its parameters and the run's context: run_dir, config (the resolved dict),
name, group, job_type, run_id.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from runner.config import ConfigError, Registry, check

LOGGERS = Registry("logger")


class Logger:
    """A dashboard sink; this base class is `logger=none` (the run directory holds everything).

    `finish` is always called, also when training raises.
    """

    def log(self, metrics: dict, step: int) -> None:
        """Send one record (already in metrics.jsonl). On resume the run's earlier records are sent again first,
        in order, so a dashboard run (same id) ends up with the whole history."""

    def log_analysis(self, name: str, metrics: dict, figures: list, step: int | None) -> None:
        """An analysis's figures (PNG paths) as images and its numbers as summary values (already in
        analysis/<name>.json and metrics.jsonl), in the row of `step` (None: the next row). Post hoc, runner.run
        replays the run directory, analyses included, to the dashboard at their steps."""

    def close(self) -> None:
        """Close the dashboard run without a summary (a post-hoc replay of a run that has no summary.json)."""

    def finish(self, summary: dict) -> None:
        """Close the dashboard run with the summary (already in summary.json)."""


@dataclass
class NoLoggerConfig:
    """`logger=none` takes no parameters."""


@LOGGERS.register("none", NoLoggerConfig, "local files only")
def no_logger(**context) -> Logger:
    return Logger()


@dataclass
class WandbConfig:
    project: str = "runner"
    entity: Optional[str] = None
    mode: Optional[str] = None  # None: $WANDB_MODE, else offline
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        check(self.mode in (None, "offline", "online", "disabled"), "mode", self.mode,
              "null, offline, online, disabled")


def check_credentials(mode: Optional[str] = None, **_) -> None:
    """Up front: online mode needs an API key (WANDB_API_KEY or `wandb login`'s ~/.netrc entry); without one
    wandb.init would fail after the run folder exists."""
    import netrc
    import os

    if (mode or os.environ.get("WANDB_MODE") or "offline") != "online" or os.environ.get("WANDB_API_KEY"):
        return
    try:
        host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0]
        if netrc.netrc().authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError("logger.mode", message="logger=wandb is online (WANDB_MODE/logger.mode) but no API key is "
                                             "set: run `wandb login` or set WANDB_API_KEY, or use WANDB_MODE=offline")


@LOGGERS.register("wandb", WandbConfig, "Weights & Biases, offline unless WANDB_MODE=online",
                  check=check_credentials)
def wandb_logger(**kwargs) -> Logger:
    from runner.logging.wandb_logger import WandbLogger

    return WandbLogger(**kwargs)

