"""Tests for longctx.text.readers (through `ingest`): text encodings, Markdown titles, HTML, PDF."""

from __future__ import annotations

import pytest
from text_samples import PDF_PAGES, TEXT, encrypt_pdf, make_pdf

from longctx.text.document import PAGE_SEPARATOR, IngestError
from longctx.text.ingest import ingest

# --------------------------------------------------------------------------------------------
# Text readers and encodings
# --------------------------------------------------------------------------------------------



@pytest.mark.parametrize(
    "raw, encoding",
    [
        (TEXT.encode("utf-8"), "utf-8"),
        (b"\xef\xbb\xbf" + TEXT.encode("utf-8"), "utf-8"),
        (TEXT.encode("utf-16"), "utf-16"),  # with BOM (native order)
        (b"\xfe\xff" + TEXT.encode("utf-16-be"), "utf-16"),
        (TEXT.encode("utf-32"), "utf-32"),
        (TEXT.encode("cp1252"), "cp1252"),  # fallback: decodes cleanly, looks like text
        (TEXT.replace("\n", "\r\n").encode("utf-8"), "utf-8"),  # CRLF normalised
    ],
)
def test_text_encodings(tmp_path, raw, encoding):
    f = tmp_path / "note.txt"
    f.write_bytes(raw)
    (doc,) = ingest(f)
    assert doc.text == TEXT
    assert doc.encoding == encoding
    assert doc.size == len(raw) and doc.format == "text" and doc.page_offsets is None
    assert doc.title == "note" and doc.source == f.as_posix()


@pytest.mark.parametrize(
    "raw",
    [
        "日本語のテキストです。これは長い文章です。".encode("shift_jis"),
        "Это русский текст, не в UTF-8.".encode("cp1251"),
        b"caf\xe9 \x81\x8d",  # bytes undefined in cp1252
    ],
)
def test_foreign_encodings_refused(tmp_path, raw):
    f = tmp_path / "x.txt"
    f.write_bytes(raw)
    with pytest.raises(IngestError, match="not UTF-8 text") as e:
        ingest(f)
    assert e.value.path == str(f) and "not UTF-8" in e.value.reason


def test_markdown_title(tmp_path):
    (tmp_path / "a.md").write_text("# Quarterly plan\n\nText.\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("No heading here.\n# Later heading\n", encoding="utf-8")
    (tmp_path / "c.md").write_text("# Only a heading ##", encoding="utf-8")
    a, b, c = ingest(tmp_path)
    assert (a.title, a.format, b.title, c.title) == ("Quarterly plan", "markdown", "b", "Only a heading")
    assert a.text == "# Quarterly plan\n\nText.\n"  # text kept as written


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Terms &amp; Conditions</title>
<style>body { color: red; } p::after { content: "STYLE"; }</style>
<script>var secret = "SCRIPT </p>";</script></head>
<body>
<h1>Terms   of
   use</h1>
<p>Prices &lt; 5&nbsp;&euro; &#8212; caf&eacute; &#x263A;.</p>
<div>line one<br>line two<br/>line three</div>
<ul><li>first</li><li>second</li></ul>
<script type="text/javascript">document.write("SCRIPT");</script>
<noscript>NOSCRIPT</noscript>
<table><tr><th>Year</th><th>Sales</th></tr><tr><td>2024</td><td>7</td></tr></table>
<pre>  keep   this
    spacing</pre>
<p>Last <b>bold</b> <i>words</i>.</p>
</body></html>
"""


def test_html(tmp_path):
    f = tmp_path / "terms.html"
    f.write_text(HTML, encoding="utf-8")
    (doc,) = ingest(f)
    assert doc.title == "Terms & Conditions" and doc.format == "html"
    assert doc.text == (
        "Terms of use\n\n"
        "Prices < 5\u00a0€ — café ☺.\n\n"
        "line one\nline two\nline three\n\n"
        "first\nsecond\n\n"
        "Year\tSales\n2024\t7\n\n"
        "  keep   this\n    spacing\n\n"
        "Last bold words."
    )  # &nbsp; stays a no-break space: HTML collapses only ASCII whitespace
    for hidden in ("STYLE", "SCRIPT", "secret", "color", "NOSCRIPT"):
        assert hidden not in doc.text


def test_html_declared_charset_and_empty(tmp_path):
    f = tmp_path / "old.htm"
    f.write_bytes('<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1"><p>Caf\xe9 – ok</p>'.encode("cp1252"))
    (doc,) = ingest(f)
    assert doc.text == "Café – ok" and doc.encoding == "cp1252" and doc.title == "old"
    g = tmp_path / "blank.html"
    g.write_text("<html><script>only()</script><p>  </p></html>", encoding="utf-8")
    with pytest.raises(IngestError, match="no visible text"):
        ingest(g)


# --------------------------------------------------------------------------------------------
# PDF
# --------------------------------------------------------------------------------------------


def test_pdf_pages(tmp_path):
    f = tmp_path / "report.pdf"
    f.write_bytes(make_pdf(PDF_PAGES))
    (doc,) = ingest(f)
    assert doc.format == "pdf" and doc.n_pages == 3
    # The blank middle page is kept as an empty page; page numbers stay those of the file.
    assert doc.pages == ["Annual report 2024\nRevenue grew (a lot).", "", "Outlook: steady."]
    assert doc.text == PAGE_SEPARATOR.join(doc.pages)
    assert doc.page_offsets == (0, len(doc.pages[0]) + 1, len(doc.pages[0]) + 2)
    ranges = doc.page_ranges()
    assert [r[0] for r in ranges] == [1, 2, 3] and ranges[0][1] == 0 and ranges[-1][2] == len(doc.text)
    assert all(ranges[k][2] == ranges[k + 1][1] for k in range(2))


def test_pdf_owner_password_only_opens(tmp_path):
    # An owner password alone (restricting printing) does not hide the text: the empty user
    # password opens it, as in any PDF viewer.
    f = tmp_path / "restricted.pdf"
    f.write_bytes(encrypt_pdf(make_pdf(PDF_PAGES), user="", owner="owner-secret"))
    (doc,) = ingest(f)
    assert doc.pages[2] == "Outlook: steady."


def test_pdf_repair_warnings_kept(tmp_path, caplog):
    # A PDF missing only the end of its "%%EOF" marker is repaired by pypdf: the text is all
    # there, and pypdf's warning is kept on the document and logged with the file name.
    f = tmp_path / "almost.pdf"
    f.write_bytes(make_pdf(PDF_PAGES)[:-3])
    with caplog.at_level("WARNING", logger="longctx.text.readers"):
        (doc,) = ingest(f)
    assert doc.pages[2] == "Outlook: steady." and doc.warnings
    assert any(str(f) in r.getMessage() and "pypdf" in r.getMessage() for r in caplog.records)


