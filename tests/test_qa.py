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

from longctx.checkpoint import save_model
from longctx.documents import ingest
from longctx.generate import generate
from longctx.prompt import context_prefix, question_suffix
from longctx.qa import QAError, Session, run_batch
from longctx.tokenizer import Tokenizer

from conftest import random_model, tiny_config

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def make_model(tok, seed=0):
    cfg = tiny_config(vocab_size=tok.vocab_size, attention_chunk_size=32, floor_scale=64,
                      bos_token_id=tok.bos_id, eos_token_id=[tok.eot_id], pad_token_id=tok.pad_id)
    m = random_model(cfg, seed=seed, std=0.1)
    m.tokenizer = tok
    return m


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


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
        prompt = context_prefix(tok, corpus.pack(tok).ids) + question_suffix(tok, q)
        fresh = generate(model, torch.tensor([prompt]), max_new_tokens=6, stop_ids=[tok.eot_id, tok.eom_id])
        assert a.text == tok.decode(fresh.tokens[0]).strip()
        assert a.answer_tokens == len(fresh.tokens[0])
    assert s.ask(questions[0], max_new_tokens=6).text == answers[0].text  # not affected by question 2


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


def test_session_save_load_round_trip_and_refusals(model, corpus, tok, tmp_path):
    s = Session(model, corpus)
    want = s.ask("Which document is about rivers?", max_new_tokens=5)
    s.save(tmp_path / "s")
    loaded = Session.load(model, tmp_path / "s", corpus)
    got = loaded.ask("Which document is about rivers?", max_new_tokens=5)
    assert got.text == want.text
    assert [(c.title, round(c.share, 6)) for c in got.citations] == [(c.title, round(c.share, 6)) for c in want.citations]
    with pytest.raises(Exception, match="another model"):
        Session.load(make_model(tok, seed=1), tmp_path / "s")
    other = ingest([("Rivers", "A different text. " * 20)])
    with pytest.raises(QAError, match="other documents"):
        Session.load(model, tmp_path / "s", other)


def write_corpus(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(f"Document {i} says the code word is item{i}. " * 10)
    return folder


def jobs_file(tmp_path: Path) -> Path:
    a = write_corpus(tmp_path / "a", 2)
    b = write_corpus(tmp_path / "b", 3)
    jobs = [
        {"id": "j1", "corpus": str(a), "questions": [{"id": f"q{i}", "question": f"What is code word {i}?"} for i in range(4)]},
        {"id": "j2", "corpus": str(tmp_path / "missing"), "questions": [{"id": "q0", "question": "Anything?"}]},
        "this line is not JSON",
        {"id": "j3", "corpus": [str(b / "doc0.txt"), str(b / "doc2.txt")],
         "questions": [{"id": "q0", "question": "Which word?"}, {"id": "long", "question": "word " * 3000}]},
        {"id": "j4", "corpus": str(b), "questions": ["What does document 1 say?", "And document 2?"]},
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(j if isinstance(j, str) else json.dumps(j) for j in jobs) + "\n")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_batch_answers_each_question_once_with_per_job_errors(model, tmp_path):
    jobs = jobs_file(tmp_path)
    out = tmp_path / "answers.jsonl"
    run_batch(model, jobs, out, max_new_tokens=4, max_context=3000, progress=False)
    recs = read(out)
    ids = [(r["job"], r["id"]) for r in recs]
    assert len(ids) == len(set(ids)) == 4 + 1 + 1 + 2 + 2
    by = {(r["job"], r["id"]): r for r in recs}
    assert "missing" in by[("j2", "q0")]["error"]
    assert "malformed" in by[("line3", "-")]["error"]
    assert "does not fit" in by[("j3", "long")]["error"]
    assert by[("j3", "q0")]["error"] is None and by[("j3", "q0")]["citations"]
    assert by[("j4", "0")]["error"] is None
    before = out.read_text()
    run_batch(model, jobs, out, max_new_tokens=4, max_context=3000, progress=False)  # nothing left to do
    assert out.read_text() == before


RUNNER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from longctx.checkpoint import load_model
    from longctx.qa import run_batch
    model = load_model({ckpt!r})
    run_batch(model, {jobs!r}, {out!r}, max_new_tokens=4, max_context=3000, progress=False)
""")


@pytest.fixture
def checkpoint(model, tmp_path):
    return save_model(model, tmp_path / "ckpt")


def test_batch_survives_sigkill(checkpoint, tmp_path):
    jobs = jobs_file(tmp_path)
    out = tmp_path / "answers.jsonl"
    script = RUNNER.format(tests=str(ROOT / "tests"), ckpt=str(checkpoint), jobs=str(jobs), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_text().splitlines()
    assert 2 <= len(partial) < 10  # killed mid-way
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)
    recs = read(out)  # every line parses: nothing corrupt
    ids = [(r["job"], r["id"]) for r in recs]
    assert len(ids) == len(set(ids)) == 10  # each question exactly once
    assert [json.loads(l) for l in partial if l.endswith("}")] == recs[: len([l for l in partial if l.endswith("}")])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_single_process(checkpoint, model, tmp_path):
    jobs = jobs_file(tmp_path)
    single = tmp_path / "single.jsonl"
    run_batch(model, jobs, single, max_new_tokens=4, max_context=3000, progress=False)
    multi = tmp_path / "multi.jsonl"
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(tests=str(ROOT / "tests"), ckpt=str(checkpoint), jobs=str(jobs), out=str(multi)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(torchrun, cwd=ROOT, check=True, env=env, timeout=300)
    assert multi.read_text() == single.read_text()
