"""Recorded results (`benchmarks/results/`): one current record per benchmark.

A record is `<name>.md` (and `<name>.png` when there is a picture). ``name`` says which
benchmark and configuration it measured, so a rerun of the same configuration replaces its
record: the folder shows the current numbers, and git keeps every earlier version. The date
is inside the file.
"""

from __future__ import annotations

import datetime
import platform
import shutil
from pathlib import Path

import torch


def device_line(device: str = "cpu", threads: int | None = None) -> str:
    """What ran: the GPU's name, or the CPU architecture and thread count (default: torch's in
    this process); torch version."""
    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}"
    return f"CPU ({platform.machine()}), {threads or torch.get_num_threads()} threads; torch {torch.__version__}"


def write_record(
    folder,
    name: str,
    title: str,
    command: str,
    facts: list[str],
    body: list[str],
    device: str = "cpu",
    threads: int | None = None,
    png=None,
) -> Path:
    """Write `folder/<name>.md`, replacing an earlier record of that name: a title with today's
    date, device, command and ``facts`` as a list, then ``body`` (markdown lines). ``name``
    names the benchmark and its configuration (e.g. ``decode_cuda_seg16384``), never a date or
    a run number. ``threads``: the CPU threads the work ran on, when that was not this process.
    ``png`` (a path) is copied to `folder/<name>.png` and shown at the end; without one, a
    picture left by an earlier record of the name is removed, so it cannot pass for this run's.
    Returns the markdown file's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    lines = [
        f"# {title} ({day})",
        "",
        f"- device: {device_line(device, threads)}",
        f"- command: `{command}`",
        *(f"- {f}" for f in facts),
        "",
        *body,
    ]
    picture = folder / f"{name}.png"
    if png is not None:
        shutil.copyfile(png, picture)
        lines += ["", f"![{title}]({picture.name})"]
    else:
        picture.unlink(missing_ok=True)
    path = folder / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
