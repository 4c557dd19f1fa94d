"""Command-line checks that must happen before Hydra starts, and the one-line error exit."""
import sys
from pathlib import Path
from typing import NoReturn

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def preflight(argv: list[str]) -> None:
    """Unknown group options (`optimizer=foo`, `+experiment=bar`) get one line listing what exists.

    Hydra's own message for this spans several lines plus a hint about HYDRA_FULL_ERROR.
    """
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if "/" in group or "." in group or not (CONF_DIR / group).is_dir() or "(" in value:
            continue  # a value, a hydra/... group or a sweep function: Hydra handles it
        available = options(group)
        for option in value.split(","):
            if option.strip() and option.strip() not in available:
                fail(f"unknown {group} '{option.strip()}' (available: {', '.join(available)})")
