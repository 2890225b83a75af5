"""Batch QA jobs: a JSONL file of jobs (a corpus + questions) into a JSONL file of answers.

``run_batch`` is crash-safe: the answers file is a journal (``longctx.tasks.jsonl``), each
answer appended, flushed and fsync'd; a restart skips answered ids and drops a torn last line.
One process writes an answers file at a time (``jsonl.locked``: a second is refused at once
with ``BatchLockedError``). The jobs file is read line by line in binary; a bad line (not
UTF-8, not JSON, nested too deeply, longer than ``MAX_JOB_LINE_BYTES``, not a job) becomes an
error line in the answers and the other jobs run. SIGTERM or Ctrl-C (SIGINT) lets the answer
in flight finish and be written, then raises ``BatchInterrupted``; a second signal stops at
once (Ctrl-C: KeyboardInterrupt; SIGTERM: the default action). A rerun resumes.
Under ``torchrun`` jobs are sharded over ranks (gloo on CPU, NCCL on GPUs); each rank writes its
own file and rank 0 merges them in job order.
"""

from __future__ import annotations

import datetime
import hashlib
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..cache import CacheError, OffloadPolicy
from ..distributed import join
from ..generate import check_int, check_sampling
from ..text.ingest import IngestError, ingest
from . import jsonl
from .qa import QAError, Session

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["MAX_JOB_LINE_BYTES", "BatchInterrupted", "BatchLockedError", "count_answers", "run_batch"]

# The longest jobs line read (bytes): a job is paths and questions, far below this; a longer
# line is an error line, skipped without being held in memory.
MAX_JOB_LINE_BYTES = 16 * 2**20


# Another process is writing the same answers file (an OSError: the CLI prints it as one line).
BatchLockedError = jsonl.LockedError


class BatchInterrupted(InterruptedError):
    """SIGTERM or SIGINT stopped the batch after the answer in flight was written; a rerun
    resumes. ``signum`` is the signal (the shell convention for the exit status is 128 + it:
    130 for Ctrl-C, 143 for SIGTERM), ``answered`` the answers this run wrote."""

    def __init__(self, message: str, signum: int, answered: int):
        super().__init__(message)
        self.signum, self.answered = signum, answered


# Output: one JSON object per line, {"job", "id", "question", "answer", "citations", "error"}.


def _key(rec: dict) -> tuple[str, str]:
    """An answer's identity in the journal: (job id, question id)."""
    return str(rec["job"]), str(rec["id"])


def _parse_jobs(jobs_jsonl: Path) -> list[dict]:
    """Jobs in file order; a malformed line or job becomes a job that carries its error (id
    ``line<N>``). Relative corpus paths are taken relative to the jobs file's folder."""
    jobs, seen = [], {}
    for n, line in jsonl.lines(jobs_jsonl, MAX_JOB_LINE_BYTES):
        if line is not None and not line.strip():
            continue
        try:
            if line is None:
                raise ValueError(f"line longer than {MAX_JOB_LINE_BYTES} bytes")
            job = jsonl.parse(line)
            if "corpus" not in job or not isinstance(job.get("questions"), list):
                raise ValueError('a job is an object with "corpus" and a "questions" list')
            corpus = job["corpus"]
            corpus = [corpus] if isinstance(corpus, str) else corpus
            if not isinstance(corpus, list) or not corpus or not all(isinstance(p, str) for p in corpus):
                raise ValueError('"corpus" must be a path or a non-empty list of paths')
            base = Path(jobs_jsonl).parent
            job["paths"] = [
                str(base / Path(p).expanduser())
                if not Path(p).expanduser().is_absolute()
                else str(Path(p).expanduser())
                for p in corpus
            ]
            job["id"] = str(job.get("id", f"line{n}"))
            if job["id"] in seen:
                raise ValueError(f"job id {job['id']!r} already used on line {seen[job['id']]}")
            qs, ids = [], set()
            for k, q in enumerate(job["questions"]):
                q = {"id": str(k), "question": q} if isinstance(q, str) else q
                if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip():
                    raise ValueError(f'question {k} must be a non-empty string or an object with a "question" string')
                q = {**q, "id": str(q.get("id", k))}
                if q["id"] in ids:
                    raise ValueError(f"question id {q['id']!r} appears twice")
                ids.add(q["id"])
                qs.append(q)
            job["questions"] = qs
            seen[job["id"]] = n
            jobs.append(job)
        except ValueError as e:  # every way jsonl.parse finds a line bad, too
            jobs.append(
                {
                    "id": f"line{n}",
                    "error": f"{jobs_jsonl}:{n}: malformed job ({e})",
                    "questions": [{"id": "-", "question": None}],
                }
            )
    return jobs


def _seed(seed: int, job: str, qid: str) -> int:
    """A per-question seed, so sampled answers do not depend on sharding or restarts."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{job}/{qid}".encode()).digest()[:8], "little") >> 1


class _Signals:
    """SIGTERM and SIGINT, while the batch runs, only ask it to stop (``check`` then raises
    ``BatchInterrupted``): the answer in flight is finished and written first. A second signal
    acts at once, as if no handler were there. The old handlers come back on exit. Outside the
    main thread (where Python allows no handlers) this does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second: stop now
            signal.signal(signum, self._old[signum])
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(
            f"longctx batch: {signal.Signals(signum).name}: finishing the answer in flight "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def check(self, out: Path, answered: int) -> None:
        """Raise ``BatchInterrupted`` if a signal came."""
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise BatchInterrupted(
                f"interrupted by {name} after writing {answered} answers to {out}; run the "
                "same command again to answer the rest",
                self.signum,
                answered,
            )


def _answer(
    model: Model,
    jobs: list[dict],
    out_jsonl: Path,
    mine: Path,
    world: int,
    rank: int,
    signals: _Signals,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    chunk_size: int,
    offload: OffloadPolicy | None,
    max_context: int | None,
    overflow: str,
    progress: bool,
) -> None:
    """Answer this rank's unanswered questions of ``jobs`` into ``mine`` (locked by the caller),
    checking ``signals`` after each written answer and before each job."""
    rank_files = jsonl.rank_files(out_jsonl)
    done = {e.key for e in jsonl.read(mine, _key, repair=True)}
    for path in {out_jsonl, *rank_files} - {mine}:  # answers of earlier runs, any layout
        done |= {e.key for e in jsonl.read(path, _key)}
    todo = [j for i, j in enumerate(jobs) if i % world == rank]
    bar = tqdm(
        total=sum(len(j["questions"]) for j in todo),
        desc=f"batch (rank {rank})" if world > 1 else "batch",
        unit="q",
        disable=not progress,
        position=rank,
    )
    last: tuple[tuple, Session] | None = None  # the latest corpus session, reused by the next job
    written = 0
    with bar, open(mine, "a", encoding="utf-8") as fh:
        for job in todo:
            qs = [q for q in job["questions"] if (job["id"], q["id"]) not in done]
            bar.update(len(job["questions"]) - len(qs))
            if not qs:
                continue
            signals.check(out_jsonl, written)  # stopped between answers: nothing in flight
            session, error = None, job.get("error")
            if error is None:
                key = (tuple(job["paths"]), chunk_size, max_context, overflow)
                if last is not None and last[0] == key:
                    session = last[1]
                else:
                    last = None  # free the previous corpus's cache before prefilling the next
                    try:
                        corpus = ingest(job["paths"], progress=False)
                        session = Session(
                            model,
                            corpus,
                            offload=offload,
                            chunk_size=chunk_size,
                            max_context=max_context,
                            overflow=overflow,
                            progress=False,
                        )
                        last = (key, session)
                    except (IngestError, ValueError, CacheError, OSError) as e:  # QAError, BudgetError too
                        error = f"corpus: {e}"
            for q in qs:
                rec = {"job": job["id"], "id": q["id"], "question": q["question"]}
                if error is None:
                    gen = None
                    if temperature > 0:
                        gen = torch.Generator(device=model.device).manual_seed(_seed(seed, job["id"], q["id"]))
                    try:
                        a = session.ask(
                            q["question"], max_new_tokens=max_new_tokens, temperature=temperature, generator=gen
                        )
                        rec.update(
                            answer=a.text,
                            stopped=a.stopped,
                            citations=[
                                {"title": c.title, "source": c.source, "page": c.page, "share": round(c.share, 6)}
                                for c in a.citations[:5]
                            ],
                            error=None,
                        )
                    except (QAError, CacheError) as e:
                        rec["error"] = str(e)
                else:
                    rec["error"] = error
                jsonl.append(fh, rec)
                written += 1
                bar.update(1)
                signals.check(out_jsonl, written)


def _merge(jobs: list[dict], out_jsonl: Path, mine: Path, world: int, rank: int, created: bool) -> None:
    """Fold every answer into ``out_jsonl`` in job order: under torchrun, the ranks' (gathered
    to rank 0); in one process, rank files an earlier sharded run left."""
    rank_files = jsonl.rank_files(out_jsonl)
    order = [(j["id"], q["id"]) for j in jobs for q in j["questions"]]
    if world > 1:
        import torch.distributed as dist

        # Gather every rank's lines to rank 0 (no shared file system needed), merge, wait.
        lines = [e.line for e in jsonl.read(mine, _key)]
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(lines, gathered, dst=0)
        if rank == 0:  # plus rank files of earlier runs with another world size, if here
            local = [e.line for p in jsonl.rank_files(out_jsonl) for e in jsonl.read(p, _key)]
            jsonl.merge(out_jsonl, _key, [line for part in gathered for line in part] + local, order)
        dist.barrier()
        if created:
            dist.destroy_process_group()
    elif rank_files:  # a single process finishing a sharded run: fold the rank files in
        jsonl.merge(out_jsonl, _key, [e.line for p in rank_files for e in jsonl.read(p, _key)], order)


def run_batch(
    model: Model,
    jobs_jsonl,
    out_jsonl,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    chunk_size: int = 2048,
    offload: OffloadPolicy | None = None,
    max_context: int | None = None,
    overflow: str = "error",
    progress: bool = True,
) -> Path:
    """Answer every question of every job in ``jobs_jsonl`` into ``out_jsonl``; returns it.

    A job: {"id", "corpus": a folder/file or a list of them (relative to the jobs file's
    folder), "questions": [{"id", "question"} or a plain string, ...]}. Each output line:
    {"job", "id", "question", "answer", "stopped": "stop" | "length", "citations": [{"title",
    "source", "page", "share"}] (top 5), "error": null}, or for a job or question that failed {"job", "id",
    "question", "error": "..."} (missing/unreadable corpus, malformed line, too long for max_context).
    Consecutive jobs naming the same corpus share one prefill. ``overflow``: a corpus over the
    context, as in ``Session`` ("error": the job's lines are errors; "drop" / "truncate").
    Resumable: answered (job, id) pairs are skipped. One process at a time: ``BatchLockedError``
    (an OSError) at once while another holds ``<out>.lock`` (per rank file under torchrun).
    SIGTERM/SIGINT: the answer in flight is written, then ``BatchInterrupted`` (an
    InterruptedError, so an OSError) is raised; see the module docstring. Under torchrun each
    rank answers jobs i with i % world == rank into ``<out>.rank<r>`` and rank 0 then writes
    ``out_jsonl`` with every answer in job order."""
    check_int("max_new_tokens", max_new_tokens, 0)
    check_int("chunk_size", chunk_size, 1)
    check_int("seed", seed, 0)
    check_sampling(temperature, 1.0)
    if max_context is not None:
        check_int("max_context", max_context, 1)
    if overflow not in ("error", "drop", "truncate"):
        raise ValueError(f"overflow must be 'error', 'drop' or 'truncate', got {overflow!r}")
    if not Path(jobs_jsonl).is_file():
        raise FileNotFoundError(f"jobs_jsonl: {jobs_jsonl} is not a file")
    # NOTE: ranks meet only at the end, where the fastest waits for the slowest; the default
    # collective timeout (10-30 min) would kill a long uneven batch, so wait up to a week.
    world, rank, created = join(model.device, datetime.timedelta(days=7))
    jobs_jsonl, out_jsonl = Path(jobs_jsonl), Path(out_jsonl)
    mine = jsonl.rank_path(out_jsonl, rank) if world > 1 else out_jsonl
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    jobs = _parse_jobs(jobs_jsonl)
    with jsonl.locked(mine), _Signals() as signals:  # BatchLockedError at once if another process writes it
        _answer(
            model,
            jobs,
            out_jsonl,
            mine,
            world,
            rank,
            signals,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            chunk_size=chunk_size,
            offload=offload,
            max_context=max_context,
            overflow=overflow,
            progress=progress,
        )
        _merge(jobs, out_jsonl, mine, world, rank, created)
    return out_jsonl


def count_answers(out_jsonl) -> tuple[int, int]:
    """(answered, failed): the lines of an answers file without and with an error."""
    recs = [e.record for e in jsonl.read(Path(out_jsonl), _key)]
    failed = sum(1 for r in recs if r.get("error"))
    return len(recs) - failed, failed
