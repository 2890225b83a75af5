"""One JSON object per line in ``benchmarks/results/gpu.jsonl``: every GPU measurement, machine-readable.

The markdown records (``records.write_record``) say what a run means; this file keeps the figures
of every run side by side, so runs on different days, cards and commits can be compared without
parsing prose. A line is ``{"date", "device", "torch", "triton", "commit", "name", "figures",
"command"}``: ``date`` an ISO-8601 UTC time to the second, ``device`` the GPU's name (or the CPU
architecture), ``commit`` the checked-out commit (``+dirty`` when tracked files differ from it;
the environment variable ``GPU_COMMIT`` names it where the copy has no git history), ``figures``
the run's numbers (non-finite floats become null, which JSON can hold).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
JSONL = "gpu.jsonl"


def device_name(device: str | torch.device = "cpu") -> str:
    """The GPU's name for a CUDA device, else ``CPU (<architecture>)``."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()})"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def commit() -> str | None:
    """``GPU_COMMIT`` if set, else ``git rev-parse --short HEAD`` of this checkout (``+dirty`` when
    tracked files changed), else None (a copy without git history)."""
    if os.environ.get("GPU_COMMIT"):
        return os.environ["GPU_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode else "")


def _plain(v):
    """``v`` with non-finite floats as None and tuples as lists, recursively (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def append(
    name: str,
    figures: dict,
    *,
    device: str | torch.device = "cpu",
    command: str | None = None,
    results: str | os.PathLike = RESULTS,
) -> dict:
    """Append one line for measurement ``name`` to ``results/gpu.jsonl`` (the folder is made if
    needed) and return the object written. ``command`` defaults to this process's command line.
    Raises TypeError naming the figure that JSON cannot hold."""
    entry = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": commit(),
        "name": name,
        "figures": _plain(figures),
        "command": command or "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    try:
        line = json.dumps(entry, allow_nan=False, sort_keys=False)
    except TypeError as e:
        raise TypeError(f"gpu_record.append({name!r}): a figure is not JSON-serialisable ({e})") from None
    folder = Path(results)
    folder.mkdir(parents=True, exist_ok=True)
    # One write of a whole line in append mode: concurrent writers interleave lines, not bytes.
    with open(folder / JSONL, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return entry


def read(results: str | os.PathLike = RESULTS, name: str | None = None) -> list[dict]:
    """Every line of ``results/gpu.jsonl`` (those of measurement ``name`` only, if given), oldest first."""
    path = Path(results) / JSONL
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if name is None or r["name"] == name]
