"""The records of the text floor: `Document`, `DocumentSpan`, what ingest left out, and the errors.

A paged document (a PDF, or an in-memory list of pages) is one text: its pages joined by
PAGE_SEPARATOR ("\\f"), with `Document.page_offsets` saying where each page starts.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["PAGE_SEPARATOR", "BudgetError", "Document", "DocumentSpan", "Duplicate", "IngestError", "Skipped"]

# Pages of a paged document are joined by this character; it belongs to the page it ends.
PAGE_SEPARATOR = "\f"


class IngestError(Exception):
    """A document could not be read. `.path` names it (a file path, or "<text N>" for the N-th
    in-memory input) and `.reason` says why ("empty file", "binary data ...", "encrypted PDF ...",
    "corrupt PDF ...", "no text layer (scanned PDF?)", "unsupported extension ...", ...)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class BudgetError(ValueError):
    """The packed corpus needs more tokens than the budget. `.needed`, `.budget`, `.over`
    (= needed - budget) are token counts."""

    def __init__(self, message: str, *, needed: int, budget: int):
        super().__init__(message)
        self.needed = needed
        self.budget = budget
        self.over = needed - budget


class Skipped(NamedTuple):
    """A file left out under `errors="skip"`, and why (the `IngestError` reason)."""

    path: str
    reason: str


class Duplicate(NamedTuple):
    """A document not added because its text equals the already kept document `kept_id`."""

    kept_id: int
    path: str


@dataclass(frozen=True, eq=False)
class Document:
    """One document of a corpus.

    id: position in `Corpus.documents` (0-based), assigned after duplicates and skips.
    title: file stem, the HTML <title>, a Markdown file's leading "# heading", or the title given.
    source: the file path as found (input path joined with the path inside a folder, "/" as
        separator); None for in-memory texts.
    text: the extracted text. For a paged document, the page texts joined by PAGE_SEPARATOR.
    page_offsets: None for unpaged documents; else the character offset where each page starts
        (page k, 1-based, starts at page_offsets[k-1]).
    sha256: hex digest of `text` encoded as UTF-8 (the identity used for duplicates).
    size: bytes of the source file (UTF-8 bytes of the text for in-memory documents).
    format: "text", "markdown", "html", "pdf" or "memory".
    encoding: the text encoding the file was decoded with (None for PDFs and in-memory texts).
    warnings: problems the reader worked around, each also logged on the "longctx.text.readers"
        logger: pypdf's repairs of a damaged PDF (which can mean missing text), damaged bytes of
        a UTF-8 file decoded as U+FFFD, an unterminated HTML comment dropped to the end.
    """

    id: int
    title: str
    source: str | None
    text: str
    page_offsets: tuple[int, ...] | None
    sha256: str
    size: int
    format: str
    encoding: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def n_pages(self) -> int | None:
        """Number of pages, or None for an unpaged document."""
        return None if self.page_offsets is None else len(self.page_offsets)

    def page_ranges(self) -> list[tuple[int | None, int, int]]:
        """[(page, char_start, char_end)] covering `text` exactly, in order.

        An unpaged document is one range with page None. For a paged one, page k's range ends
        after the PAGE_SEPARATOR that closes it (the last page has none), so the ranges tile the
        text with no gaps.
        """
        if self.page_offsets is None:
            return [(None, 0, len(self.text))]
        bounds = list(self.page_offsets) + [len(self.text)]
        return [(k + 1, bounds[k], bounds[k + 1]) for k in range(len(self.page_offsets))]

    @property
    def pages(self) -> list[str]:
        """The page texts without separators ([text] for an unpaged document)."""
        out = []
        for page, a, b in self.page_ranges():
            piece = self.text[a:b]
            if page is not None and b < len(self.text):
                piece = piece[: -len(PAGE_SEPARATOR)]
            out.append(piece)
        return out

    def __repr__(self) -> str:
        pages = "" if self.page_offsets is None else f", pages={len(self.page_offsets)}"
        return f"Document(id={self.id}, title={self.title!r}, source={self.source!r}, chars={len(self.text)}{pages})"


@dataclass(frozen=True)
class DocumentSpan:
    """Where one document (or one page of it) lies in `Packed.ids`.

    start, end: token indices, end exclusive; the tokens decode exactly to
        `Packed.text(doc_id)[char_start:char_end]`: the document's text as packed, which is its own
        text unless it held delimiter-shaped text that packing escaped (delimiters are outside every span).
    page: 1-based page number for paged documents (PDFs), None otherwise.
    truncated: the budget cut the document at the end of this span (only with
        overflow="truncate"; then char_end is short of the document's end).
    """

    doc_id: int
    title: str
    page: int | None
    start: int
    end: int
    char_start: int
    char_end: int
    truncated: bool = False

    def __len__(self) -> int:
        return self.end - self.start


def make_document(
    title: str,
    source: str | None,
    body: str | list[str],
    size: int,
    fmt: str,
    encoding: str | None,
    utf8: bytes | None = None,
) -> Document:
    """A Document (id -1: `ingest` numbers them) from one text or a list of page texts.

    size: bytes of the source; utf8: the text's UTF-8 bytes when the caller already has them
    (hashed as they are). Raises IngestError for text that is not valid Unicode (lone surrogates).
    """
    if isinstance(body, str):
        text, offsets = body, None
    else:
        offsets, pos = [], 0
        for k, page in enumerate(body):
            offsets.append(pos)
            pos += len(page) + (len(PAGE_SEPARATOR) if k < len(body) - 1 else 0)
        text, offsets = PAGE_SEPARATOR.join(body), tuple(offsets)
    try:
        digest = hashlib.sha256(text.encode("utf-8") if utf8 is None else utf8).hexdigest()
    except UnicodeEncodeError as e:  # only in-memory texts can hold lone surrogates
        raise IngestError(source or title, f"text is not valid Unicode ({e.reason} at character {e.start})") from None
    return Document(-1, title, source, text, offsets, digest, size, fmt, encoding)


def progress_bar(progress: bool | None, total: int | None, big: int, desc: str, unit: str):
    """A tqdm bar (reading files, tokenizing characters): progress=False never, True always,
    None on a terminal when total >= big or the total is not known in advance (None)."""
    from tqdm.auto import tqdm

    if progress is False or (progress is None and total is not None and total < big):
        disable = True
    else:
        disable = None if progress is None else False  # None: tqdm shows it only on a tty
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=disable, file=sys.stderr)
