"""QA sessions: ask equals a fresh full prefill, citations, save/load."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import text_model
from longctx.cache import CacheError, OffloadPolicy
from longctx.generate import generate
from longctx.tasks.qa import QAError, Session
from longctx.text.ingest import ingest
from longctx.text.prompt import context_prefix, question_suffix

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return ingest(
        [
            ("Rivers", "The river runs to the sea. " * 20),
            ("Peaks", "Mountains rise above the clouds. " * 25),
            ("Paged", ["First page about deserts. " * 10, "Second page about oceans. " * 10]),
        ]
    )


def test_ask_equals_fresh_full_prefill_and_questions_are_isolated(model, corpus, tok):
    s = Session(model, corpus, chunk_size=64)
    length = s.cache.length
    questions = ["Which document is about rivers?", "What rises above the clouds?"]
    answers = [s.ask(q, max_new_tokens=6) for q in questions]
    assert s.cache.length == length  # the corpus cache never grows
    for q, a in zip(questions, answers):
        head = context_prefix(tok, corpus.pack(tok).ids)
        prompt = head + question_suffix(tok, q, at=len(head), chunk=model.config.local_chunk)
        fresh = generate(model, torch.tensor([prompt]), max_new_tokens=6, stop_ids=[tok.eot_id, tok.eom_id])
        assert a.text == tok.decode(fresh.tokens[0]).strip()
        assert a.answer_tokens == len(fresh.tokens[0]) and a.stopped == fresh.stopped[0]
    assert s.ask(questions[0], max_new_tokens=6).text == answers[0].text  # not affected by question 2


def test_a_model_trained_with_chunk_markers_gets_a_marked_corpus(tok, corpus):
    """config.chunk_markers: the session packs the corpus with a marker at each attention-chunk
    start of the prompt (the layout the model was trained on), and answers as a fresh forward
    over that prompt."""
    marked = text_model(tok)
    marked.config.chunk_markers = True
    s = Session(marked, corpus, chunk_size=64)
    chunk = marked.config.attention_chunk_size
    ids = corpus.pack(tok, chunk=chunk, offset=len(context_prefix(tok, []))).ids
    assert s.prefix.tolist() == context_prefix(tok, ids) and len(ids) > len(corpus.pack(tok).ids)
    q = "What rises above the clouds?"
    prompt = context_prefix(tok, ids) + question_suffix(tok, q, at=len(s.prefix), chunk=chunk)
    fresh = generate(marked, torch.tensor([prompt]), max_new_tokens=6, stop_ids=[tok.eot_id, tok.eom_id])
    assert s.ask(q, max_new_tokens=6).text == tok.decode(fresh.tokens[0]).strip()


def test_a_question_that_would_cross_a_chunk_start_starts_one(tok):
    """question_suffix(at=, chunk=): newlines in front move a question that would straddle two
    local-attention chunks to the next chunk start, and only such a question."""
    q = "Which document mentions the special magic number for gentle-harbor?"
    plain = question_suffix(tok, q)
    n, chunk, moved = len(plain), 32, 0
    for at in range(3 * chunk):
        ids = question_suffix(tok, q, at=at, chunk=chunk)
        pad = len(ids) - n
        assert ids[pad:] == plain and tok.decode(ids[:pad]) == "\n" * pad
        if at % chunk + n <= chunk:
            assert pad == 0
        else:
            assert (at + pad) % chunk == 0 and 0 < pad < n
            moved += 1
    assert moved == 3 * (n - 1)
    assert question_suffix(tok, q, at=5, chunk=n - 1) == plain  # longer than a chunk: nothing to gain


def test_a_session_moves_a_straddling_question_to_a_chunk_start(model, corpus, tok):
    s = Session(model, corpus, chunk_size=64)
    chunk = model.config.local_chunk
    q = "Where"
    assert s.n_tokens % chunk  # else only a question longer than a chunk could straddle
    while s.n_tokens % chunk + len(question_suffix(tok, q)) <= chunk:  # grow it until it would straddle
        q += " now"
    prompt = s.prefix.tolist() + question_suffix(tok, q, at=s.n_tokens, chunk=chunk)
    assert (len(prompt) - len(question_suffix(tok, q))) % chunk == 0
    fresh = generate(model, torch.tensor([prompt]), max_new_tokens=6, stop_ids=[tok.eot_id, tok.eom_id])
    a = s.ask(q, max_new_tokens=6)
    assert a.text == tok.decode(fresh.tokens[0]).strip() and a.question_tokens == len(prompt) - s.n_tokens


def test_ask_over_disk_tier_segments_equals_resident(model, corpus, tmp_path):
    """Forks share sealed segments wherever they live: a session whose corpus KV sits in
    memory-mapped files answers and cites exactly as a resident one."""
    q = "Where are the deserts?"
    resident = Session(model, corpus, chunk_size=64).ask(q, max_new_tokens=5)
    policy = OffloadPolicy(device_bytes=0, cpu_bytes=0, disk_dir=tmp_path, segment_tokens=128)
    s = Session(model, corpus, chunk_size=64, offload=policy)
    assert s.cache.tier_bytes()["disk"] > 0
    on_disk = s.ask(q, max_new_tokens=5)
    assert on_disk.text == resident.text
    assert [(c.title, c.page) for c in on_disk.citations] == [(c.title, c.page) for c in resident.citations]
    assert [c.share for c in on_disk.citations] == pytest.approx([c.share for c in resident.citations], abs=1e-6)


def test_citation_shares_sum_to_one_and_name_pages(model, corpus):
    s = Session(model, corpus)
    a = s.ask("Where are the deserts?", max_new_tokens=4)
    total = sum(c.share for c in a.citations) + a.other_share
    assert abs(total - 1.0) < 1e-6
    assert [c.share for c in a.citations] == sorted((c.share for c in a.citations), reverse=True)
    assert {c.title for c in a.citations} == {"Rivers", "Peaks", "Paged"}
    assert next(c for c in a.citations if c.title == "Paged").page in (1, 2)
    assert all(c.share > 0 for c in a.citations) and a.other_share > 0


def test_question_too_long_is_a_clear_error(model, corpus):
    s = Session(model, corpus)
    with pytest.raises(QAError, match="does not fit"):
        s.ask("A question?", max_new_tokens=8, max_context=s.n_tokens + 5)


def test_citations_map_span_offsets_to_documents_and_pages(model, corpus, tok):
    """Mass put only on page 2 of the third document ranks it first with share 1 on page 2."""
    s = Session(model, corpus)
    packed = corpus.pack(tok)
    page2 = next(sp for sp in packed.spans if sp.doc_id == 2 and sp.page == 2)
    header = len(s.prefix) - len(packed.ids)
    mass = torch.zeros(len(s.prefix) + 10)
    mass[header + page2.start : header + page2.end] = 1.0
    cites, other = s._cite(mass)
    assert (cites[0].title, cites[0].page) == ("Paged", 2)
    assert (cites[0].share, other) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-12))
    mass[-10:] = mass.sum() / 10  # as much again on non-document tokens (question, answer)
    cites, other = s._cite(mass)
    assert (cites[0].share, other) == (pytest.approx(0.5), pytest.approx(0.5)) and cites[1].share == 0.0


def test_corpus_longer_than_the_context_is_refused_before_prefill(model, corpus):
    with pytest.raises(QAError, match="does not fit the context of 100 tokens"):
        Session(model, corpus, max_context=100)


def test_session_save_load_round_trip_and_refusals(model, corpus, tok, tmp_path):
    s = Session(model, corpus)
    want = s.ask("Which document is about rivers?", max_new_tokens=5)
    s.save(tmp_path / "s")
    s.save(tmp_path / "s")  # overwriting is atomic too
    loaded = Session.load(model, tmp_path / "s", corpus)
    got = loaded.ask("Which document is about rivers?", max_new_tokens=5)
    assert got.text == want.text
    assert [(c.title, round(c.share, 6)) for c in got.citations] == [
        (c.title, round(c.share, 6)) for c in want.citations
    ]
    with pytest.raises(Exception, match="another model"):
        Session.load(text_model(tok, seed=1), tmp_path / "s")
    other = ingest([("Rivers", "A different text. " * 20)])
    with pytest.raises(QAError, match="other documents"):
        Session.load(model, tmp_path / "s", other)
    with pytest.raises(QAError, match="not a saved session"):
        Session.load(model, tmp_path / "nothing-here")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folders left


@pytest.fixture(scope="module")
def saved_session(model, corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("session") / "s"
    Session(model, corpus).save(folder)
    return folder


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(0, 10**6), offset=st.integers(0, 10**9), bit=st.integers(0, 7))
def test_a_bit_flip_in_any_session_file_is_a_typed_error_naming_it(model, corpus, saved_session, pick, offset, bit):
    """Every file of a saved session (session.json, prefix.npy, the manifest, the cache's files)
    is checked before it is read: a flipped bit never changes an answer or a citation."""
    files = sorted(p.relative_to(saved_session) for p in saved_session.rglob("*") if p.is_file())
    rel = files[pick % len(files)]
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "s"
        shutil.copytree(saved_session, copy)
        data = bytearray((copy / rel).read_bytes())
        data[offset % len(data)] ^= 1 << bit
        (copy / rel).write_bytes(bytes(data))
        with pytest.raises((QAError, CacheError), match=re.escape(rel.name)):
            Session.load(model, copy, corpus)


def test_an_undamaged_session_still_loads(model, corpus, saved_session):
    assert Session.load(model, saved_session, corpus).ask("Which document is about rivers?", max_new_tokens=3).text
