"""Batch QA jobs: per-job errors, bad jobs lines, one prefill per corpus, one writer per output
(lock), crash safety (SIGKILL), SIGTERM, torchrun ranks."""

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

from conftest import text_model
from longctx.checkpoint import save_model
from longctx.tasks import batch, jsonl
from longctx.tasks.batch import BatchLockedError, count_answers, run_batch
from longctx.tasks.qa import Session
from longctx.text.tokenizer import Tokenizer

ROOT = Path(__file__).parents[2]  # the repository: subprocesses run there, with tests/ on sys.path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return text_model(Tokenizer.default())


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
        {
            "id": "j1",
            "corpus": str(a),
            "questions": [{"id": f"q{i}", "question": f"What is code word {i}?"} for i in range(4)],
        },
        {"id": "j2", "corpus": str(tmp_path / "missing"), "questions": [{"id": "q0", "question": "Anything?"}]},
        "this line is not JSON",
        {
            "id": "j3",
            "corpus": [str(b / "doc0.txt"), str(b / "doc2.txt")],
            "questions": [{"id": "q0", "question": "Which word?"}, {"id": "long", "question": "word " * 3000}],
        },
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
    assert [{**r, "citations": [{**c, "share": None} for c in r.get("citations") or []]} for r in ra] == [
        {**r, "citations": [{**c, "share": None} for c in r.get("citations") or []]} for r in rb
    ]
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
    lines = [
        {"id": "x", "corpus": str(a), "questions": ["First?"]},
        {"id": "y", "corpus": str(a), "questions": ["Second?", "Third?"]},  # same corpus: no new prefill
        {"id": "x", "corpus": str(a), "questions": ["Duplicate job id?"]},
        {"id": "z", "corpus": str(a), "questions": [{"id": "1", "question": "A?"}, {"id": "1", "question": "B?"}]},
        {"id": "w", "corpus": str(a), "questions": [42]},
        {"id": "v", "corpus": [], "questions": ["No corpus?"]},
        {"id": "u", "corpus": str(a), "questions": ["word " * 400]},
    ]  # fits nothing after the corpus
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
    from longctx.tasks import batch, qa
    if {delay}:  # slow each answer down, so that a kill lands mid-way through the batch
        ask = qa.Session.ask
        qa.Session.ask = lambda *a, **k: (time.sleep({delay}), ask(*a, **k))[1]
    model = load_model({ckpt!r})
    batch.run_batch(model, {jobs!r}, {out!r}, max_new_tokens=4, max_context=3000, temperature={temperature},
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
    subprocess.run(
        [sys.executable, "-c", RUNNER.format(**{**runner, "out": str(single)}, delay=0)], cwd=ROOT, check=True, env=ENV
    )
    assert_same_answers(out, single)  # and the same as an uninterrupted run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_single_process(checkpoint, model, tmp_path):
    """`torchrun -m longctx.cli batch` on 2 gloo ranks writes the file one process writes;
    sampled answers too, since each question has its own seed whatever rank answers it. The
    jobs file has failing lines: exit status 1 and one summary line, from rank 0 only."""
    jobs = jobs_file(tmp_path)
    single = tmp_path / "single.jsonl"
    run_batch(model, jobs, single, max_new_tokens=4, max_context=3000, temperature=0.8, progress=False)
    multi = tmp_path / "multi.jsonl"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "longctx.cli",
        "batch",
        str(jobs),
        "--out",
        str(multi),
        "--model",
        str(checkpoint),
        "--max-new-tokens",
        "4",
        "--max-context",
        "3000",
        "--temperature",
        "0.8",
        "--no-progress",
    ]
    run = subprocess.run(torchrun, cwd=ROOT, env=ENV, timeout=300, capture_output=True, text=True)
    answered, failed = count_answers(single)
    assert failed > 0 and run.returncode == 1, run.stderr
    assert run.stderr.count(f"longctx batch: {answered} answered, {failed} failed (see {multi})") == 1
    assert sorted(p.name for p in tmp_path.glob("multi.jsonl*")) == [
        "multi.jsonl",
        "multi.jsonl.rank0",
        "multi.jsonl.rank0.lock",
        "multi.jsonl.rank1",
        "multi.jsonl.rank1.lock",
    ]
    assert_same_answers(multi, single)
    before = multi.read_text()
    assert subprocess.run(torchrun, cwd=ROOT, env=ENV, timeout=300).returncode == 1  # a rerun has nothing to do
    assert multi.read_text() == before


def test_run_batch_keeps_its_old_import_paths():
    """run_batch lives in longctx.tasks.batch; longctx and the deprecated longctx.qa still
    give the same function."""
    import importlib

    import longctx

    assert longctx.run_batch is run_batch
    with pytest.warns(DeprecationWarning, match="longctx.qa is deprecated"):
        shim = importlib.reload(importlib.import_module("longctx.qa"))
    assert shim.run_batch is run_batch and shim.Session is Session


def cli_batch(checkpoint: Path, jobs: Path, out: Path, delay: float = 0.0) -> list[str]:
    """argv of a subprocess running ``longctx batch`` (each answer slowed by ``delay`` s)."""
    code = textwrap.dedent(f"""
        import sys, time
        from longctx import cli
        from longctx.tasks import qa
        if {delay}:  # slow each answer down, so that a signal lands while one is in flight
            ask = qa.Session.ask
            qa.Session.ask = lambda *a, **k: (time.sleep({delay}), ask(*a, **k))[1]
        sys.exit(cli.main(["batch", {str(jobs)!r}, "--out", {str(out)!r}, "--model", {str(checkpoint)!r},
                           "--max-new-tokens", "3", "--max-context", "3000", "--no-progress"]))
    """)
    return [sys.executable, "-c", code]


def test_a_second_batch_on_one_output_is_refused_at_once(checkpoint, model, tmp_path):
    """While one process holds the answers file (here the test, through the same lock), a
    second ``longctx batch`` on it exits 2 at once with one line naming the file and the holder,
    and writes nothing; ``run_batch`` raises BatchLockedError. Once released, the batch runs."""
    jobs = jobs_file(tmp_path)
    out = tmp_path / "answers.jsonl"
    with jsonl.locked(out):
        with pytest.raises(BatchLockedError, match=f"answers.jsonl: another process \\(pid {os.getpid()}\\)"):
            run_batch(model, jobs, out, max_new_tokens=2, max_context=3000, progress=False)
        t0 = time.monotonic()
        run = subprocess.run(
            cli_batch(checkpoint, jobs, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
        )
        elapsed = time.monotonic() - t0
    assert run.returncode == 2 and not out.exists(), run.stderr
    assert run.stderr.strip().splitlines() == [
        f"longctx batch: {out}: another process (pid {os.getpid()}) is writing it (lock {out}.lock); wait for it to "
        "finish or write elsewhere"
    ]
    assert elapsed < 60  # start-up and model load only: no question was answered
    assert subprocess.run(cli_batch(checkpoint, jobs, out), cwd=ROOT, env=ENV, timeout=300).returncode == 1
    assert len(read(out)) == 10  # (the jobs file has failing jobs: exit 1)


def test_bad_jobs_lines_become_error_lines_and_the_other_jobs_run(model, tmp_path, monkeypatch):
    """A non-UTF-8 line, a line nested 100,000 deep, a line over MAX_JOB_LINE_BYTES and a line
    that is not an object: one error line each, naming the line and the reason; every other
    job is answered."""
    monkeypatch.setattr(batch, "MAX_JOB_LINE_BYTES", 150_000)
    a = write_corpus(tmp_path / "a", 2)
    good = lambda i: json.dumps({"id": f"good{i}", "corpus": str(a), "questions": ["First?", "Second?"]}).encode()  # noqa: E731
    big = json.dumps({"id": "big", "corpus": str(a), "questions": ["x" * 200_000]}).encode()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(
        b"\n".join(
            [good(1), b'{"id": "caf\xe9", "corpus": "a", "questions": ["?"]}', b"[" * 100_000, big, b"[1, 2]", good(2)]
        )
        + b"\n"
    )
    out = tmp_path / "out.jsonl"
    run_batch(model, jobs, out, max_new_tokens=2, max_context=400, progress=False)
    by = {(r["job"], r["id"]): r for r in read(out)}
    assert sorted(k for k, r in by.items() if r["error"] is None) == [
        ("good1", "0"),
        ("good1", "1"),
        ("good2", "0"),
        ("good2", "1"),
    ]
    errors = {k[0]: r["error"] for k, r in by.items() if r["error"]}
    assert list(errors) == ["line2", "line3", "line4", "line5"] and all(k[1] == "-" for k in by if k[0] in errors)
    assert "jobs.jsonl:2: malformed job (not UTF-8 (byte 11: b'\\xe9'))" in errors["line2"]
    assert "jobs.jsonl:3: malformed job (JSON nested too deeply)" in errors["line3"]
    assert "jobs.jsonl:4: malformed job (line longer than 150000 bytes)" in errors["line4"]
    assert "a JSON object, got list" in errors["line5"]


def test_sigterm_writes_the_answer_in_flight_and_a_rerun_resumes(checkpoint, tmp_path):
    """SIGTERM while an answer is being computed: that answer is still written, then the CLI
    exits 2 with one line saying so; the rerun answers only the rest, each question once."""
    a = write_corpus(tmp_path / "a", 2)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "j", "corpus": str(a), "questions": [f"Question {i}?" for i in range(6)]}) + "\n")
    out = tmp_path / "answers.jsonl"
    proc = subprocess.Popen(
        cli_batch(checkpoint, jobs, out, delay=1.0), cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.02)
    time.sleep(0.3)  # into the next answer's second of work
    before = out.read_text().splitlines()
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    after = out.read_text().splitlines()
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # 143: the shell's status for SIGTERM
    assert len(after) == len(before) + 1 < 6 and after[: len(before)] == before  # the answer in flight, written
    assert stderr.strip().splitlines()[-1] == (
        f"longctx batch: interrupted by SIGTERM after writing {len(after)} "
        f"answers to {out}; run the same command again to answer the rest"
    )
    assert subprocess.run(cli_batch(checkpoint, jobs, out), cwd=ROOT, env=ENV, timeout=300).returncode == 0
    recs = read(out)
    assert [r["id"] for r in recs] == [str(i) for i in range(6)] and all(r["error"] is None for r in recs)
    assert [json.loads(line) for line in after] == recs[: len(after)]
