"""Argument types of the ``longctx`` command: each parses one option's text or raises
``argparse.ArgumentTypeError`` with a message naming what was wrong, which ``Parser`` turns
into one line, ``longctx <cmd>: argument --x: <message>``, and exit status 2."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


class UsageError(Exception):
    """A bad command line or input: printed as one line, ``longctx <cmd>: <message>``, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises ``UsageError`` (one line naming the argument)
    instead of printing the usage block."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def parse_length(s: str) -> int:
    """"32k" -> 32768, "1m" -> 1048576, "500" -> 500 (``longctx.tasks.niah.parse_length``)."""
    from .tasks.niah import parse_length as parse

    try:
        return parse(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_lengths(s: str) -> list[int]:
    """"1k,32k,1m" -> [1024, 32768, 1048576]."""
    return [parse_length(x) for x in s.split(",")]


def parse_depths(s: str) -> list[float]:
    """Needle depths as fractions: "0,0.5,1" -> [0.0, 0.5, 1.0]; a list with any value above 1
    is in percent (as needlehaystack takes them): "0,50,100" -> [0.0, 0.5, 1.0]."""
    try:
        depths = [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of depths: {s!r} (examples: 0,0.5,1 or 0,50,100)") from None
    scale = 100.0 if any(d > 1 for d in depths) else 1.0
    if not all(0.0 <= d <= scale for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be fractions in [0, 1] or percents in [0, 100], got {s!r}")
    return [d / scale for d in depths]


def count(minimum: int):
    """An argparse type: an int >= ``minimum``."""

    def parse(s: str) -> int:
        try:
            n = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n

    return parse


def threads_arg(s: str) -> int | str:
    """"auto" or a thread count >= 1."""
    return "auto" if s == "auto" else count(1)(s)


def nonneg_float(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return x


def question_arg(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError("a question must not be empty")
    return s


def haystack_arg(s: str) -> str:
    if s not in ("english", "noise") and not Path(s).exists():
        raise argparse.ArgumentTypeError(f"{s}: no such file or folder (or use 'english' or 'noise')")
    return s


def existing_path(s: str) -> Path:
    if not Path(s).exists():
        raise argparse.ArgumentTypeError(f"{s}: no such file or folder")
    return Path(s)


THREADS_HELP = ("CPU threads for torch: a number, or auto (default): 1 for a model under 50 M parameters "
                "on the CPU, where more threads only wait on each other, else torch's default; "
                "OMP_NUM_THREADS, when set, is kept")


def parse_bytes(s: str) -> int:
    """A memory size: "80GiB", "80GB", "512MiB", "1.5TB" or a plain number of bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", s)
    if m is None or m[2].lower() not in units:
        raise argparse.ArgumentTypeError(f"not a memory size: {s!r} (examples: 80GiB, 80GB, 512MiB)")
    n = int(float(m[1]) * units[m[2].lower()])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"a memory size must be > 0, got {s!r}")
    return n


def names(allowed: tuple[str, ...], s: str) -> list[str]:
    """An argparse type (through a lambda): a comma-separated list of names from ``allowed``."""
    if [x for x in s.split(",") if x not in allowed]:
        raise argparse.ArgumentTypeError(f"{s!r}: not a list of {', '.join(allowed)}")
    return s.split(",")
