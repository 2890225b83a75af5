"""Crash-safe JSONL journals: one JSON object per line, each line the unit of progress.

A writer appends whole lines and flushes and fsyncs each before going on (``append``), so a
crash loses at most the line being written. A restart reads what is finished (``read``): with
``repair`` (the file's own writer) a torn last line is cut off the file, so the next record
starts on a line of its own; a complete line that does not parse, or has no key, is skipped
with a warning (its work is redone). Sharded writers (torchrun ranks) each append to their own
``<name>.rank<r>`` file (``rank_path``); ``merge`` folds lines into one file in a given key
order, atomically. NIAH results and batch answers are both such journals.

Input JSONL written by others (batch jobs) is read with ``lines`` (binary, line by line, each
line's length bounded) and ``parse`` (one object per line, every way a line can be bad a
ValueError naming the reason). ``locked`` holds an exclusive lock on a journal for one writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

__all__ = ["Entry", "LockedError", "append", "lines", "locked", "merge", "parse", "rank_files", "rank_path", "read"]


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
            rec = parse(raw)
            out.append(Entry(key(rec), rec, raw.decode("utf-8")))
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"{path}:{n}: unreadable line skipped ({e}; its work will be done again)", stacklevel=2)
    return out


def parse(raw: bytes) -> dict:
    """One JSONL line (bytes, with or without its newline) as an object; ValueError naming the
    reason: not UTF-8 (with the byte offset), not JSON, nested too deeply for the parser
    (Python's recursion limit, about 1,000 levels), or not an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})") from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a line must be a JSON object, got {type(obj).__name__}")
    return obj


def lines(path: str | os.PathLike, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, bytes without the newline) for each line of ``path``, read in
    binary a line at a time; a line longer than ``max_bytes`` gives None instead and is
    skipped without being held in memory (it is read in pieces of ``max_bytes``)."""
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            n += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # the rest of the long line
                    raw = f.readline(max_bytes + 1)
                yield n, None
            else:
                yield n, raw.rstrip(b"\r\n")


class LockedError(OSError):
    """Another process holds the journal's lock (``locked``)."""


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock for writing ``path``: ``flock`` on ``<path>.lock`` (created if
    missing, left in place: removing it would let a waiting process lock a file nobody else
    sees). The kernel drops the lock when the process exits or dies, so a crash never leaves
    it held. ``LockedError`` at once, naming the file and the holder's pid, if another process
    holds it. Yields the lock file's path."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise LockedError(
                f"{path}: another process (pid {holder}) is writing it (lock {lock}); "
                "wait for it to finish or write elsewhere"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)  # closing the descriptor releases the lock


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
    return sorted(p for p in path.parent.glob(path.name + ".rank*") if p.name[len(path.name) + 5 :].isdigit())


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
