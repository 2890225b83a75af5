"""Inputs shared by the text tests: PDFs written by hand (pypdf reads PDFs well but cannot author
text), encrypted PDFs (pypdf's RC4 writer), a Western text, and the tokenizers they pack with.
Not a test module: the test modules next to it import it (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import io

import pypdf
import pytest

from longctx.text.tokenizer import Tokenizer


def make_pdf(pages: list[list[str] | None], *, drawing: bool = False) -> bytes:
    """A minimal valid PDF: one page per entry, each line of text drawn in Helvetica.

    `None` or [] is a page with no text; `drawing=True` puts a filled rectangle on such pages
    (what a scan's page has instead of text: graphics, no text layer). Objects: 1 catalog,
    2 page tree, 3 font, then page k = object 4+2k with its content stream 5+2k.
    """
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (b" ".join(b"%d 0 R" % (4 + 2 * k) for k in range(len(pages))), len(pages)),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for k, lines in enumerate(pages):
        ops = []
        for j, line in enumerate(lines or []):
            esc = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(f"BT /F1 12 Tf 72 {720 - 14 * j} Td ({esc}) Tj ET")
        if not lines and drawing:
            ops.append("0.5 g 72 72 400 600 re f")
        stream = "\n".join(ops).encode("latin-1")
        objs.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (5 + 2 * k)
        )
        objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (n, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def encrypt_pdf(data: bytes, *, user: str, owner: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user, owner_password=owner, algorithm="RC4-128")  # RC4 needs no extra package
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


PDF_PAGES = [["Annual report 2024", "Revenue grew (a lot)."], None, ["Outlook: steady."]]

TEXT = "Café déjà vu — naïve façade.\nSecond line, 100 € please.\n"


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: one token per byte, so cuts can land inside a character."""
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, num_reserved_special_tokens=256)


def try_default() -> Tokenizer | None:
    """The embedded model's tokenizer, or None where its asset is not built."""
    try:
        return Tokenizer.default()
    except Exception:  # the asset is built by another part of the project
        return None


def default_tokenizer() -> Tokenizer:
    """The embedded model's tokenizer; skips the test where its asset is not built."""
    tok = try_default()
    if tok is None:
        pytest.skip("default tokenizer asset not available")
    return tok
