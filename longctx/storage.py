"""Crash-safe, checksummed folders for saved state (KV caches, QA sessions).

``atomic_folder`` replaces a folder so that a kill at any instant leaves the old or the new copy,
complete; ``recover`` cleans what a killed save left. ``write_manifest`` lists every file with
its size and SHA-256 (and a digest of the list itself); ``Manifest(folder).check(name)`` verifies
a file before it is read, so damage is a ``CacheError`` naming the file, never a wrong result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .offload import CacheError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "longctx-manifest-1"


def step(name: str) -> None:
    """Called after each write, sync and rename of a save (``atomic_folder``, ``KVCache.save``);
    does nothing. Tests replace ``longctx.storage.step`` to kill the process at that instant."""


def existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (for ``shutil.disk_usage`` before it is created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk (a folder: its names, i.e. renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _leftovers(folder: Path) -> Iterator[tuple[str, Path]]:
    """("tmp" | "old", path) of every sibling that an ``atomic_folder`` save of ``folder`` left
    behind and whose process is gone (names carry the writer's pid: a save still running in
    another process is never touched)."""
    try:
        entries = list(os.scandir(folder.parent))
    except OSError:  # no parent yet: nothing to clean
        return
    for entry in entries:
        for kind in ("tmp", "old"):
            prefix = f".{folder.name}.{kind}-"
            if entry.name.startswith(prefix):
                pid = entry.name[len(prefix) :].split("-")[0]
                if not pid.isdigit() or not _alive(int(pid)):
                    yield kind, Path(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover(folder: str | os.PathLike) -> None:
    """Undo or finish a save of ``folder`` by ``atomic_folder`` that was killed part way.

    A kill leaves at most: a ``.NAME.tmp-PID-*`` folder (the new copy, maybe incomplete) and a
    ``.NAME.old-PID-*`` folder (the old copy, complete, moved aside). If ``folder`` itself is
    gone the kill came between the two renames: the old copy is put back. Then every leftover
    is removed. Called by ``atomic_folder`` and ``KVCache.load``; cheap when there is nothing to
    do (one listing of the parent folder)."""
    folder = Path(folder)
    found = list(_leftovers(folder))
    if not found:
        return
    olds = sorted((p for kind, p in found if kind == "old"), key=lambda p: p.stat().st_mtime)
    if olds and not folder.exists():
        olds.pop().rename(folder)
    for _, path in found:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
    _fsync(folder.parent)


@contextlib.contextmanager
def atomic_folder(folder: Path):
    """Yield an empty folder beside ``folder``; when the block finishes, put it at ``folder``.

    Survives a kill at any instant: the new folder is written under ``.NAME.tmp-PID-*`` and
    every file in it fsynced; an existing ``folder`` is renamed to ``.NAME.old-PID-*``, the new
    one renamed into place, the parent folder fsynced (the renames are then on disk), and only
    then the old copy removed. A reader therefore finds the old or the new folder, complete;
    ``recover`` (run by the next save or load) cleans what a kill left. If the block raises,
    the new folder is removed and the old one stays as it was."""
    folder = Path(folder)
    recover(folder)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = folder.with_name(f".{folder.name}.tmp-{tag}")
    tmp.mkdir(parents=True)
    old = None
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                _fsync(Path(root) / name)
            _fsync(Path(root))
        step("synced")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{tag}")
            folder.rename(old)
            step("moved old")
        tmp.rename(folder)
        step("renamed new")
        _fsync(folder.parent)
        step("synced parent")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            old.rename(folder)  # the final rename failed: put the old folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        step("removed old")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path) -> None:
    """Write ``folder/manifest.json``: the size and SHA-256 of every other file in ``folder``
    (not its subfolders, which carry their own), and a SHA-256 of that list, so that damage
    to the manifest itself is found too. Write it after the last file."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    body = {"format": MANIFEST_FORMAT, "files": files, "sha256": _digest(files)}
    (folder / MANIFEST).write_text(json.dumps(body, separators=(",", ":")))


class Manifest:
    """The verified ``manifest.json`` of a saved folder; ``check(name)`` verifies one file.

    Raises ``CacheError`` naming the file: manifest missing, unreadable or not matching its own
    digest; a file not listed, missing, of another size or another SHA-256."""

    def __init__(self, folder: Path):
        path = folder / MANIFEST
        try:
            body = json.loads(path.read_bytes())
            files = body["files"]
            ok = body["format"] == MANIFEST_FORMAT and body["sha256"] == _digest(files)
        except FileNotFoundError:
            raise CacheError(f"{path}: missing (not a saved folder, or saved by a longctx without checksums)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: JSON or UTF-8 decoding
            raise CacheError(f"{path}: unreadable or damaged ({type(e).__name__}: {e})") from None
        if not ok or not isinstance(files, dict):
            raise CacheError(f"{path}: damaged (does not match its own checksum)")
        self.folder, self.files = folder, files

    def check(self, name: str) -> Path:
        """Verify ``name`` against the manifest (a full read of the file); returns its path."""
        path = self.folder / name
        want = self.files.get(name)
        if not isinstance(want, dict):
            raise CacheError(f"{path}: not listed in {MANIFEST} (cache incomplete or altered)")
        try:
            ok = path.stat().st_size == want.get("bytes") and _sha256_file(path) == want.get("sha256")
        except FileNotFoundError:
            raise CacheError(f"{path}: missing (cache incomplete)") from None
        except OSError as e:
            raise CacheError(f"{path}: cannot read ({e.strerror or e})") from None
        if not ok:
            raise CacheError(f"{path}: damaged (size or SHA-256 differs from {MANIFEST})")
        return path
