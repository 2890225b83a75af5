"""QA sessions: ask equals a fresh full prefill, citations, save/load, crash-safe batch, torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from longctx.cache import OffloadPolicy
from longctx.checkpoint import save_model
from longctx.text.ingest import ingest
from longctx.generate import generate
from longctx.text.prompt import context_prefix, question_suffix
from longctx.tasks.qa import QAError, Session, _read_records, run_batch
from longctx.text.tokenizer import Tokenizer

from conftest import text_model

ROOT = Path(__file__).parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def model(tok):
    return text_model(tok)


@pytest.fixture(scope="module")
def corpus():
    return ingest([("Rivers", "The river runs to the sea. " * 20),
                   ("Peaks", "Mountains rise above the clouds. " * 25),
                   ("Paged", ["First page about deserts. " * 10, "Second page about oceans. " * 10])])


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
    assert [(c.title, round(c.share, 6)) for c in got.citations] == [(c.title, round(c.share, 6)) for c in want.citations]
    with pytest.raises(Exception, match="another model"):
        Session.load(text_model(tok, seed=1), tmp_path / "s")
    other = ingest([("Rivers", "A different text. " * 20)])
    with pytest.raises(QAError, match="other documents"):
        Session.load(model, tmp_path / "s", other)
    with pytest.raises(QAError, match="not a saved session"):
        Session.load(model, tmp_path / "nothing-here")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folders left


def write_corpus(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(f"Document {i} says the code word is item{i}. " * 10)
    return folder


def jobs_file(tmp_path: Path) -> Path:
    """Five jobs: a good one, a missing corpus, a malformed line, one with a too-long
    question (files given as a list), and one on a relative folder path with plain-string
    questions; 10 output lines in all."""
    a = write_corpus(tmp_path / "a", 2)
    b = write_corpus(tmp_path / "b", 3)
    jobs = [
        {"id": "j1", "corpus": str(a), "questions": [{"id": f"q{i}", "question": f"What is code word {i}?"} for i in range(4)]},
        {"id": "j2", "corpus": str(tmp_path / "missing"), "questions": [{"id": "q0", "question": "Anything?"}]},
        "this line is not JSON",
        {"id": "j3", "corpus": [str(b / "doc0.txt"), str(b / "doc2.txt")],
         "questions": [{"id": "q0", "question": "Which word?"}, {"id": "long", "question": "word " * 3000}]},
        {"id": "j4", "corpus": "b", "questions": ["What does document 1 say?", "And document 2?"]},
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(j if isinstance(j, str) else json.dumps(j) for j in jobs) + "\n")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def assert_same_answers(a: Path, b: Path) -> None:
    """Two answer files hold the same lines in the same order. Shares may differ in their
    last rounded digit: BLAS results can depend on memory alignment, so two processes agree
    to ~1e-7, not bit for bit (answers, citation order and everything else must be equal)."""
    ra, rb = read(a), read(b)
    assert [{**r, "citations": [{**c, "share": None} for c in r.get("citations") or []]} for r in ra] == \
           [{**r, "citations": [{**c, "share": None} for c in r.get("citations") or []]} for r in rb]
    shares = lambda recs: [c["share"] for r in recs for c in r.get("citations") or []]  # noqa: E731
    assert shares(ra) == pytest.approx(shares(rb), abs=2e-6)


def test_batch_answers_each_question_once_with_per_job_errors(model, tmp_path):
    jobs = jobs_file(tmp_path)
    out = tmp_path / "answers.jsonl"
    run_batch(model, jobs, out, max_new_tokens=4, max_context=3000, progress=False)
    recs = read(out)
    ids = [(r["job"], r["id"]) for r in recs]
    assert len(ids) == len(set(ids)) == 4 + 1 + 1 + 2 + 2
    by = {(r["job"], r["id"]): r for r in recs}
    assert "missing" in by[("j2", "q0")]["error"]
    assert "malformed" in by[("line3", "-")]["error"] and "jobs.jsonl:3" in by[("line3", "-")]["error"]
    assert "does not fit" in by[("j3", "long")]["error"]
    assert by[("j3", "q0")]["error"] is None and by[("j3", "q0")]["citations"]
    assert by[("j4", "0")]["error"] is None  # "b" is relative to the jobs file's folder
    assert {c["title"] for c in by[("j4", "0")]["citations"]} == {"doc0", "doc1", "doc2"}
    assert 0 < sum(c["share"] for c in by[("j4", "0")]["citations"]) <= 1
    before = out.read_text()
    run_batch(model, jobs, out, max_new_tokens=4, max_context=3000, progress=False)  # nothing left to do
    assert out.read_text() == before


def test_batch_validates_jobs_and_shares_one_prefill_per_corpus(model, tmp_path, monkeypatch):
    a = write_corpus(tmp_path / "a", 2)
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"id": "x", "corpus": str(a), "questions": ["First?"]},
             {"id": "y", "corpus": str(a), "questions": ["Second?", "Third?"]},  # same corpus: no new prefill
             {"id": "x", "corpus": str(a), "questions": ["Duplicate job id?"]},
             {"id": "z", "corpus": str(a), "questions": [{"id": "1", "question": "A?"}, {"id": "1", "question": "B?"}]},
             {"id": "w", "corpus": str(a), "questions": [42]},
             {"id": "v", "corpus": [], "questions": ["No corpus?"]},
             {"id": "u", "corpus": str(a), "questions": ["word " * 400]}]  # fits nothing after the corpus
    jobs.write_text("".join(json.dumps(j) + "\n" for j in lines) + "\n")
    built = []
    real_init = Session.__init__
    monkeypatch.setattr(Session, "__init__", lambda self, *a, **k: (built.append(1), real_init(self, *a, **k))[1])
    out = tmp_path / "out.jsonl"
    run_batch(model, jobs, out, max_new_tokens=2, max_context=400, progress=False)
    by = {(r["job"], r["id"]): r for r in read(out)}
    assert len(built) == 1  # x, y and u share the corpus of one prefill
    assert by[("x", "0")]["error"] is None and by[("y", "1")]["error"] is None
    assert "already used on line 1" in by[("line3", "-")]["error"]
    assert "appears twice" in by[("line4", "-")]["error"]
    assert "non-empty string" in by[("line5", "-")]["error"]
    assert "list of paths" in by[("line6", "-")]["error"]
    assert "does not fit" in by[("u", "0")]["error"]
    assert len(by) == 8


def test_answers_file_repair_keeps_complete_lines(tmp_path):
    out = tmp_path / "a.jsonl"
    good = [json.dumps({"job": "j", "id": str(i), "answer": "x", "error": None}) for i in range(3)]
    out.write_text(good[0] + "\n" + "\x00\x00garbage\n" + good[1] + "\n" + good[2] + "\n" + '{"job": "j", "id": "3", "ans')
    with pytest.warns(UserWarning, match="a.jsonl:2: unreadable"):
        recs = _read_records(out, repair=True)
    assert [k for k, _ in recs] == [("j", "0"), ("j", "1"), ("j", "2")]
    assert out.read_text().endswith(good[2] + "\n")  # only the torn tail was cut


def test_single_process_folds_in_rank_files_of_an_interrupted_sharded_run(model, tmp_path):
    jobs = jobs_file(tmp_path)
    full = tmp_path / "full.jsonl"
    run_batch(model, jobs, full, max_new_tokens=3, max_context=3000, progress=False)
    lines = full.read_text().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.rank1").write_text("".join(lines[5:7]))  # what a killed rank 1 had written
    (tmp_path / "out.jsonl.rank0").write_text("".join(lines[:2]) + lines[2][:15])  # torn line
    run_batch(model, jobs, out, max_new_tokens=3, max_context=3000, progress=False)
    assert_same_answers(out, full)


RUNNER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from longctx.checkpoint import load_model
    from longctx.tasks import qa
    if {delay}:  # slow each answer down, so that a kill lands mid-way through the batch
        ask = qa.Session.ask
        qa.Session.ask = lambda *a, **k: (time.sleep({delay}), ask(*a, **k))[1]
    model = load_model({ckpt!r})
    qa.run_batch(model, {jobs!r}, {out!r}, max_new_tokens=4, max_context=3000, temperature={temperature},
                 progress=False)
""")


@pytest.fixture
def checkpoint(model, tmp_path):
    return save_model(model, tmp_path / "ckpt")


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_batch_survives_sigkill(checkpoint, tmp_path):
    jobs = jobs_file(tmp_path)
    out = tmp_path / "answers.jsonl"
    runner = dict(tests=str(ROOT / "tests"), ckpt=str(checkpoint), jobs=str(jobs), out=str(out), temperature=0.0)
    proc = subprocess.Popen([sys.executable, "-c", RUNNER.format(**runner, delay=0.5)], cwd=ROOT, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_text().splitlines()
    assert 2 <= len(partial) < 10  # killed mid-way
    with open(out, "a") as f:
        f.write('{"job": "j1", "id": "q')  # as if the kill had landed mid-write
    subprocess.run([sys.executable, "-c", RUNNER.format(**runner, delay=0)], cwd=ROOT, check=True, env=ENV)
    recs = read(out)  # every line parses: nothing corrupt
    ids = [(r["job"], r["id"]) for r in recs]
    assert len(ids) == len(set(ids)) == 10  # each question exactly once
    assert recs[: len(partial)] == [json.loads(l) for l in partial]  # earlier answers kept as written
    single = tmp_path / "single.jsonl"
    subprocess.run([sys.executable, "-c", RUNNER.format(**{**runner, "out": str(single)}, delay=0)], cwd=ROOT,
                   check=True, env=ENV)
    assert_same_answers(out, single)  # and the same as an uninterrupted run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_single_process(checkpoint, model, tmp_path):
    """`torchrun -m longctx.cli batch` on 2 gloo ranks writes the file one process writes;
    sampled answers too, since each question has its own seed whatever rank answers it."""
    jobs = jobs_file(tmp_path)
    single = tmp_path / "single.jsonl"
    run_batch(model, jobs, single, max_new_tokens=4, max_context=3000, temperature=0.8, progress=False)
    multi = tmp_path / "multi.jsonl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "longctx.cli", "batch",
                str(jobs), "--out", str(multi), "--model", str(checkpoint), "--max-new-tokens", "4",
                "--max-context", "3000", "--temperature", "0.8", "--no-progress"]
    subprocess.run(torchrun, cwd=ROOT, check=True, env=ENV, timeout=300)
    assert sorted(p.name for p in tmp_path.glob("multi.jsonl*")) == ["multi.jsonl", "multi.jsonl.rank0",
                                                                     "multi.jsonl.rank1"]
    assert_same_answers(multi, single)
    before = multi.read_text()
    subprocess.run(torchrun, cwd=ROOT, check=True, env=ENV, timeout=300)  # a rerun has nothing to do
    assert multi.read_text() == before
