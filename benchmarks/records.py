"""Recorded results (`benchmarks/results/`): one dated markdown file per run.

A second run on the same day gets `name_<date>_2.md` (then `_3`, ...) instead of overwriting the
first: a record is evidence, and a rerun must not erase what an earlier one measured.
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


def write_record(folder, name: str, title: str, command: str, facts: list[str], body: list[str],
                 device: str = "cpu", threads: int | None = None, png=None) -> Path:
    """Write `folder/<name>_<date>[_<n>].md`: a title, device, command and ``facts`` as a list,
    then ``body`` (markdown lines). ``threads``: the CPU threads the work ran on, when that was
    not this process. ``png`` (a path) is copied beside it under the same name and
    shown at the end. Returns the markdown file's path; never overwrites an earlier record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    suffixes = (".md", ".png") if png is not None else (".md",)
    stem, n = f"{name}_{day}", 1
    while any((folder / f"{stem}{s}").exists() for s in suffixes):
        n += 1
        stem = f"{name}_{day}_{n}"
    lines = [f"# {title} ({day})", "", f"- device: {device_line(device, threads)}", f"- command: `{command}`",
             *(f"- {f}" for f in facts), "", *body]
    if png is not None:
        shutil.copyfile(png, folder / f"{stem}.png")
        lines += ["", f"![{title}]({stem}.png)"]
    path = folder / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
