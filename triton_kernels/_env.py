"""What the kernel modules share: environment probes, lazy loading of the @triton.jit modules,
and the choice between a Triton kernel and its PyTorch reference (no triton import here)."""

from __future__ import annotations

import functools
import importlib
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


class KernelModule:
    """A module of @triton.jit kernels (``_attention_triton``, ...), imported on first use.

    NOTE: triton fixes interpreter-or-compiled when @triton.jit runs, i.e. at import; a module
    imported under the other TRITON_INTERPRET mode is therefore reloaded (the tests turn the
    interpreter on only around their own kernel calls). Each such module sets ``INTERPRET``."""

    def __init__(self, name: str):
        self.name = name
        self._mod = None

    def get(self):
        want = interpret_requested()
        if self._mod is None:
            self._mod = importlib.import_module(self.name)
        if self._mod.INTERPRET != want:
            self._mod = importlib.reload(self._mod)
        return self._mod


def device_blocker(device_type: str) -> str | None:
    """Why a Triton kernel cannot run on tensors of ``device_type`` now; None when it can."""
    if not triton_available():
        return "triton is not installed"
    if device_type != "cuda" and not interpret_requested():
        return f"tensors are on {device_type} (the kernel needs CUDA, or TRITON_INTERPRET=1 on CPU)"
    if device_type not in ("cuda", "cpu"):
        return f"tensors are on {device_type}"
    return None


def use_triton(impl: str, impls: tuple[str, ...], why_not: str | None) -> bool:
    """The dispatchers' rule: ``impl`` must be one of ``impls``; "reference" (and "torch")
    never take the kernel; "auto" takes it when nothing stops it (``why_not`` is None);
    "triton" takes it or raises RuntimeError saying why it cannot."""
    if impl not in impls:
        raise ValueError(f"impl must be one of {impls}, got {impl!r}")
    if impl in ("reference", "torch"):
        return False
    if why_not is not None and impl == "triton":
        raise RuntimeError(f"impl='triton' cannot run: {why_not}")
    return why_not is None
