"""The Python API as users meet it: misuse refused at the door with typed errors naming the
argument, short reprs and HTML for notebooks, plain dicts, heatmaps, streamed answers."""

from __future__ import annotations

import json
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from longctx.generate import generate
from longctx.tasks import niah
from longctx.tasks.batch import run_batch
from longctx.tasks.qa import Answer, Citation, QAError, Session
from longctx.text.ingest import ingest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return ingest([("Rivers", "The river runs to the sea. " * 20), ("Peaks", "Mountains rise above the clouds. " * 20)])


@pytest.fixture(scope="module")
def session(model, corpus):
    return Session(model, corpus, chunk_size=64)


@pytest.fixture
def no_prefill(monkeypatch):
    """Any prefill fails the test: refusals must come before the expensive part."""

    def boom(*a, **k):
        raise AssertionError("prefill ran")

    monkeypatch.setattr("longctx.tasks.qa.prefill", boom)


# ---- misuse -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, error, names",
    [
        ("reports/", TypeError, "longctx.ingest"),
        (Path("reports"), TypeError, "longctx.ingest"),
        (["reports/"], TypeError, "corpus"),
    ],
)
def test_session_needs_a_corpus(model, no_prefill, bad, error, names):
    with pytest.raises(error, match=names):
        Session(model, bad)


def test_empty_corpus_and_bad_session_options_are_refused_before_prefill(model, corpus, no_prefill, tmp_path):
    with pytest.raises(QAError, match="corpus has no documents"):
        Session(model, ingest([]))
    with pytest.raises(QAError, match="corpus has no documents.*skipped"):
        Session(model, ingest([tmp_path / "absent.txt"], errors="skip"))
    for kw, error, name in [
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": "64"}, TypeError, "chunk_size"),
        ({"max_context": -1}, ValueError, "max_context"),
        ({"overflow": "cut"}, ValueError, "overflow"),
        ({"budget": 0}, ValueError, "budget"),
    ]:
        with pytest.raises(error, match=name):
            Session(model, corpus, **kw)


@pytest.mark.parametrize(
    "question, kw, error, name",
    [
        ("", {}, QAError, "question"),
        ("   ", {}, QAError, "question"),
        (None, {}, TypeError, "question"),
        ("Where?", {"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ("Where?", {"max_new_tokens": "5"}, TypeError, "max_new_tokens"),
        ("Where?", {"max_new_tokens": 2.0}, TypeError, "max_new_tokens"),
        ("Where?", {"temperature": -1.0}, ValueError, "temperature"),
        ("Where?", {"top_p": 0.0}, ValueError, "top_p"),
        ("Where?", {"max_context": 0}, ValueError, "max_context"),
    ],
)
def test_ask_refuses_bad_arguments_before_prefill(session, monkeypatch, question, kw, error, name):
    monkeypatch.setattr(Session, "_answer", lambda *a, **k: pytest.fail("ask went past its checks"))
    with pytest.raises(error, match=name):
        session.ask(question, **kw)


def test_generate_takes_a_plain_list_as_one_row_and_checks_its_arguments(model):
    a = generate(model, [5, 6, 7, 8], max_new_tokens=3, stop_ids=[])
    b = generate(model, torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, stop_ids=[])
    c = generate(model, torch.tensor([5, 6, 7, 8]), max_new_tokens=3, stop_ids=[])
    assert a.tokens == b.tokens == c.tokens and len(a.tokens) == 1
    for prompt, kw, error, name in [
        ("some text", {}, TypeError, "prompt"),
        ([], {}, ValueError, "prompt"),
        ([[1, 2], [3]], {}, ValueError, "prompt"),
        (torch.ones(1, 3), {}, TypeError, "prompt"),
        ([1, 2], {"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ([1, 2], {"max_new_tokens": "5"}, TypeError, "max_new_tokens"),
        ([1, 2], {"chunk_size": 0}, ValueError, "chunk_size"),
    ]:
        with pytest.raises(error, match=name):
            generate(model, prompt, **kw)


def test_generate_checks_the_models_position_limit(model):
    limit = model.config.max_position_embeddings
    model.config.max_position_embeddings = 10
    try:
        with pytest.raises(ValueError, match=r"prompt of 4 tokens \+ max_new_tokens 7 need 11 positions.*is 10"):
            generate(model, [1, 2, 3, 4], max_new_tokens=7)
        assert len(generate(model, [1, 2, 3, 4], max_new_tokens=6, stop_ids=[]).tokens[0]) == 6
    finally:
        model.config.max_position_embeddings = limit


@pytest.mark.parametrize(
    "kw, error, name",
    [
        ({"lengths": 1024}, TypeError, "lengths"),
        ({"lengths": "1k"}, TypeError, "lengths"),
        ({"lengths": ["1x"]}, ValueError, "lengths"),
        ({"lengths": [0]}, ValueError, "lengths"),
        ({"lengths": [1.5]}, TypeError, "lengths"),
        ({"depths": 0.5}, TypeError, "depths"),
        ({"depths": [50]}, ValueError, "depths"),
        ({"depths": ["0.5"]}, TypeError, "depths"),
        ({"samples": 0}, ValueError, "samples"),
        ({"max_new_tokens": "32"}, TypeError, "max_new_tokens"),
        ({"task": "singel"}, ValueError, "task"),
    ],
)
def test_niah_run_refuses_bad_grids_before_any_work(model, tmp_path, kw, error, name):
    with pytest.raises(error, match=name):
        niah.run(model, **kw, out=tmp_path / "r.jsonl", progress=False)
    assert not (tmp_path / "r.jsonl").exists()


def test_niah_lengths_take_the_command_lines_spelling():
    assert niah._grid_axes(["1k", 512, "1.5k"], (0, 1)) == ([1024, 512, 1536], [0.0, 1.0])
    assert niah.parse_length("1m") == 1 << 20 and niah.length_label(niah.parse_length("32k")) == "32k"


def test_pack_and_batch_refuse_bad_arguments(corpus, model, tmp_path):
    with pytest.raises(TypeError, match="tokenizer"):
        corpus.pack(None)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"corpus": "x", "questions": ["?"]}) + "\n")
    for kw, error, name in [
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ({"overflow": "cut"}, ValueError, "overflow"),
        ({"temperature": "hot"}, TypeError, "temperature"),
    ]:
        with pytest.raises(error, match=name):
            run_batch(model, jobs, tmp_path / "out.jsonl", progress=False, **kw)
    with pytest.raises(FileNotFoundError, match="jobs_jsonl"):
        run_batch(model, tmp_path / "absent.jsonl", tmp_path / "out.jsonl", progress=False)
    assert not (tmp_path / "out.jsonl").exists()


# ---- notebooks: reprs, html, dicts, heatmap -----------------------------------------------


class _StrictHTML(HTMLParser):
    """Collects tags; fails on a closing tag that does not close the innermost open one."""

    VOID = {"br", "hr", "img"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def check_notebook_face(obj, *, max_repr: int = 1000) -> str:
    """repr short, HTML well nested with a table, to_dict JSON-ready; returns the HTML."""
    assert len(repr(obj)) <= max_repr, repr(obj)[:200]
    page = obj._repr_html_()
    parser = _StrictHTML()
    parser.feed(page)
    parser.close()
    assert parser.stack == [] and "table" in parser.tags
    json.dumps(obj.to_dict())
    return page


def fake_records(n_lengths: int = 9, n_depths: int = 5) -> list[dict]:
    return [
        {
            "task": "single",
            "length": 1024 << j,
            "depth": i / (n_depths - 1),
            "sample": 0,
            "exact": (i + j) % 3 > 0,
            "substring": (i + j) % 3 > 0,
            "answer": "The special magic number is 1234567. " * 40,
            "needles": [{"text": "x" * 500}],
        }
        for i in range(n_depths)
        for j in range(n_lengths)
    ]


def test_results_repr_html_dict_and_pandas(monkeypatch):
    res = niah.Results(fake_records())
    assert len(res.records) == 45
    page = check_notebook_face(res)
    assert repr(res).startswith("Results(task single, 45 cells, lengths 1k-256k") and "256k" in page
    assert res.to_dict()["records"] == res.records and res.to_dict()["effective_length"]["threshold"] == 0.9
    check_notebook_face(niah.Results([]))
    fake = types.ModuleType("pandas")
    fake.DataFrame = lambda rows: ("frame", rows)
    monkeypatch.setitem(sys.modules, "pandas", fake)
    assert res.to_pandas() == ("frame", res.records)
    monkeypatch.setitem(sys.modules, "pandas", None)  # not installed
    with pytest.raises(ImportError, match="pip install pandas"):
        res.to_pandas()


def test_heatmap_returns_a_figure_and_leaves_the_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    had_pyplot = "matplotlib.pyplot" in sys.modules
    backend = (
        matplotlib.rcParams._get_backend_or_none()
        if hasattr(matplotlib.rcParams, "_get_backend_or_none")
        else dict.__getitem__(matplotlib.rcParams, "backend")
    )
    res = niah.Results(fake_records(3, 3))
    fig = res.heatmap()
    assert isinstance(fig, Figure) and fig.axes[0].get_xlabel() == "context length (tokens)"
    assert res.heatmap(tmp_path / "sub" / "h.png", title="t").axes[0].get_title() == "t"
    assert (tmp_path / "sub" / "h.png").read_bytes()[:4] == b"\x89PNG"
    after = (
        matplotlib.rcParams._get_backend_or_none()
        if hasattr(matplotlib.rcParams, "_get_backend_or_none")
        else dict.__getitem__(matplotlib.rcParams, "backend")
    )
    assert after == backend and ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_answer_corpus_session_packed_faces(model, tok, session):
    cites = [
        Citation(i, f"Document number {i} " * 5, f"/data/{'deep/' * 10}doc{i}.txt", None, 0.01) for i in range(100)
    ]
    big = Answer("word " * 2000, cites, 0.0, 12, 300, 0.1, 0.5, "length", "What? " * 300)
    check_notebook_face(big)
    assert big.to_dict()["citations"][3]["doc_id"] == 3 and big.to_dict()["question"].startswith("What?")
    many = ingest([(f"Title {i} " * 10, f"Text of document {i}. " * 5) for i in range(100)])
    assert "100 documents" in check_notebook_face(many)
    assert many.to_dict()["documents"][99]["title"].startswith("Title 99")
    packed = many.pack(tok)
    check_notebook_face(packed)
    assert packed.to_dict()["n_tokens"] == len(packed) and len(packed.to_dict()["spans"]) == len(packed.spans)
    check_notebook_face(Session(model, many, chunk_size=512))
    check_notebook_face(session)
    assert session.to_dict()["n_tokens"] == session.n_tokens
    a = session.ask("Where does the river run?", max_new_tokens=4)
    assert check_notebook_face(a) and a.question == "Where does the river run?"


# ---- streaming ----------------------------------------------------------------------------


def test_streamed_answer_equals_the_answer(session, model, tok):
    q = "Where does the river run?"
    plain = session.ask(q, max_new_tokens=24)
    stream = session.ask(q, max_new_tokens=24, stream=True)
    assert stream.answer is None
    pieces = list(stream)
    assert "".join(pieces) == plain.text and stream.answer.text == plain.text
    assert stream.answer.citations == plain.citations
    seen = []
    again = session.ask(q, max_new_tokens=24, on_text=seen.append)
    assert "".join(seen) == plain.text == again.text and all(seen)
    gen = torch.Generator().manual_seed(3)
    sampled = "".join(session.ask(q, max_new_tokens=24, temperature=1.0, generator=gen, stream=True))
    gen = torch.Generator().manual_seed(3)
    assert sampled == session.ask(q, max_new_tokens=24, temperature=1.0, generator=gen).text
