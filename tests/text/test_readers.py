"""Tests for longctx.text.readers (through `ingest`): text encodings, Markdown titles, HTML, PDF."""

from __future__ import annotations

import pytest

from longctx.text.document import PAGE_SEPARATOR, IngestError
from longctx.text.ingest import ingest
from text_samples import PDF_PAGES, TEXT, encrypt_pdf, make_pdf

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
    f.write_bytes(
        '<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1"><p>Caf\xe9 – ok</p>'.encode("cp1252")
    )
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


# --------------------------------------------------------------------------------------------
# Hostile inputs: damaged UTF-8, unterminated comments, huge files, over-long names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, text, bad",
    [
        ("café au lait\n".encode() * 20 + b"\x80", "café au lait\n" * 20 + "\ufffd", 1),  # one stray byte
        (b"plain ascii " * 30 + b"\x81 end", "plain ascii " * 30 + "\ufffd end", 1),  # cp1252 can't read 0x81
        ("naïve\n".encode() * 100 + b"\xc3(" + b"\xff", "naïve\n" * 100 + "\ufffd(\ufffd", 2),
    ],
)
def test_utf8_with_a_few_bad_bytes_decodes_with_replacements_and_a_warning(tmp_path, caplog, raw, text, bad):
    f = tmp_path / "damaged.txt"
    f.write_bytes(raw)
    (doc,) = ingest(f)
    assert doc.text == text and doc.encoding == "utf-8"
    assert len(doc.warnings) == 1 and f"not valid UTF-8 in {bad} place(s)" in doc.warnings[0]
    assert f"{f}: not valid UTF-8" in caplog.text


def test_cp1252_is_kept_for_text_that_is_not_utf8_nearly_everywhere(tmp_path):
    f = tmp_path / "w.txt"
    line = "The café served crème brûlée for 10 € each.\n"
    f.write_bytes(line.encode("cp1252") * 5)
    (doc,) = ingest(f)
    assert doc.encoding == "cp1252" and doc.text == line * 5 and doc.warnings == ()
    f.write_bytes("naïve ".encode() * 10 + b"\x81" * 5)  # 5 bad bytes in 75: over 1 %, and not cp1252
    with pytest.raises(IngestError, match="not UTF-8 text"):
        ingest(f)


def test_unterminated_html_comment_drops_the_rest_with_a_warning(tmp_path):
    f = tmp_path / "page.html"
    f.write_text("<p>Visible text.</p><!-- a comment never closed <p>Hidden</p> and more")
    (doc,) = ingest(f)
    assert doc.text == "Visible text."
    assert len(doc.warnings) == 1 and "unterminated <!-- comment" in doc.warnings[0]
    f.write_text("<p>Visible text.<!-- closed --></p>")
    (doc,) = ingest(f)
    assert doc.text == "Visible text." and doc.warnings == ()


def test_a_huge_sparse_file_over_max_bytes_is_refused_without_being_read(tmp_path, monkeypatch):
    import time

    from longctx.text import readers

    big = tmp_path / "docs" / "big.txt"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # 3 GB, sparse: takes no disk
    (tmp_path / "docs" / "small.txt").write_text("a small note")
    opened = []
    real_open = open
    monkeypatch.setattr(readers, "open", lambda p, *a: opened.append(p) or real_open(p, *a), raising=False)
    t0 = time.perf_counter()
    corpus = ingest(tmp_path / "docs", max_bytes=1 << 20, errors="skip")
    assert time.perf_counter() - t0 < 5
    assert [d.title for d in corpus] == ["small"] and opened == [tmp_path / "docs" / "small.txt"]
    assert corpus.skipped == [(f"{tmp_path}/docs/big.txt", f"too large: {3 << 30} bytes, over max_bytes={1 << 20}")]
    with pytest.raises(IngestError, match="too large"):
        ingest(big, max_bytes=1 << 20)
    with pytest.raises(ValueError, match="max_bytes"):
        ingest(big, max_bytes=-1)


def test_an_over_long_file_name_is_an_ingest_error(tmp_path):
    long = tmp_path / ("n" * 300 + ".txt")
    with pytest.raises(IngestError, match="File name too long") as e:
        ingest(long)
    assert e.value.path == str(long)
    corpus = ingest([long, ("ok", "kept")], errors="skip")
    assert [d.title for d in corpus] == ["ok"] and corpus.skipped[0].path == str(long)


@pytest.mark.parametrize(
    ("budget", "value", "reason"),
    [
        ("PDF_PAGE_CHARS", 10, r"page 1 of 3 holds \d+ characters of text, over the 10 a page may"),
        ("PDF_TEXT_CHARS", 10, r"text past 10 characters at page 1 of 3"),
        ("PDF_SECONDS", -1.0, r"text extraction took over -1 s, at page 1 of 3"),
    ],
)
def test_pdf_past_an_extraction_budget_is_refused_naming_the_page(tmp_path, monkeypatch, budget, value, reason):
    """A PDF whose text or extraction time passes a budget is refused as soon as a page passes
    it (or skipped, recorded, under errors="skip"); the budgets are module settings."""
    from longctx.text import readers

    f = tmp_path / "big.pdf"
    f.write_bytes(make_pdf(PDF_PAGES))
    monkeypatch.setattr(readers, budget, value)
    with pytest.raises(IngestError, match=reason) as e:
        ingest([f])
    assert e.value.path.endswith("big.pdf")
    corpus = ingest([f, ("Notes", "kept")], errors="skip")
    assert [d.title for d in corpus.documents] == ["Notes"] and corpus.skipped[0].path.endswith("big.pdf")
    monkeypatch.undo()
    assert len(ingest([f]).documents[0].pages) == len(PDF_PAGES)  # within the default budgets it reads
