"""Tests for longctx.text.ingest: bad inputs raised or skipped, folder walks, globs, duplicates,
in-memory texts; and the deprecated longctx.documents alias."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

import longctx.text.ingest
from longctx.text.document import IngestError
from longctx.text.ingest import ingest
from longctx.text.tokenizer import Tokenizer
from text_samples import PDF_PAGES, byte_tokenizer, encrypt_pdf, make_pdf


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return byte_tokenizer()


# --------------------------------------------------------------------------------------------
# Bad input: each raises a typed IngestError naming file and reason, or is skipped and listed
# --------------------------------------------------------------------------------------------


def _bad_inputs(tmp_path):
    """{name: (path, reason pattern)} for every kind of bad input."""
    good_pdf = make_pdf(PDF_PAGES)
    files = {
        "empty.txt": (b"", "empty file"),
        "binary.txt": (bytes(range(256)) * 8, "binary"),
        "blank.txt": (b"  \n\t\n", "no text"),
        "locked.pdf": (encrypt_pdf(good_pdf, user="user-secret", owner="owner-secret"), "encrypted PDF"),
        "truncated.pdf": (good_pdf[: len(good_pdf) // 2], "corrupt PDF"),
        "notapdf.pdf": (b"hello, I am not a PDF at all", "corrupt PDF"),
        "scan.pdf": (make_pdf([None, None], drawing=True), r"no text layer \(scanned PDF\?\)"),
        "slides.pptx": (b"PK\x03\x04 zip bytes", "unsupported extension .pptx"),
    }
    out = {}
    for name, (data, reason) in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = (tmp_path / name, reason)
    out["missing.txt"] = (tmp_path / "missing.txt", "no such file")
    return out


def test_each_bad_input_raises(tmp_path):
    for name, (path, reason) in _bad_inputs(tmp_path).items():
        with pytest.raises(IngestError, match=reason) as e:
            ingest([path])
        assert e.value.path == str(path), name
        assert name in str(e.value)  # the message names the file ...
        assert e.value.reason in str(e.value)  # ... and the reason


def test_bad_inputs_skipped_and_listed(tmp_path):
    bad = _bad_inputs(tmp_path)
    (tmp_path / "good.txt").write_text("good text", encoding="utf-8")
    (tmp_path / "good.pdf").write_bytes(make_pdf(PDF_PAGES))
    paths = [p for p, _ in bad.values()]
    # Folder walk and explicit paths both: the missing file can only come explicitly.
    corpus = ingest([tmp_path, bad["missing.txt"][0]], errors="skip")
    assert [d.title for d in corpus] == ["good", "good"]  # good.pdf, good.txt (sorted)
    assert [d.format for d in corpus] == ["pdf", "text"]
    skipped = {s.path: s.reason for s in corpus.skipped}
    assert sorted(skipped) == sorted(p.as_posix() for p in paths)
    for path, reason in bad.values():
        assert re.search(reason, skipped[path.as_posix()]), (path, skipped[path.as_posix()])


def test_errors_argument_checked():
    with pytest.raises(ValueError, match="errors must be"):
        ingest([("t", "x")], errors="ignore")
    with pytest.raises(TypeError):
        ingest([42])


# --------------------------------------------------------------------------------------------
# Folders, globs, duplicates, in-memory texts
# --------------------------------------------------------------------------------------------


def _tree(root):
    files = {
        "b.txt": "bee",
        "a.txt": "ay",
        "sub/z.md": "zed",
        "sub/deeper/c.txt": "see",
        "sub/deeper/c.html": "<p>html see</p>",
        "A_upper.txt": "upper first in code-point order",
        ".hidden/x.txt": "never read",
        ".DS_Store.txt": "never read",
        "docs/report.pdf": None,
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(make_pdf(PDF_PAGES) if text is None else text.encode("utf-8"))
    return files


def test_folder_tree_order_and_glob(tmp_path):
    _tree(tmp_path)
    corpus = ingest(tmp_path)
    rel = [d.source[len(tmp_path.as_posix()) + 1 :] for d in corpus]
    assert rel == [
        "A_upper.txt",
        "a.txt",
        "b.txt",
        "docs/report.pdf",
        "sub/deeper/c.html",
        "sub/deeper/c.txt",
        "sub/z.md",
    ]
    assert [d.id for d in corpus] == list(range(7))
    assert ingest(tmp_path).documents[3].sha256 == corpus[3].sha256  # stable
    assert [d.title for d in ingest(tmp_path, glob="*.txt")] == ["A_upper", "a", "b", "c"]
    assert [d.title for d in ingest(tmp_path, glob="sub/**/*.txt")] == ["c"]
    assert [d.title for d in ingest(tmp_path, glob="**/*.md")] == ["z"]
    with pytest.raises(IngestError, match="no files matching"):
        ingest(tmp_path, glob="*.docx")


def test_duplicates_reported_not_doubled(tmp_path):
    (tmp_path / "a.txt").write_text("same text\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"same text\r\n")  # same text after newline normalisation
    (tmp_path / "c.txt").write_text("other\n", encoding="utf-8")
    corpus = ingest([tmp_path, tmp_path / "c.txt", ("memo", "same text\n")])
    assert [d.title for d in corpus] == ["a", "c"]
    assert corpus.duplicates == [
        (0, (tmp_path / "b.txt").as_posix()),
        (1, (tmp_path / "c.txt").as_posix()),
        (0, "<text 0>"),
    ]


def test_in_memory_texts():
    corpus = ingest([("Memo", "hello"), (None, ["page one", "", "page three"])])
    memo, paged = corpus
    assert (memo.title, memo.source, memo.format, memo.size) == ("Memo", None, "memory", 5)
    assert paged.title == "text 1" and paged.pages == ["page one", "", "page three"]
    with pytest.raises(IngestError, match="empty text") as e:
        ingest([("a", "ok"), ("b", "   ")])
    assert e.value.path == "<text 1>"


def test_symlink_loop_and_progress(tmp_path, byte_tok):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    corpus = ingest(tmp_path, progress=True)
    assert [d.title for d in corpus] == ["a"]
    assert len(corpus.pack(byte_tok, progress=True).spans) == 1


def test_documents_alias_reexports_the_old_names():
    sys.modules.pop("longctx.documents", None)
    with pytest.warns(DeprecationWarning, match="longctx.documents is deprecated"):
        documents = importlib.import_module("longctx.documents")
    assert set(documents.__all__) == set(longctx.text.ingest.__all__)
    for name in documents.__all__:
        assert getattr(documents, name) is getattr(longctx.text.ingest, name), name
