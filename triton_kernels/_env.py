"""Environment probes shared by the kernel modules (no triton import here)."""

from __future__ import annotations

import functools
import os


def interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for triton's CPU interpreter.

    Parsed like triton's own ``getenv_bool`` ("1", "true", "on"; case-insensitive), and read
    at call time so that tests can switch it on and off around the kernel tests only."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
