"""Ingest: read files, folders and in-memory texts into a `Corpus` of documents.

    corpus = ingest(["reports/", "contract.pdf", ("Notes", "free text ...")])
    packed = corpus.pack(tokenizer, budget=1_000_000)   # see longctx.text.pack

Inputs:

- files: read by `longctx.text.readers`, by extension (txt/md, HTML, PDF).
- folders: recursively, entries sorted by name (code-point order) at each level, so the order
  is the same on every machine. Names starting with "." are not visited (`.git`, `.DS_Store`).
  Symlinked folders are followed, each real folder once (no loops).
  `glob=` filters the files found in folders (not files named explicitly).
- in-memory texts: a `(title, text)` pair, or `(title, [page, page, ...])` for a paged text.
  A plain `str` is always a path: a path that does not exist must be an error, never silently
  a one-line document.

Errors. A file that cannot be read raises `IngestError` (with `.path` and `.reason`) under
`errors="raise"`; under `errors="skip"` it is recorded in `corpus.skipped` as
`Skipped(path, reason)` and the rest is ingested. Nothing is dropped without a record.

Duplicates. Documents are identified by the sha256 of their extracted text (UTF-8). The first
one in input order is kept; a later document with the same hash is not added again and is
listed in `corpus.duplicates` as `Duplicate(kept_id, path)`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import html
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .document import (
    PAGE_SEPARATOR,
    BudgetError,
    Document,
    DocumentSpan,
    Duplicate,
    IngestError,
    Skipped,
    make_document,
    progress_bar,
)
from .pack import DEFAULT_MARKER, DEFAULT_TEMPLATE, Packed, delimiters, pack
from .readers import read_file, require_text

# With ingest and Corpus, the records and packing names that callers import from this module
# (longctx/__init__.py, cli, tasks, examples): defined in document.py and pack.py.
__all__ = [
    "DEFAULT_MARKER",
    "DEFAULT_TEMPLATE",
    "PAGE_SEPARATOR",
    "BudgetError",
    "Corpus",
    "Document",
    "DocumentSpan",
    "Duplicate",
    "IngestError",
    "Packed",
    "Skipped",
    "delimiters",
    "ingest",
]

# Show the progress bar by default only for this many files or more (and only on a terminal).
_PROGRESS_MIN_FILES = 100


# ============================================================================================
# Finding files
# ============================================================================================


def _matches(rel: str, pattern: str) -> bool:
    """`glob` rule: a pattern without "/" matches the file name, one with "/" the path relative
    to the folder given (fnmatch: "*" also crosses "/"; "**/" may match no folder at all)."""
    if "/" not in pattern:
        return fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern)
    if fnmatch.fnmatchcase(rel, pattern):
        return True
    return pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:])


def _walk(folder: Path, glob: str | None, label: str) -> Iterator[tuple[Path, str] | Skipped]:
    """Files under `folder` as (path, label) in a stable order, and a Skipped for each folder
    that can't be listed, yielded as found: memory holds one folder's names per level of
    depth, never the whole tree's file list (a folder of 100,000 files streams)."""
    seen: set[str] = set()  # real paths of visited folders: a symlink loop is entered once

    def visit(d: Path, rel: str) -> Iterator[tuple[Path, str] | Skipped]:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        try:
            with os.scandir(d) as it:
                names = sorted(entry.name for entry in it if not entry.name.startswith("."))
        except OSError as e:
            yield Skipped(_join(label, rel), f"cannot list folder ({e.strerror or e})")
            return
        for name in names:
            sub = f"{rel}/{name}" if rel else name
            path = d / name
            try:
                is_dir = path.is_dir()  # follows symlinks
            except OSError:  # over-long names, ...: read_file reports them for the file
                is_dir = False
            if is_dir:
                yield from visit(path, sub)
            elif glob is None or _matches(sub, glob):
                yield path, _join(label, sub)

    yield from visit(folder, "")


def _join(folder_label: str, rel: str) -> str:
    if not rel:
        return folder_label
    return f"{folder_label.rstrip('/')}/{rel}" if folder_label else rel


# ============================================================================================
# Corpus and ingest
# ============================================================================================


class Corpus:
    """Documents (in ingest order, ids 0..n-1) plus what was skipped or found duplicate.

    `documents`, `skipped` (list of Skipped), `duplicates` (list of Duplicate). Indexing and
    iteration go over the documents.
    """

    def __init__(
        self, documents: list[Document], skipped: list[Skipped] | None = None, duplicates: list[Duplicate] | None = None
    ):
        for k, d in enumerate(documents):
            if d.id != k:
                raise ValueError(f"document ids must be 0..n-1 in order; position {k} has id {d.id}")
        self.documents = list(documents)
        self.skipped = list(skipped or [])
        self.duplicates = list(duplicates or [])

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self):
        return iter(self.documents)

    def __getitem__(self, i: int) -> Document:
        return self.documents[i]

    @property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)

    def __repr__(self) -> str:
        return (
            f"Corpus({len(self.documents)} documents, {self.n_chars} chars, "
            f"{len(self.skipped)} skipped, {len(self.duplicates)} duplicates)"
        )

    def to_dict(self) -> dict:
        """Plain fields (no texts): documents ({"id", "title", "source", "format", "chars",
        "pages", "sha256"}), skipped ({"path", "reason"}), duplicates ({"kept_id", "path"})."""
        return {
            "documents": [
                {
                    "id": d.id,
                    "title": d.title,
                    "source": d.source,
                    "format": d.format,
                    "chars": len(d.text),
                    "pages": d.n_pages,
                    "sha256": d.sha256,
                }
                for d in self.documents
            ],
            "skipped": [s._asdict() for s in self.skipped],
            "duplicates": [d._asdict() for d in self.duplicates],
        }

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{d.id}</td><td>{html.escape(d.title)}</td><td>{d.format}</td><td>{len(d.text):,}</td>"
            f"<td>{html.escape(d.source or 'in memory')}</td></tr>"
            for d in self.documents[:20]
        )
        more = len(self.documents) - 20
        tail = f'<tr><td colspan="5">{more} more documents</td></tr>' if more > 0 else ""
        skipped = "".join(f"<li>skipped {html.escape(s.path)}: {html.escape(s.reason)}</li>" for s in self.skipped[:10])
        return (
            f"<p>{html.escape(repr(self))}</p><table><tr><th>id</th><th>title</th><th>format</th><th>chars</th>"
            f"<th>source</th></tr>{rows}{tail}</table>" + (f"<ul>{skipped}</ul>" if skipped else "")
        )

    def pack(self, tokenizer, **options) -> Packed:
        """The documents as token ids with delimiters and exact spans: `longctx.text.pack.pack`
        with this corpus. Options (keyword-only): budget, template, overflow ("error", "drop",
        "truncate"), chunk, offset, marker, progress, num_threads."""
        return pack(self, tokenizer, **options)


def ingest(
    paths_or_texts,
    *,
    glob: str | None = None,
    errors: str = "raise",
    progress: bool | None = None,
    max_bytes: int | None = None,
) -> Corpus:
    """Read files, folders and in-memory texts into a Corpus (see the module docstring).

    paths_or_texts: one path (str or os.PathLike) or an iterable of paths and in-memory texts;
        an in-memory text is a `(title, text)` pair or `(title, [page texts])` (title may be
        None: "text N"). A top-level tuple is a sequence of inputs, not a pair: wrap a single
        pair in a list.
    glob: a file-name pattern (e.g. "*.pdf") or, with "/", a path pattern relative to the
        folder (e.g. "2024/**/*.md") applied to files found in folders.
    errors: "raise" (the first unreadable input raises IngestError) or "skip" (it is recorded
        in `corpus.skipped` and the rest is read).
    progress: a tqdm bar over files (None: only for 100+ files, or any folder, on a terminal).
    max_bytes: refuse (or, under errors="skip", skip) each file larger than this many bytes,
        decided from its size before any of it is read; None: no limit.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0):
        raise ValueError(f"max_bytes must be an int >= 0 or None, got {max_bytes!r}")
    if isinstance(paths_or_texts, (str, os.PathLike)):
        paths_or_texts = [paths_or_texts]
    elif not isinstance(paths_or_texts, Iterable):
        raise TypeError(f"ingest expects paths or (title, text) pairs, got {type(paths_or_texts).__name__}")

    skipped: list[Skipped] = []

    def fail(path: str, reason: str) -> None:
        if errors == "raise":
            raise IngestError(path, reason)
        skipped.append(Skipped(path, reason))

    # 1. Expand the inputs into work items, in order: ("file", Path, label), ("text", ...) or
    # ("fail", label, reason). Folders are walked lazily, as their files are read.
    def walked(path: Path, label: str) -> Iterator[tuple]:
        found = False
        for entry in _walk(path, glob, Path(label).as_posix()):
            if isinstance(entry, Skipped):
                yield ("fail", *entry)
            else:
                found = True
                yield ("file", *entry)
        if not found:
            yield ("fail", label, "folder has no files" + (f" matching {glob!r}" if glob else ""))

    items: list = []  # work items and folder walks (iterators of work items)
    n_texts = 0
    n_files: int | None = 0  # None once a folder is given: its count is known only at the end
    for item in paths_or_texts:
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            label = os.fspath(item)
            try:
                is_dir = path.is_dir()
            except (OSError, ValueError):  # a name too long, ...: read_file names the reason
                is_dir = False
            if is_dir:
                items.append(walked(path, label))
                n_files = None
            else:
                items.append(("file", path, label))
                n_files = None if n_files is None else n_files + 1
        elif isinstance(item, tuple) and len(item) == 2:
            items.append(("text", item, f"<text {n_texts}>", n_texts))
            n_texts += 1
        else:
            raise TypeError(
                "ingest inputs must be paths (str or os.PathLike) or (title, text) pairs, "
                f"got {type(item).__name__}: {item!r:.80}"
            )

    # 2. Read them.
    documents: list[Document] = []
    duplicates: list[Duplicate] = []
    by_hash: dict[str, int] = {}
    bar = progress_bar(progress, n_files, _PROGRESS_MIN_FILES, "reading", "file")
    for it in (it for group in items for it in (group if not isinstance(group, tuple) else (group,))):
        if it[0] == "fail":
            try:
                fail(it[1], it[2])
            except IngestError:
                bar.close()
                raise
            continue
        try:
            if it[0] == "file":
                doc = read_file(it[1], it[2], max_bytes)
                bar.update(1)
            else:
                doc = _from_memory(*it[1:])
        except IngestError as e:
            if it[0] == "file":
                bar.update(1)
            if errors == "raise":
                bar.close()
                raise
            skipped.append(Skipped(e.path, e.reason))
            continue
        kept = by_hash.get(doc.sha256)
        if kept is not None:
            duplicates.append(Duplicate(kept, doc.source if doc.source is not None else it[2]))
            continue
        doc = dataclasses.replace(doc, id=len(documents))
        by_hash[doc.sha256] = doc.id
        documents.append(doc)
    bar.close()
    bar.close()
    return Corpus(documents, skipped, duplicates)


def _from_memory(pair: tuple, label: str, n: int) -> Document:
    title, body = pair
    if title is not None and not isinstance(title, str):
        raise TypeError(f"{label}: title must be a str or None, got {type(title).__name__}")
    if isinstance(body, str):
        require_text(body, label, "empty text")
    elif isinstance(body, Sequence) and all(isinstance(p, str) for p in body):
        body = list(body)
        if not body:
            raise IngestError(label, "no pages")
        require_text("".join(body), label, "empty text (all pages are blank)")
    else:
        raise TypeError(f"{label}: text must be a str or a list of page strings, got {type(body).__name__}")
    try:
        doc = make_document(title if title is not None else f"text {n}", None, body, 0, "memory", None)
    except IngestError as e:
        raise IngestError(label, e.reason) from None
    return dataclasses.replace(doc, size=len(doc.text.encode("utf-8")))
