"""Readers: one file's bytes -> a `Document`. The format comes from the file extension
(case-insensitive):

- `.txt` `.text` `.md` `.markdown`: UTF-8 (with or without a byte order mark), or UTF-16 /
  UTF-32 with a byte order mark. A UTF-8 file with a few damaged bytes (at most 1 % of its
  bytes) is decoded with U+FFFD replacement characters and a warning on the `Document`.
  Otherwise the bytes are tried as Windows-1252 (cp1252), and accepted only if they decode
  without error and look like Western text (see `_decode_text`); anything else is refused as
  "not UTF-8 text". Line breaks are normalised to "\\n".
- `.html` `.htm`: the standard library's `html.parser`; script, style, noscript and template
  contents are dropped, entities decoded, whitespace collapsed as a browser would, and block
  elements (p, div, li, h1-h6, tr, br, ...) become line breaks. The <title> becomes the title.
  An unterminated `<!--` comments out the rest of the page, as in browsers (HTML standard),
  with a warning on the `Document` saying how much was dropped.
- `.pdf`: pypdf, page by page. The document text is the page texts joined by a form feed
  ("\\f"); `Document.page_offsets` holds where each page starts. A blank page inside a PDF is
  kept as an empty page; a PDF with no text on any page (a scan) is refused. Repairs pypdf
  makes to a damaged file are kept in `Document.warnings` (and logged with the file name).

A file that cannot be read raises `IngestError` naming the file and the reason; so does a file
over `max_bytes` (decided from its size before any byte is read).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import io
import logging
import re
import stat
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

from .document import PAGE_SEPARATOR, Document, IngestError, make_document

__all__ = ["SUPPORTED_EXTENSIONS", "read_file", "require_text"]

_log = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".text", ".md", ".markdown")
HTML_EXTENSIONS = (".html", ".htm")
PDF_EXTENSIONS = (".pdf",)
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + HTML_EXTENSIONS + PDF_EXTENSIONS

# Budgets for PDF text extraction, checked after each page: a page of a real document holds a
# few thousand characters, a book a few million, and pypdf reads a page in milliseconds. A file
# far past these is hostile or broken (a content stream that expands without end, a page that
# takes minutes), and is refused, naming the page, before it costs more.
PDF_PAGE_CHARS = 1_000_000
PDF_TEXT_CHARS = 200_000_000
PDF_SECONDS = 120.0


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
# A UTF-8 file is decoded with replacement characters when at most this share of its bytes
# are damaged (and, unless cp1252 cannot read it, when it holds at least as many valid UTF-8
# multi-byte characters as damaged ones, i.e. it is UTF-8 text, not Western text in cp1252).
# Why 1 %: a stray byte or a few (a cut transfer, two files concatenated, one pasted symbol)
# then leaves at most one replacement in about a hundred characters, the text still readable;
# more damage means another encoding or binary data, better refused than read as noise.
_MAX_BAD_UTF8_RATIO = 0.01


def _decode_text(data: bytes, path: str, declared: str | None = None) -> tuple[str, str, tuple[str, ...]]:
    """Bytes of a text file -> (text with "\\n" line breaks, encoding name, warnings).
    Raises IngestError.

    Order: a byte order mark decides (UTF-8/16/32); a `declared` charset (HTML meta) other than
    UTF-8 is used next; NUL bytes or many control bytes mean binary; then UTF-8; then UTF-8 with
    replacement characters if it is UTF-8 nearly everywhere (`_MAX_BAD_UTF8_RATIO`); then cp1252
    if the bytes decode cleanly and look like Western text (at most 20 % bytes >= 0x80, no run
    of 4 or more of them); then UTF-8 with replacements if at most 1 % of the bytes are bad.
    NOTE: latin-1 is never used as a fallback: it decodes any bytes, so it would turn any
    binary or foreign-encoded file into garbage text without complaint.
    """
    if not data:
        raise IngestError(path, "empty file (0 bytes)")
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(codec)
            except UnicodeDecodeError as e:
                raise IngestError(
                    path, f"not valid {codec.upper()} text despite its byte order mark ({e.reason} at byte {e.start})"
                ) from None
            name = "utf-8" if codec == "utf-8-sig" else codec
            _check_control(text.encode("utf-8"), path)
            return _normalise_newlines(text), name, ()
    if b"\x00" in data:
        raise IngestError(path, "binary data, not text (contains NUL bytes; UTF-16/32 text needs a byte order mark)")
    _check_control(data, path)
    if declared is not None and declared != "utf-8":  # a declared UTF-8 is sniffed as undeclared text
        try:
            return _normalise_newlines(data.decode(declared)), declared, ()
        except UnicodeDecodeError as e:
            raise IngestError(
                path, f"not valid {declared} text as its charset declares ({e.reason} at byte {e.start})"
            ) from None
    try:
        return _normalise_newlines(data.decode("utf-8")), "utf-8", ()
    except UnicodeDecodeError as e:
        utf8_error = f"{e.reason} at byte {e.start}"
    text = data.decode("utf-8", "replace")
    legit = data.count("\ufffd".encode())  # replacement characters already in the file
    bad = text.count("\ufffd") - legit  # one per damaged byte sequence
    multibyte = len(text) - len(text.encode("ascii", "ignore")) - bad  # valid non-ASCII characters
    nearly_utf8 = bad <= _MAX_BAD_UTF8_RATIO * len(data)
    note = (
        f"not valid UTF-8 in {bad} place(s) (first: {utf8_error}); decoded as UTF-8 with "
        f"{bad} U+FFFD replacement character(s)"
    )
    if nearly_utf8 and multibyte >= bad:
        return _normalise_newlines(text), "utf-8", (note,)
    high = len(data) - len(data.translate(None, bytes(range(0x80, 0x100))))
    if high <= _MAX_HIGH_RATIO * len(data) and not _HIGH_RUN.search(data):
        try:
            return _normalise_newlines(data.decode("cp1252")), "cp1252", ()
        except UnicodeDecodeError:
            pass
    if nearly_utf8:
        return _normalise_newlines(text), "utf-8", (note,)
    raise IngestError(path, f"not UTF-8 text ({utf8_error}) and not plausible Windows-1252; re-save it as UTF-8")


def _check_control(data: bytes, path: str) -> None:
    n_control = len(data) - len(data.translate(None, _CONTROL_BYTES))
    if n_control > _MAX_CONTROL_RATIO * len(data):
        raise IngestError(path, f"binary data, not text ({n_control} control bytes in {len(data)})")


def _normalise_newlines(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def require_text(text: str, path: str, what: str = "no text (only whitespace)") -> None:
    """Raise IngestError(path, what) unless `text` has a non-whitespace character."""
    if _NON_SPACE.search(text) is None:
        raise IngestError(path, what)


# ============================================================================================
# Readers: each takes (bytes, path label) and returns (title or None, text or pages, encoding)
# ============================================================================================


def _read_text(data: bytes, path: str, markdown: bool) -> tuple[str | None, str, str, tuple[str, ...]]:
    text, encoding, notes = _decode_text(data, path)
    require_text(text, path)
    title = None
    if markdown:
        # A Markdown file that opens with a level-1 heading names itself.
        m = re.match(r"\s*# +(.+?)[ \t#]*(?:\n|$)", text)
        if m:
            title = m.group(1).strip() or None
    return title, text, encoding, notes


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


def _read_html(data: bytes, path: str) -> tuple[str | None, str, str, tuple[str, ...]]:
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
    source, encoding, notes = _decode_text(data, path, declared)
    parser = _HTMLText()
    try:
        parser.feed(source)
        if parser.rawdata.startswith("<!--"):
            # An unterminated comment: html.parser would emit it and the rest of the page as
            # text; browsers (HTML standard) treat it as a comment to the end of the input.
            notes += (
                f"unterminated <!-- comment: its {len(parser.rawdata)} characters to the end "
                "of the page were dropped, as browsers do",
            )
            parser.rawdata = ""
        parser.close()
    except Exception as e:  # html.parser is lenient; anything it raises means unusable markup
        raise IngestError(path, f"malformed HTML ({type(e).__name__}: {e})") from None
    text = parser.text()
    require_text(text, path, "no visible text in HTML")
    title = _WS_RUN.sub(" ", "".join(parser.title_parts)).strip() or None
    return title, text, encoding, notes


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
        return _extract_within_budget(reader.pages, path)
    except IngestError:
        raise
    except FileNotDecryptedError:
        raise IngestError(path, "encrypted PDF (a password is required)") from None
    except Exception as e:
        # pypdf reports damaged files with its own errors, but also with KeyError, ValueError,
        # AttributeError, ... from deep inside the parser: all mean the file is unusable.
        raise IngestError(path, f"corrupt PDF ({type(e).__name__}: {e})") from None


def _extract_within_budget(pages, path: str) -> list[str]:
    """Each page's text, refused (``IngestError``) as soon as a page, the whole text or the time
    taken passes its budget (``PDF_PAGE_CHARS``, ``PDF_TEXT_CHARS``, ``PDF_SECONDS``)."""
    start, total, out = time.perf_counter(), 0, []
    for i, page in enumerate(pages, 1):
        text = page.extract_text() or ""
        total += len(text)
        where = f"page {i} of {len(pages)}"
        if len(text) > PDF_PAGE_CHARS:
            raise IngestError(path, f"{where} holds {len(text):,} characters of text, over the {PDF_PAGE_CHARS:,} "
                              "a page may (a hostile or broken PDF)")  # fmt: skip
        if total > PDF_TEXT_CHARS:
            raise IngestError(path, f"text past {PDF_TEXT_CHARS:,} characters at {where} (too large to ingest)")
        if time.perf_counter() - start > PDF_SECONDS:
            raise IngestError(
                path, f"text extraction took over {PDF_SECONDS:g} s, at {where} (a hostile or broken PDF)"
            )
        out.append(text)
    return out


# ============================================================================================
# One file: format by extension, then its reader
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


def read_file(path: Path, label: str, max_bytes: int | None = None) -> Document:
    """The file `path` -> Document (id -1: set by ingest); `label` names it in errors and
    becomes its source. A file over `max_bytes` bytes is refused from its size (`stat`) before
    any byte is read; at most max_bytes + 1 bytes are ever read (a file growing meanwhile).
    Raises IngestError, for every file system error too (its strerror: "File name too long", ...)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IngestError(label, "no such file or folder") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise IngestError(label, f"cannot access ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise IngestError(label, "not a regular file")
    fmt = _format_of(path)
    if fmt is None:
        ext = path.suffix or "(none)"
        raise IngestError(label, f"unsupported extension {ext} (supported: {' '.join(SUPPORTED_EXTENSIONS)})")
    if max_bytes is not None and st.st_size > max_bytes:
        raise IngestError(label, f"too large: {st.st_size} bytes, over max_bytes={max_bytes}")
    try:
        with open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise IngestError(label, f"cannot read ({e.strerror or e})") from None
    except MemoryError:
        raise IngestError(label, f"too large to read into memory ({st.st_size} bytes); set max_bytes") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise IngestError(label, f"too large: grew past max_bytes={max_bytes} while being read")
    if fmt == "pdf":
        title, pages, notes = _read_pdf(data, label)
        encoding = None
    elif fmt == "html":
        title, pages, encoding, notes = _read_html(data, label)
    else:
        title, pages, encoding, notes = _read_text(data, label, markdown=fmt == "markdown")
    for note in notes if fmt != "pdf" else ():  # pypdf's notes are logged by _read_pdf
        _log.warning("%s: %s", label, note)
    source = Path(label).as_posix()
    # Plain UTF-8 files already hold the text's UTF-8 bytes: hash them, skip re-encoding.
    same_bytes = (
        fmt in ("text", "markdown")
        and encoding == "utf-8"
        and not notes
        and not data.startswith(codecs.BOM_UTF8)
        and b"\r" not in data
    )
    doc = make_document(title or path.stem, source, pages, len(data), fmt, encoding, utf8=data if same_bytes else None)
    return dataclasses.replace(doc, warnings=notes) if notes else doc
