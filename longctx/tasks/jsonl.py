"""Crash-safe JSONL journals: one JSON object per line, each line the unit of progress.

A writer appends whole lines and flushes and fsyncs each before going on (``append``), so a
crash loses at most the line being written. A restart reads what is finished (``read``): with
``repair`` (the file's own writer) a torn last line is cut off the file, so the next record
starts on a line of its own; a complete line that does not parse, or has no key, is skipped
with a warning (its work is redone). Sharded writers (torchrun ranks) each append to their own
``<name>.rank<r>`` file (``rank_path``); ``merge`` folds lines into one file in a given key
order, atomically. NIAH results and batch answers are both such journals.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import IO, NamedTuple

__all__ = ["Entry", "append", "merge", "rank_files", "rank_path", "read"]


class Entry(NamedTuple):
    """One finished line: its key, the parsed object, and the line's text (no newline)."""

    key: Hashable
    record: dict
    line: str


def read(path: str | os.PathLike, key: Callable[[dict], Hashable], *, repair: bool = False) -> list[Entry]:
    """Every complete line of ``path`` that parses and has a ``key`` (a missing file: none).

    A torn last line (no final newline: a crash mid-write) is ignored, and with ``repair`` cut
    off the file (truncated, fsync'd). A complete line that is not a JSON object or whose
    ``key(record)`` raises KeyError/TypeError is skipped with a warning naming file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
        data = data[:cut]
    out = []
    for n, raw in enumerate(data.split(b"\n")[:-1], 1):
        try:
            line = raw.decode("utf-8")
            rec = json.loads(line)
            out.append(Entry(key(rec), rec, line))
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            warnings.warn(f"{path}:{n}: unreadable line skipped (its work will be done again)", stacklevel=2)
    return out


def append(fh: IO[str], record: dict) -> None:
    """Write ``record`` as one line to ``fh`` (opened for appending), flushed and fsync'd."""
    fh.write(json.dumps(record, ensure_ascii=False) + "\n")  # one write per line
    fh.flush()
    os.fsync(fh.fileno())


def rank_path(path: str | os.PathLike, rank: int) -> Path:
    """The file rank ``rank`` of a sharded run appends to: ``<path>.rank<rank>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.rank{rank}")


def rank_files(path: str | os.PathLike) -> list[Path]:
    """The rank files of ``path`` that exist (of this run or an earlier one, any world size)."""
    path = Path(path)
    return sorted(path.parent.glob(path.name + ".rank*"))


def merge(path: str | os.PathLike, key: Callable[[dict], Hashable], lines: Iterable[str], order: list) -> None:
    """Rewrite ``path`` atomically with its own records and ``lines``, one line per key (the
    first seen wins: the file's own, then ``lines`` in order): keys in ``order`` first, in that
    order, then keys not in ``order`` in the order first seen. Built beside ``path``, fsync'd,
    renamed into place, so a crash leaves the old file or the new one."""
    path = Path(path)
    recs: dict = {}
    for e in read(path, key):
        recs.setdefault(e.key, e.line)
    for line in lines:
        recs.setdefault(key(json.loads(line)), line)
    known = set(order)
    keys = [k for k in order if k in recs] + [k for k in recs if k not in known]
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(recs[k] + "\n" for k in keys)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
