"""Documents: read files into a `Corpus`, then pack it into token ids with exact spans.

    corpus = ingest(["reports/", "contract.pdf", ("Notes", "free text ...")])
    packed = corpus.pack(tokenizer, budget=1_000_000)
    packed.ids            # numpy int32 array of token ids
    packed.spans          # DocumentSpan(doc_id, title, page, start, end, truncated, ...)
    packed.locate(12345)  # -> (Document, page) or None for delimiter tokens

Readers (by file extension, case-insensitive):

- `.txt` `.text` `.md` `.markdown`: UTF-8 (with or without a byte order mark), or UTF-16 /
  UTF-32 with a byte order mark. Otherwise the bytes are tried as Windows-1252 (cp1252), and
  accepted only if they decode without error and look like Western text (see `_decode_text`);
  anything else is refused as "not UTF-8 text". Line breaks are normalised to "\\n".
- `.html` `.htm`: the standard library's `html.parser`; script, style, noscript and template
  contents are dropped, entities decoded, whitespace collapsed as a browser would, and block
  elements (p, div, li, h1-h6, tr, br, ...) become line breaks. The <title> becomes the title.
- `.pdf`: pypdf, page by page. The document text is the page texts joined by a form feed
  ("\\f"); `Document.page_offsets` holds where each page starts. A blank page inside a PDF is
  kept as an empty page; a PDF with no text on any page (a scan) is refused. Repairs pypdf
  makes to a damaged file are kept in `Document.warnings` (and logged with the file name).
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

Packing (`Corpus.pack`): each document as [header][text][footer] from a plain-text template,
each piece encoded on its own so that spans are exact; see `Corpus.pack` for the layout and
the budget policies, `delimiters` for the header/footer text of one document.
"""

from __future__ import annotations

import array
import bisect
import codecs
import contextlib
import dataclasses
import fnmatch
import hashlib
import html
import io
import logging
import os
import re
import stat
import string
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tiktoken

from .tokenizer import LLAMA4_PATTERN, MAX_WS_RUN, Tokenizer, split_for_encoding

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

_log = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".text", ".md", ".markdown")
HTML_EXTENSIONS = (".html", ".htm")
PDF_EXTENSIONS = (".pdf",)
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + HTML_EXTENSIONS + PDF_EXTENSIONS

# Pages of a paged document are joined by this character; it belongs to the page it ends.
PAGE_SEPARATOR = "\f"

# The default delimiter: one header line before each document and a closing tag after it,
# plain text (no special tokens), so the model sees each document's id, title and source.
DEFAULT_TEMPLATE = '<document id="{id}" title="{title}" source="{source}">\n{text}\n</document>\n\n'
TEMPLATE_FIELDS = ("id", "title", "source")
# The chunk marker (`Corpus.pack(chunk=...)`): a short line naming the document that closes each
# attention chunk's piece of its text. The title follows a space, so its words are the same
# tokens as in running text (" Slow Robin"), and comes right after the id, so a model can copy
# it by an induction lookup on the id (behind a shared ":" every title looks alike to one).
DEFAULT_MARKER = "[{id} {title}]\n"

# Show progress bars by default only for work this big (and only on a terminal).
_PROGRESS_MIN_FILES = 100
_PROGRESS_MIN_CHARS = 20_000_000
# Without the array fast path (see _fast_encoding), texts go to `tokenizer.encode_batch` in
# groups of about this many characters, so that the progress bar moves.
_ENCODE_GROUP_CHARS = 8_000_000


# ============================================================================================
# Records
# ============================================================================================


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
    warnings: problems the reader worked around (pypdf's repairs of a damaged PDF, which can
        mean missing text); each is also logged on the "longctx.text.ingest" logger.
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
        `document.text[char_start:char_end]` (delimiters are outside every span).
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


# ============================================================================================
# Text decoding
# ============================================================================================

# Byte order marks, longest first: the UTF-32 LE mark begins with the UTF-16 LE mark.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# C0 control bytes that do not occur in text (tab, newlines, form feed, vertical tab and
# escape do occur: in tables, old page breaks and terminal logs) and DEL.
_CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0E, *range(0x0F, 0x1B), *range(0x1C, 0x20), 0x7F])
_MAX_CONTROL_RATIO = 0.005
# cp1252 fallback limits: Western European text is mostly ASCII with isolated accented letters;
# multi-byte encodings (Shift-JIS, GBK, UTF-8 damaged, ...) and Cyrillic/Greek code pages give
# many high bytes, often in runs.
_MAX_HIGH_RATIO = 0.2
_HIGH_RUN = re.compile(rb"[\x80-\xff]{4,}")
_NON_SPACE = re.compile(r"\S")


def _decode_text(data: bytes, path: str, declared: str | None = None) -> tuple[str, str]:
    """Bytes of a text file -> (text with "\\n" line breaks, encoding name). Raises IngestError.

    Order: a byte order mark decides (UTF-8/16/32); a `declared` charset (HTML meta) is used
    next; NUL bytes or many control bytes mean binary; then UTF-8; then cp1252 if the bytes
    decode cleanly and look like Western text (at most 20 % bytes >= 0x80, no run of 4 or more
    of them). NOTE: latin-1 is never used as a fallback: it decodes any bytes, so it would turn
    any binary or foreign-encoded file into garbage text without complaint.
    """
    if not data:
        raise IngestError(path, "empty file (0 bytes)")
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(codec)
            except UnicodeDecodeError as e:
                raise IngestError(path, f"not valid {codec.upper()} text despite its byte order mark ({e.reason} at byte {e.start})") from None
            name = "utf-8" if codec == "utf-8-sig" else codec
            _check_control(text.encode("utf-8"), path)
            return _normalise_newlines(text), name
    if b"\x00" in data:
        raise IngestError(path, "binary data, not text (contains NUL bytes; UTF-16/32 text needs a byte order mark)")
    _check_control(data, path)
    if declared is not None:
        try:
            return _normalise_newlines(data.decode(declared)), declared
        except UnicodeDecodeError as e:
            raise IngestError(path, f"not valid {declared} text as its charset declares ({e.reason} at byte {e.start})") from None
    try:
        return _normalise_newlines(data.decode("utf-8")), "utf-8"
    except UnicodeDecodeError as e:
        utf8_error = f"{e.reason} at byte {e.start}"
    high = len(data) - len(data.translate(None, bytes(range(0x80, 0x100))))
    if high <= _MAX_HIGH_RATIO * len(data) and not _HIGH_RUN.search(data):
        try:
            return _normalise_newlines(data.decode("cp1252")), "cp1252"
        except UnicodeDecodeError:
            pass
    raise IngestError(path, f"not UTF-8 text ({utf8_error}) and not plausible Windows-1252; re-save it as UTF-8")


def _check_control(data: bytes, path: str) -> None:
    n_control = len(data) - len(data.translate(None, _CONTROL_BYTES))
    if n_control > _MAX_CONTROL_RATIO * len(data):
        raise IngestError(path, f"binary data, not text ({n_control} control bytes in {len(data)})")


def _normalise_newlines(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _require_text(text: str, path: str, what: str = "no text (only whitespace)") -> None:
    if _NON_SPACE.search(text) is None:
        raise IngestError(path, what)


# ============================================================================================
# Readers: each takes (bytes, path label) and returns (title or None, text or pages, encoding)
# ============================================================================================


def _read_text(data: bytes, path: str, markdown: bool) -> tuple[str | None, str, str]:
    text, encoding = _decode_text(data, path)
    _require_text(text, path)
    title = None
    if markdown:
        # A Markdown file that opens with a level-1 heading names itself.
        m = re.match(r"\s*# +(.+?)[ \t#]*(?:\n|$)", text)
        if m:
            title = m.group(1).strip() or None
    return title, text, encoding


# Elements whose content is not visible text.
_HTML_SKIP = {"script", "style", "noscript", "template"}
# Block elements that end a paragraph (blank line) or a line.
_HTML_PARAGRAPH = {
    "address", "article", "aside", "blockquote", "details", "dl", "fieldset", "figure", "footer",
    "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "main", "nav", "ol", "p", "pre",
    "section", "table", "ul",
}  # fmt: skip
_HTML_LINE = {
    "body", "br", "caption", "dd", "div", "dt", "figcaption", "html", "legend", "li", "option",
    "summary", "tbody", "tfoot", "thead", "tr",
}  # fmt: skip
_HTML_CELL = {"td", "th"}
_WS_RUN = re.compile(r"[ \t\n\r\f\v]+")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


class _HTMLText(HTMLParser):
    """Collects visible text: block structure as line breaks, whitespace collapsed outside <pre>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)  # entities arrive decoded in handle_data
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self.skip = 0  # depth inside script/style/...
        self.pre = 0
        self.in_title = False
        self.newlines = 2  # newlines at the end of the output; "start of text" counts as many

    def _break(self, n: int) -> None:
        if self.newlines < n:
            self.parts.append("\n" * (n - self.newlines))
            self.newlines = n

    def handle_starttag(self, tag, attrs):
        if tag in _HTML_SKIP:
            self.skip += 1
        elif tag == "title":
            self.in_title = True
        elif tag == "br":
            # A <br> is a line break even right after another one.
            self.parts.append("\n")
            self.newlines += 1
        elif tag in _HTML_PARAGRAPH:
            self._break(2)
        elif tag in _HTML_LINE:
            self._break(1)
        elif tag in _HTML_CELL and self.newlines == 0:
            self.parts.append("\t")
        if tag == "pre":
            self.pre += 1

    def handle_startendtag(self, tag, attrs):
        # <br/>, <hr/>: a break; a self-closed <script/> has no content to skip.
        if tag not in _HTML_SKIP:
            self.handle_starttag(tag, attrs)
            if tag == "pre":
                self.pre -= 1

    def handle_endtag(self, tag):
        if tag in _HTML_SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "title":
            self.in_title = False
        elif tag in _HTML_PARAGRAPH:
            self._break(2)
        elif tag in _HTML_LINE and tag != "br":
            self._break(1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if self.skip:
            return
        if self.in_title:
            self.title_parts.append(data)
            return
        if not self.pre:
            data = _WS_RUN.sub(" ", data)
            if self.newlines:
                data = data.lstrip(" ")
            if not data:
                return
        self.parts.append(data)
        self.newlines = len(data) - len(data.rstrip("\n"))

    def text(self) -> str:
        text = "".join(self.parts)
        text = re.sub(r"[ \t]+\n", "\n", text)  # spaces left before a break
        text = re.sub(r"\n{3,}", "\n\n", text)  # consecutive blocks: at most one blank line
        return text.strip("\n").rstrip()


def _read_html(data: bytes, path: str) -> tuple[str | None, str, str]:
    declared = None
    m = _META_CHARSET.search(data[:4096])
    if m:
        name = m.group(1).decode("ascii").lower()
        try:
            name = codecs.lookup(name).name
        except LookupError:
            name = None
        # As browsers do (WHATWG encoding standard), latin-1 and ascii labels mean cp1252;
        # utf-16 labels in a meta tag are ignored (the BOM decides those).
        if name in ("latin-1", "iso8859-1", "ascii"):
            name = "cp1252"
        declared = name if name and not name.startswith("utf-16") else None
    source, encoding = _decode_text(data, path, declared)
    parser = _HTMLText()
    try:
        parser.feed(source)
        parser.close()
    except Exception as e:  # html.parser is lenient; anything it raises means unusable markup
        raise IngestError(path, f"malformed HTML ({type(e).__name__}: {e})") from None
    text = parser.text()
    _require_text(text, path, "no visible text in HTML")
    title = _WS_RUN.sub(" ", "".join(parser.title_parts)).strip() or None
    return title, text, encoding


_pypdf_lock = threading.Lock()


@contextlib.contextmanager
def _pypdf_warnings():
    """Collect what pypdf logs while reading one file. Why: pypdf reports the repairs it makes
    to a damaged PDF ("EOF marker not found", "some data might not be read") as log warnings
    without a file name; we attach them to the document or to the error instead."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger, handler = logging.getLogger("pypdf"), Collect(logging.WARNING)
    with _pypdf_lock:
        propagate = logger.propagate
        logger.addHandler(handler)
        logger.propagate = False
        try:
            yield messages
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate


def _read_pdf(data: bytes, path: str) -> tuple[None, list[str], tuple[str, ...]]:
    """PDF -> (None, page texts, pypdf warnings). Encrypted files: the empty password is tried
    (PDFs that only carry an owner password, to restrict printing or copying, open with it, as
    in any viewer); if it does not open the file, it is refused as encrypted. No other
    passwords are tried."""
    if not data:
        raise IngestError(path, "empty file (0 bytes)")
    if b"%PDF-" not in data[:1024]:
        raise IngestError(path, "corrupt PDF (no %PDF- header)")
    with _pypdf_warnings() as notes:
        try:
            pages = _pdf_pages(data, path)
        except IngestError as e:
            raise IngestError(path, e.reason + (f"; pypdf: {notes[0]}" if notes else "")) from None
    if not pages:
        raise IngestError(path, "PDF has no pages")
    # The separator must stay unambiguous, so a form feed inside a page becomes a line break.
    pages = [_normalise_newlines(p).replace(PAGE_SEPARATOR, "\n") for p in pages]
    if all(_NON_SPACE.search(p) is None for p in pages):
        raise IngestError(path, f"no text layer (scanned PDF?): none of its {len(pages)} pages has text")
    for note in notes:
        _log.warning("%s: pypdf: %s", path, note)
    return None, pages, tuple(notes)


def _pdf_pages(data: bytes, path: str) -> list[str]:
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except DependencyError as e:
                raise IngestError(path, f"encrypted PDF that cannot be decrypted here ({e})") from None
            if opened == pypdf.PasswordType.NOT_DECRYPTED:
                raise IngestError(path, "encrypted PDF (a password is required)")
        return [page.extract_text() or "" for page in reader.pages]
    except IngestError:
        raise
    except FileNotDecryptedError:
        raise IngestError(path, "encrypted PDF (a password is required)") from None
    except Exception as e:
        # pypdf reports damaged files with its own errors, but also with KeyError, ValueError,
        # AttributeError, ... from deep inside the parser: all mean the file is unusable.
        raise IngestError(path, f"corrupt PDF ({type(e).__name__}: {e})") from None


# ============================================================================================
# Finding files
# ============================================================================================


def _format_of(path: Path) -> str | None:
    ext = path.suffix.lower()
    if ext in (".md", ".markdown"):
        return "markdown"
    if ext in TEXT_EXTENSIONS:
        return "text"
    if ext in HTML_EXTENSIONS:
        return "html"
    if ext in PDF_EXTENSIONS:
        return "pdf"
    return None


def _matches(rel: str, pattern: str) -> bool:
    """`glob` rule: a pattern without "/" matches the file name, one with "/" the path relative
    to the folder given (fnmatch: "*" also crosses "/"; "**/" may match no folder at all)."""
    if "/" not in pattern:
        return fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern)
    if fnmatch.fnmatchcase(rel, pattern):
        return True
    return pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:])


def _walk(folder: Path, glob: str | None, label: str) -> tuple[list[tuple[Path, str]], list[Skipped]]:
    """Files under `folder` as (path, label) in a stable order, plus unreadable folders."""
    files: list[tuple[Path, str]] = []
    problems: list[Skipped] = []
    seen: set[str] = set()  # real paths of visited folders: a symlink loop is entered once

    def visit(d: Path, rel: str) -> None:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            problems.append(Skipped(_join(label, rel), f"cannot list folder ({e.strerror or e})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            sub = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                visit(Path(entry.path), sub)
            elif glob is None or _matches(sub, glob):
                files.append((Path(entry.path), _join(label, sub)))

    visit(folder, "")
    return files, problems


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

    def __init__(self, documents: list[Document], skipped: list[Skipped] | None = None, duplicates: list[Duplicate] | None = None):
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

    def pack(
        self,
        tokenizer,
        *,
        budget: int | None = None,
        template: str = DEFAULT_TEMPLATE,
        overflow: str = "error",
        chunk: int | None = None,
        offset: int = 0,
        marker: str = DEFAULT_MARKER,
        progress: bool | None = None,
        num_threads: int | None = None,
    ) -> "Packed":
        """Lay the documents out as token ids with delimiters; return ids and exact spans.

        tokenizer: a `longctx.text.tokenizer.Tokenizer` (needs `encode_batch` and `decode_bytes`).
        budget: the most tokens the result may have (delimiters included); None = no limit.
        template: delimiter format with exactly one `{text}` field; the part before it is the
            header, the part after it the footer, both formatted with {id}, {title}, {source}
            (values HTML-escaped and on one line, so a title cannot break the markup).
        overflow: what to do when the documents need more than `budget` tokens:
            "error"    raise BudgetError saying how many tokens over (the default);
            "drop"     keep the longest prefix of whole documents that fits, drop the rest;
            "truncate" as "drop", then cut the first document that does not fit to fill the
                       remaining budget (header and footer kept, text cut at a token boundary
                       that is also a character boundary; its last span has truncated=True).
            Left-out documents are listed in `Packed.dropped`.
        chunk: for a model whose local attention layers see only their own chunk of `chunk`
            tokens (Llama 4's iRoPE layers: `ModelConfig.attention_chunk_size`): every chunk
            that holds a document's text then names the document too, after that text: the
            text stops short of each chunk's end (at a character boundary) for a `marker`
            line, and the last piece is closed by one as well. Every text token then has its
            document's marker later in its own chunk (where a local layer at the marker can
            read the text it closes). None (default): no markers.
        offset: the prompt position of the first packed token (the tokens the prompt puts
            before the corpus, e.g. `len(longctx.text.prompt.context_prefix(tok, []))`), so that
            markers fall on the model's chunk starts. Only with `chunk`.
        marker: the marker line, formatted with {id}, {title}, {source} like the header; at
            most chunk // 2 tokens.
        progress: a tqdm bar (None: only for big corpora on a terminal).
        num_threads: encoding threads (default: all cores).

        Layout, per document: [header tokens][text tokens][footer tokens]. Header, footer and
        each page of the text are encoded separately and concatenated, never merged across a
        boundary; so the tokens of each span decode to exactly that page's text (BPE merges
        across a page boundary are given up, which costs a token now and then), and `locate`
        is exact. Spans are per page for paged documents (PDFs), one per document otherwise;
        with `chunk`, [header][text][marker][text][marker]...[footer], and a page is split into
        one span per piece between markers.
        """
        if overflow not in ("error", "drop", "truncate"):
            raise ValueError(f"overflow must be 'error', 'drop' or 'truncate', got {overflow!r}")
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise ValueError(f"budget must be a non-negative int or None, got {budget!r}")
        header_fmt, footer_fmt = _split_template(template)
        if chunk is not None and (not isinstance(chunk, int) or chunk < 8):
            raise ValueError(f"chunk must be an int >= 8 or None, got {chunk!r}")
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        marker_fmt = ""
        if chunk:
            try:  # the marker takes the header's fields and no {text}
                marker_fmt, _ = _split_template(marker + "{text}")
            except ValueError as e:
                raise ValueError(f"bad marker {marker!r}: {e}") from None
        threads = num_threads or os.cpu_count() or 1

        # One entry per document: header, footer and page strings, and their char ranges.
        plans = []
        for doc in self.documents:
            ranges = doc.page_ranges()
            pieces = list(_render(doc, header_fmt, footer_fmt))
            if chunk:
                pieces.append(_render(doc, marker_fmt, "")[0])
            pieces += [doc.text[a:b] for _, a, b in ranges]
            plans.append((doc, ranges, pieces))

        # Tokenize, in document order, on all cores. Under "drop"/"truncate" we stop once the
        # budget is passed: documents after that are dropped without being tokenized.
        encoded: list[list[np.ndarray]] = []
        total = 0
        stop_early = budget is not None and overflow != "error"
        bar = _bar(progress, sum(len(d.text) for d in self.documents), _PROGRESS_MIN_CHARS, "tokenizing", "char")
        stream = _iter_encoded(tokenizer, [p for _, _, pieces in plans for p in pieces], threads)
        try:
            for doc, _, pieces in plans:
                if stop_early and total > budget:
                    break
                arrs = [next(stream) for _ in pieces]
                encoded.append(arrs)
                total += sum(len(a) for a in arrs)
                bar.update(len(doc.text))
        finally:
            stream.close()
            bar.close()

        # Decide what fits. With markers a document's size depends on where it starts.
        marks = _Marks(chunk, offset) if chunk else None
        if marks is None:
            sizes = [sum(len(a) for a in arrs) for arrs in encoded]
        else:
            long = next((plans[i][0] for i, arrs in enumerate(encoded) if len(arrs[2]) > chunk // 2), None)
            if long is not None:  # (a marker must leave most of a chunk to the text)
                raise ValueError(f"the chunk marker of document {long.id} ({long.title!r}) takes more than "
                                 f"chunk // 2 = {chunk // 2} tokens; use a shorter marker or a larger chunk")
            sizes, pos = [], 0
            for (_, ranges, _), arrs in zip(plans, encoded):
                sizes.append(sum(len(ids) for ids, _ in _lay_out(tokenizer, ranges, arrs, pos, marks)))
                pos += sizes[-1]
            total = sum(sizes)
        n_keep, cut = len(encoded), None
        if budget is not None and total > budget:
            if overflow == "error":
                fit, used = 0, 0
                while fit < len(sizes) and used + sizes[fit] <= budget:
                    used += sizes[fit]
                    fit += 1
                raise BudgetError(
                    f"the packed corpus needs {total} tokens but the budget is {budget}: "
                    f"{total - budget} tokens over ({len(sizes)} documents; the first {fit} fit). "
                    "Raise the budget, or pass overflow='drop' (drop whole documents from the end) "
                    "or overflow='truncate' (also cut the first document that does not fit).",
                    needed=total,
                    budget=budget,
                )
            used, n_keep = 0, 0
            while used + sizes[n_keep] <= budget:
                used += sizes[n_keep]
                n_keep += 1
            if overflow == "truncate":
                cut = _truncate(tokenizer, plans[n_keep][1], encoded[n_keep], budget - used, used, marks)
        return Packed._build(plans, encoded, n_keep, cut, tokenizer, template, budget, marks)


# --------------------------------------------------------------------------------------------
# Tokenizing straight into arrays
# --------------------------------------------------------------------------------------------

# Texts up to this length are encoded whole; longer ones are cut by the tokenizer's
# `split_for_encoding` (on boundaries that leave the ids unchanged) so that one huge document
# still uses every core.
_WHOLE_TEXT_CHARS = 1 << 20
# Work per thread-pool job: big enough that the pool's per-job cost (tens of microseconds) is
# noise, small enough to balance the threads.
_JOB_CHARS = 1 << 16
_PROBE = "Hello, World! It's 2024-06-30: 12345 items\n\n  \tcafé naïve 日本語 ok?\r\n<|eot|> x  \n"
_fast_encodings: dict[str, object] = {}  # tokenizer fingerprint -> tiktoken.Encoding or None


def _fast_encoding(tokenizer):
    """A tiktoken Encoding that encodes plain text exactly as `tokenizer` does, or None.

    Why: `Tokenizer.encode_batch` returns Python lists, and turning 10M Python ints into an
    array and freeing them costs as much as a third of the encoding itself on 2 cores (GIL-bound
    work that no thread can share). tiktoken's `encode_to_numpy` hands back a uint32 buffer and
    releases the GIL, so a thread pool of it is faster than even the list-returning batch call.
    NOTE: this belongs in the tokenizer (an array-returning encode_batch); until it has one, the
    encoding is rebuilt here from the tokenizer's public API (its ranks via `token_bytes`, its
    regex LLAMA4_PATTERN) and accepted only if it agrees with `tokenizer.encode` on a probe.
    """
    if not isinstance(tokenizer, Tokenizer) or not hasattr(tiktoken.Encoding, "encode_to_numpy"):
        return None  # other tokenizers, and tiktoken < 0.8: the tokenizer's own encode_batch
    key = tokenizer.fingerprint
    if key not in _fast_encodings:
        ranks = {tokenizer.token_bytes(i): i for i in range(tokenizer.n_ranks)}
        # NOTE: keep the special tokens: with an empty special-token table encode_to_numpy
        # measured about 2x slower (tiktoken 0.14).
        enc = tiktoken.Encoding(
            f"longctx-pack-{key[:12]}", pat_str=LLAMA4_PATTERN, mergeable_ranks=ranks, special_tokens=dict(tokenizer.special_tokens)
        )
        agrees = enc.encode_to_numpy(_PROBE, disallowed_special=()).tolist() == tokenizer.encode(_PROBE)
        _fast_encodings[key] = enc if agrees else None
    return _fast_encodings[key]


def _iter_encoded(tokenizer, texts: list[str], num_threads: int) -> Iterator[np.ndarray]:
    """Yield the ids of each of `texts` as an int32 array, in order, exactly as
    `tokenizer.encode_batch` would give them. Closing the generator early stops the work.

    Fast path: the texts are cut into jobs of about _JOB_CHARS characters (short texts, like
    the delimiters, share a job; long ones are split by the tokenizer's `split_for_encoding`)
    and run on one thread pool, at most a few jobs per thread ahead of the consumer, so there
    is no barrier between groups and the memory in flight stays small.
    """
    enc = _fast_encoding(tokenizer)
    if enc is None:
        k = 0
        while k < len(texts):
            j, chars = k, 0
            while j < len(texts) and (j == k or chars < _ENCODE_GROUP_CHARS):
                chars += len(texts[j])
                j += 1
            for ids in tokenizer.encode_batch(texts[k:j], num_threads=num_threads):
                yield _as_int32(ids)
            k = j
        return

    # Each text becomes one or more pieces, or None: a text with a huge whitespace run, which
    # only the tokenizer's own (slower, list-returning) path encodes correctly. A short text
    # seen before (the same footer after every document) is encoded once: an int index
    # points to its first occurrence.
    plans: list[list[str] | int | None] = []
    first_seen: dict[str, int] = {}
    for k, text in enumerate(texts):
        if len(text) <= 256:
            seen = first_seen.setdefault(text, k)
            if seen != k:
                plans.append(seen)
                continue
        if len(text) <= _WHOLE_TEXT_CHARS and not _may_hold_long_space_run(text):
            plans.append([text])
            continue
        parts = split_for_encoding(text)
        plans.append(None if any(isinstance(p, bytes) for p in parts) else parts)
    pieces = [p for plan in plans if isinstance(plan, list) for p in plan]
    jobs, start, size = [], 0, 0
    for i, p in enumerate(pieces):
        size += len(p)
        if size >= _JOB_CHARS:
            jobs.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(pieces):
        jobs.append((start, len(pieces)))

    def run(job: tuple[int, int]) -> list[np.ndarray]:
        # disallowed_special=(): special-token text is plain text, as in encode_ordinary.
        return [enc.encode_to_numpy(p, disallowed_special=()).view(np.int32) for p in pieces[job[0] : job[1]]]

    pool = ThreadPoolExecutor(max(1, num_threads))
    window: deque = deque()
    next_job = 0

    def piece_arrays() -> Iterator[np.ndarray]:
        nonlocal next_job
        while window or next_job < len(jobs):
            while next_job < len(jobs) and len(window) < 4 * max(1, num_threads):
                window.append(pool.submit(run, jobs[next_job]))
                next_job += 1
            yield from window.popleft().result()

    arrays = piece_arrays()
    short: dict[int, np.ndarray] = {}  # index of a short text's first occurrence -> its ids
    try:
        for k, (text, plan) in enumerate(zip(texts, plans)):
            if plan is None:
                ids = _as_int32(tokenizer.encode(text))
            elif isinstance(plan, int):
                ids = short[plan]
            elif len(plan) == 1:
                ids = next(arrays)
            else:
                ids = np.concatenate([next(arrays) for _ in plan])
            if len(text) <= 256 and k not in short and plan is not None and not isinstance(plan, int):
                short[k] = ids
            yield ids
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _may_hold_long_space_run(text: str) -> bool:
    """True if `text` might hold a whitespace run long enough to trip tiktoken's regex engine
    (see longctx.text.tokenizer.MAX_WS_RUN). Any run of 2B-1 or more characters covers a whole
    aligned block of B characters, so finding a non-space in every block rules such runs out,
    at the cost of one short regex search per block instead of a scan of every character."""
    if len(text) < MAX_WS_RUN:
        return False
    block = MAX_WS_RUN // 2
    return any(_NON_SPACE.search(text, a, a + block) is None for a in range(0, len(text) - block + 1, block))


def _as_int32(ids: list[int]) -> np.ndarray:
    """list of token ids -> int32 array. NOTE: array("I", list) converts Python ints about 3x
    faster than np.array(list, np.int32) (0.08 s vs 0.24 s for 10M ids); ids are < 2**31, so
    the unsigned 32-bit buffer reads the same as int32."""
    return np.frombuffer(array.array(_U32, ids), dtype=np.int32)


_U32 = next(code for code in "IL" if array.array(code).itemsize == 4)  # "I" on every common platform


def _split_template(template: str) -> tuple[str, str]:
    """Template -> (header format string, footer format string), checking its fields."""
    header, footer, seen_text = [], [], 0
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"bad template {template!r}: {e}") from None
    for literal, field, spec, conv in parsed:
        out = footer if seen_text else header
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if field == "text":
            if spec or conv:
                raise ValueError("template: {text} takes no format spec or conversion")
            seen_text += 1
            continue
        if field not in TEMPLATE_FIELDS:
            raise ValueError(f"template field {{{field}}} is unknown; allowed: {{text}}, " + ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS))
        out.append("{" + field + ("!" + conv if conv else "") + (":" + spec if spec else "") + "}")
    if seen_text != 1:
        raise ValueError(f"template must contain {{text}} exactly once, found {seen_text}: {template!r}")
    return "".join(header), "".join(footer)


def delimiters(doc: Document, template: str = DEFAULT_TEMPLATE) -> tuple[str, str]:
    """The (header, footer) strings `pack` puts around `doc` with this template."""
    return _render(doc, *_split_template(template))


def _render(doc: Document, header_fmt: str, footer_fmt: str) -> tuple[str, str]:
    fields = {"id": str(doc.id), "title": _attr(doc.title), "source": _attr(doc.source or "")}
    return header_fmt.format(**fields), footer_fmt.format(**fields)


_ATTR_BREAK = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


_ATTR_SPECIAL = re.compile(r"[&<>\"'\x00-\x1f\x7f\u2028\u2029]")


def _attr(value: str) -> str:
    """A value for the delimiter line: HTML-escaped, control characters and newlines as spaces."""
    if _ATTR_SPECIAL.search(value) is None:
        return value  # the common case, checked first: 100K documents pack noticeably faster
    return _ATTR_BREAK.sub(" ", html.escape(value, quote=True))


class _Marks(NamedTuple):
    """Chunk markers of `Corpus.pack`: the attention chunk and the prompt offset of the packing."""

    chunk: int
    offset: int


def _lay_out(tokenizer, ranges, arrs: list[np.ndarray], pos: int, marks: _Marks | None,
             cut: tuple[int, int | None] | None = None, chars: bool = False) -> list[tuple[np.ndarray, tuple | None]]:
    """One document's pieces in packed order, its header at token position `pos`: a list of
    (ids, where), where is None for a delimiter (header, marker, footer) and
    (page, char_start, char_end, truncated) for text (char offsets only with `chars`, else
    None). `arrs` is the document's [header, footer, (marker,) page...] ids; `cut` keeps only
    the first cut[0] text tokens, which end at char cut[1]."""
    header, footer = arrs[0], arrs[1]
    marker, pages = (arrs[2], arrs[3:]) if marks else (None, arrs[2:])
    out: list[tuple[np.ndarray, tuple | None]] = [(header, None)]
    pos += len(header)
    open_text = False  # text since the latest marker
    limit = None if cut is None else cut[0]
    for (page, a, b), arr in zip(ranges, pages):
        truncated = False
        if limit is not None:
            if limit <= 0:
                break
            if len(arr) >= limit:  # the cut falls in this page (or right at its end)
                truncated, arr, b = True, arr[:limit], cut[1]
            limit -= len(arr)
        if marks is None:
            out.append((arr, (page, a, b, truncated)))
            pos += len(arr)
            continue
        i = 0
        while True:
            room = marks.chunk - (marks.offset + pos) % marks.chunk - len(marker)  # text before this chunk's marker
            j = min(len(arr), i + max(room, 0))
            while i < j < len(arr) and tokenizer.decode_bytes([int(arr[j])])[:1] in _UTF8_CONTINUATION:
                j -= 1  # back to a character boundary
            if j == i < len(arr):  # no room left in this chunk: mark it and go on in the next
                out.append((marker, None))
                pos, open_text = pos + len(marker), False
                continue
            end = b if j == len(arr) or not chars else a + len(tokenizer.decode_bytes(arr[i:j].tolist()).decode("utf-8"))
            out.append((arr[i:j], (page, a if chars else None, end if chars else None, truncated and j == len(arr))))
            pos, open_text = pos + j - i, open_text or j > i
            a, i = end, j
            if i == len(arr):
                break
            out.append((marker, None))  # the chunk is full: its marker closes it
            pos, open_text = pos + len(marker), False
    if open_text:
        out.append((marker, None))
    out.append((footer, None))
    return out


_UTF8_CONTINUATION = frozenset(bytes([c]) for c in range(0x80, 0xC0))


def _truncate(tokenizer, ranges, arrs: list[np.ndarray], room: int, pos: int, marks: "_Marks | None"):
    """How much of a document fits in `room` tokens from position `pos`: (n text tokens kept,
    chars kept) or None.

    The cut is at a token boundary that is also a character boundary: byte-level BPE can end a
    token inside a multi-byte character, and a span must decode exactly to a prefix of the text.
    """
    header, footer, pages = arrs[0], arrs[1], arrs[2 + (marks is not None):]
    text_ids = np.concatenate(pages) if pages else np.zeros(0, np.int32)
    if marks is None:
        keep = min(room - len(header) - len(footer), len(text_ids))
    else:  # the most text tokens whose layout (markers included) fits: the size grows with keep
        def size(keep: int) -> int:
            return sum(len(ids) for ids, _ in _lay_out(tokenizer, ranges, arrs, pos, marks, (keep, None)))

        lo, hi = 0, len(text_ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(mid) <= room else (lo, mid - 1)
        keep = lo
    while keep > 0:
        try:
            n_chars = len(tokenizer.decode_bytes(text_ids[:keep].tolist()).decode("utf-8"))
            return keep, n_chars
        except UnicodeDecodeError:
            keep -= 1  # the last token ends inside a character: drop it
    return None


class Packed:
    """Token ids of a packed corpus and where each document lies in them.

    ids: numpy int32 array (n_tokens,).
    spans: list of DocumentSpan in token order; disjoint; one per page of a paged document,
        one per unpaged document (with chunk markers: one per piece between markers). Empty
        pages give empty spans (start == end).
    documents: the packed documents, in order; dropped: those left out by the budget.
    template, budget, tokenizer_fingerprint: how it was packed.
    """

    def __init__(self, ids: np.ndarray, spans: list[DocumentSpan], documents: list[Document], dropped: list[Document], *, template: str, budget: int | None, tokenizer_fingerprint: str | None):
        self.ids = ids
        self.spans = spans
        self.documents = documents
        self.dropped = dropped
        self.template = template
        self.budget = budget
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self._docs = {d.id: d for d in documents}
        self._by_doc: dict[int, list[DocumentSpan]] = {}
        for s in spans:
            self._by_doc.setdefault(s.doc_id, []).append(s)
        # Non-empty spans only: locate bisects on their starts.
        live = [s for s in spans if s.end > s.start]
        self._live = live
        self._starts = [s.start for s in live]

    @classmethod
    def _build(cls, plans, encoded, n_keep, cut, tokenizer, template, budget, marks=None) -> "Packed":
        arrays: list[np.ndarray] = []
        spans: list[DocumentSpan] = []
        documents: list[Document] = []
        pos = 0
        n_docs = n_keep + (cut is not None)
        for i in range(n_docs):
            doc, ranges, _ = plans[i]
            for ids, where in _lay_out(tokenizer, ranges, encoded[i], pos, marks, cut if i == n_keep else None, chars=True):
                if where is not None:
                    spans.append(DocumentSpan(doc.id, doc.title, where[0], pos, pos + len(ids), *where[1:]))
                arrays.append(ids)
                pos += len(ids)
            documents.append(doc)
        ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        dropped = [p[0] for p in plans[n_docs:]]
        return cls(ids, spans, documents, dropped, template=template, budget=budget, tokenizer_fingerprint=getattr(tokenizer, "fingerprint", None))

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Packed({len(self.ids)} tokens, {len(self.documents)} documents, {len(self.spans)} spans, {len(self.dropped)} dropped)"

    def span_at(self, index: int) -> DocumentSpan | None:
        """The span holding token `index` (negative counts from the end), or None for a
        delimiter token. IndexError outside 0..len-1."""
        n = len(self.ids)
        if not -n <= index < n:
            raise IndexError(f"token index {index} out of range for {n} tokens")
        index = index + n if index < 0 else index
        k = bisect.bisect_right(self._starts, index) - 1
        if k >= 0 and index < self._live[k].end:
            return self._live[k]
        return None

    def locate(self, index: int) -> tuple[Document, int | None] | None:
        """Token index -> (document, page) it came from; page is 1-based for paged documents and
        None otherwise. Delimiter tokens (headers, footers) come from no document: None."""
        span = self.span_at(index)
        return None if span is None else (self._docs[span.doc_id], span.page)

    def document(self, doc_id: int) -> Document:
        """The packed document with this id (KeyError if it was dropped or never existed)."""
        if doc_id not in self._docs:
            why = "was dropped by the budget" if any(d.id == doc_id for d in self.dropped) else "is not in this corpus"
            raise KeyError(f"document {doc_id} {why}")
        return self._docs[doc_id]

    def page_spans(self, doc_id: int) -> list[DocumentSpan]:
        """The spans of one document, in order (one per page, or one; with chunk markers, one
        per piece of a page between markers)."""
        self.document(doc_id)
        return list(self._by_doc[doc_id])

    def span_of(self, doc_id: int) -> DocumentSpan:
        """One span covering the whole text of a document (page None; truncated if it was cut;
        with chunk markers, the markers inside the text too)."""
        parts = self.page_spans(doc_id)
        first, last = parts[0], parts[-1]
        return DocumentSpan(doc_id, first.title, None, first.start, last.end, first.char_start, last.char_end, last.truncated)


def _bar(progress: bool | None, total: int, big: int, desc: str, unit: str):
    """A tqdm bar: progress=False never, True always, None on a terminal when total >= big."""
    from tqdm.auto import tqdm

    if progress is False or (progress is None and total < big):
        disable = True
    else:
        disable = None if progress is None else False  # None: tqdm shows it only on a tty
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=disable, file=sys.stderr)


def ingest(
    paths_or_texts,
    *,
    glob: str | None = None,
    errors: str = "raise",
    progress: bool | None = None,
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
    progress: a tqdm bar over files (None: only for 100+ files on a terminal).
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if isinstance(paths_or_texts, (str, os.PathLike)):
        paths_or_texts = [paths_or_texts]
    elif not isinstance(paths_or_texts, Iterable):
        raise TypeError(f"ingest expects paths or (title, text) pairs, got {type(paths_or_texts).__name__}")

    skipped: list[Skipped] = []

    def fail(path: str, reason: str) -> None:
        if errors == "raise":
            raise IngestError(path, reason)
        skipped.append(Skipped(path, reason))

    # 1. Expand the inputs into work items, in order: ("file", Path, label) or ("text", ...).
    items: list[tuple] = []
    n_texts = 0
    for item in paths_or_texts:
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            label = os.fspath(item)
            if path.is_dir():
                files, problems = _walk(path, glob, Path(label).as_posix())
                for p in problems:
                    fail(p.path, p.reason)
                if not files:
                    fail(label, "folder has no files" + (f" matching {glob!r}" if glob else ""))
                items += [("file", p, lab) for p, lab in files]
            else:
                items.append(("file", path, label))
        elif isinstance(item, tuple) and len(item) == 2:
            items.append(("text", item, f"<text {n_texts}>", n_texts))
            n_texts += 1
        else:
            raise TypeError(
                f"ingest inputs must be paths (str or os.PathLike) or (title, text) pairs, got {type(item).__name__}: {item!r:.80}"
            )

    # 2. Read them.
    documents: list[Document] = []
    duplicates: list[Duplicate] = []
    by_hash: dict[str, int] = {}
    n_files = sum(1 for it in items if it[0] == "file")
    bar = _bar(progress, n_files, _PROGRESS_MIN_FILES, "reading", "file")
    for it in items:
        try:
            if it[0] == "file":
                doc = _read_file(it[1], it[2])
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
    return Corpus(documents, skipped, duplicates)


def _read_file(path: Path, label: str) -> Document:
    """One file -> Document (id -1: set by ingest). Raises IngestError."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IngestError(label, "no such file or folder") from None
    except OSError as e:
        raise IngestError(label, f"cannot access ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise IngestError(label, "not a regular file")
    fmt = _format_of(path)
    if fmt is None:
        ext = path.suffix or "(none)"
        raise IngestError(label, f"unsupported extension {ext} (supported: {' '.join(SUPPORTED_EXTENSIONS)})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IngestError(label, f"cannot read ({e.strerror or e})") from None
    notes: tuple[str, ...] = ()
    if fmt == "pdf":
        title, pages, notes = _read_pdf(data, label)
        encoding = None
    elif fmt == "html":
        title, pages, encoding = _read_html(data, label)
    else:
        title, pages, encoding = _read_text(data, label, markdown=fmt == "markdown")
    source = Path(label).as_posix()
    # Plain UTF-8 files already hold the text's UTF-8 bytes: hash them, skip re-encoding.
    same_bytes = fmt in ("text", "markdown") and encoding == "utf-8" and not data.startswith(codecs.BOM_UTF8) and b"\r" not in data
    doc = _make_document(title or path.stem, source, pages, len(data), fmt, encoding, utf8=data if same_bytes else None)
    return dataclasses.replace(doc, warnings=notes) if notes else doc


def _from_memory(pair: tuple, label: str, n: int) -> Document:
    title, body = pair
    if title is not None and not isinstance(title, str):
        raise TypeError(f"{label}: title must be a str or None, got {type(title).__name__}")
    if isinstance(body, str):
        _require_text(body, label, "empty text")
    elif isinstance(body, Sequence) and all(isinstance(p, str) for p in body):
        body = list(body)
        if not body:
            raise IngestError(label, "no pages")
        _require_text("".join(body), label, "empty text (all pages are blank)")
    else:
        raise TypeError(f"{label}: text must be a str or a list of page strings, got {type(body).__name__}")
    try:
        doc = _make_document(title if title is not None else f"text {n}", None, body, 0, "memory", None)
    except IngestError as e:
        raise IngestError(label, e.reason) from None
    return dataclasses.replace(doc, size=len(doc.text.encode("utf-8")))


def _make_document(
    title: str, source: str | None, body: str | list[str], size: int, fmt: str, encoding: str | None, utf8: bytes | None = None
) -> Document:
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
