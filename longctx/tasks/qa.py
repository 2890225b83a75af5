"""Cross-document QA: prefill a corpus once, ask many questions, cite the documents used.

    session = Session(model, ingest(["reports/"]))      # packs and prefills once
    a = session.ask("Which report mentions the merger?")
    a.text, a.citations[0].title, a.citations[0].share

Each ``ask`` appends the question to a *fork* of the corpus cache (sealed KV segments are
shared, not copied) and drops the fork afterwards, so questions never re-prefill the corpus
and never see each other. Citations rank documents by the share of global-layer attention
mass that the answer's tokens put on each document's span (``KVCache.record_attention``);
shares over documents plus the non-document tokens (template, question, answer) sum to 1.

``run_batch`` runs a JSONL file of jobs (a corpus + questions) into a JSONL file of answers,
crash-safe: each answer is appended, flushed and fsync'd; a restart skips answered ids and
drops a torn last line. Under ``torchrun`` jobs are sharded over ranks (gloo on CPU, NCCL on
GPUs); each rank writes its own file and rank 0 merges them in job order.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import CacheError, KVCache, OffloadPolicy, atomic_folder, token_hash
from ..text.ingest import BudgetError, IngestError, ingest
from ..generate import prefill, sample
from ..text.prompt import context_prefix, question_suffix

SESSION_FORMAT = "longctx-session-1"


class QAError(ValueError):
    """A question or session that can't be served (too long, other documents, ...)."""


@dataclass
class Citation:
    doc_id: int  # position in the corpus (Document.id)
    title: str
    source: str | None
    page: int | None  # the page holding most of the document's share (paged documents)
    share: float  # of all global-layer attention mass of the answer's tokens


@dataclass
class Answer:
    """An answer, its citations (best first) and what it cost.

    other_share: attention share on non-document tokens (prompt header, document delimiters,
    question, answer); ``sum(c.share for c in citations) + other_share == 1``.
    prefill_s: the question's own prefill (the corpus is already in the cache); decode_s: the
    answer's tokens (including the citation bookkeeping).
    """

    text: str
    citations: list[Citation]
    other_share: float
    question_tokens: int
    answer_tokens: int
    prefill_s: float
    decode_s: float
    stopped: str = "stop"  # "stop" (an end-of-turn token) or "length" (max_new_tokens reached)

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s


class Session:
    """A corpus packed and prefilled once; ``ask`` as often as you like.

    offload: where global-layer KV goes (``OffloadPolicy``); chunk_size: prefill chunk in
    tokens; max_context: the most tokens corpus + question + answer may take (default: the
    model's ``max_position_embeddings``); budget: token budget for the packed corpus (default:
    what fits in max_context). A corpus that does not fit raises ``QAError`` before any prefill.
    """

    def __init__(self, model, corpus, *, offload: OffloadPolicy | None = None, chunk_size: int = 2048,
                 max_context: int | None = None, budget: int | None = None, progress: bool | None = None):
        tok = self._tokenizer(model)
        limit = max_context or model.config.max_position_embeddings
        head = np.asarray(context_prefix(tok, []), dtype=np.int64)  # the prompt header
        header = len(head)
        try:
            cfg = model.config
            packed = corpus.pack(tok, budget=limit - header if budget is None else budget, progress=bool(progress),
                                 chunk=cfg.attention_chunk_size if cfg.chunk_markers else None, offset=header)
        except BudgetError as e:
            raise QAError(f"the corpus does not fit the context of {limit} tokens ({header} of them are the prompt "
                          f"header): {e}") from e
        # = context_prefix(tok, packed.ids), kept as one int64 array: a list of Python ints
        # would cost ~36 bytes a token (360 MB at 10M tokens).
        prefix = np.concatenate([head, np.asarray(packed.ids, dtype=np.int64)])
        self._init(model, [dataclasses.asdict(s) for s in packed.spans],
                   [{"title": d.title, "source": d.source, "sha256": d.sha256} for d in corpus.documents],
                   prefix, header, chunk_size, max_context)
        self.cache = model.new_cache(offload=offload)
        t0 = time.perf_counter()
        prefill(model, torch.from_numpy(prefix)[None], self.cache, chunk_size, progress)
        self.prefill_s = time.perf_counter() - t0

    def _init(self, model, spans, documents, prefix, offset, chunk_size, max_context) -> None:
        # spans: DocumentSpan dicts with start/end offsets into Packed.ids; offset: where
        # Packed.ids starts in the prefix (the prompt header's length).
        self.model, self.spans, self.documents = model, spans, documents
        self.prefix, self.offset, self.chunk_size, self.max_context = prefix, offset, chunk_size, max_context

    @staticmethod
    def _tokenizer(model):
        if getattr(model, "tokenizer", None) is None:
            raise QAError("the model has no tokenizer (load it from a folder with tokenizer.model)")
        return model.tokenizer

    @property
    def n_tokens(self) -> int:
        """Tokens in the prefilled prefix (template + packed corpus); ``prefix`` holds them
        (int64 array)."""
        return len(self.prefix)

    def __repr__(self) -> str:
        return f"Session({len(self.documents)} documents, {self.n_tokens} tokens)"

    @torch.inference_mode()
    def ask(self, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
            generator: torch.Generator | None = None, max_context: int | None = None) -> Answer:
        """Answer ``question`` from the corpus (greedy at temperature 0; else sampled with
        ``generator``). Stops at <|eot|>/<|eom|> or the config's eos ids, or after
        ``max_new_tokens``. Raises ``QAError`` if corpus + question + answer would not fit in
        ``max_context`` tokens (default: the session's, else max_position_embeddings)."""
        if not isinstance(question, str) or not question.strip():
            raise QAError(f"a question must be a non-empty string, got {question!r}")
        model, tok = self.model, self._tokenizer(self.model)
        suffix = question_suffix(tok, question, at=self.n_tokens, chunk=model.config.local_chunk)
        limit = max_context or self.max_context or model.config.max_position_embeddings
        if self.n_tokens + len(suffix) + max_new_tokens > limit:
            raise QAError(f"question of {len(suffix)} tokens + {max_new_tokens} answer tokens does not fit: "
                          f"the corpus holds {self.n_tokens} of {limit} tokens")
        cache = self.cache.fork()  # dropped on return: the session's cache never sees the question
        t0 = time.perf_counter()
        if len(suffix) > 1:
            prefill(model, torch.tensor([suffix[:-1]]), cache, self.chunk_size, progress=False)
        # Record from the query that predicts the first answer token on: those are the queries
        # whose attention produced the answer.
        cache.record_attention()
        logits = model(torch.tensor([suffix[-1:]], device=model.device), cache)[:, -1].float()
        t1 = time.perf_counter()
        stops, out, stopped = set(model.config.stop_ids) | {tok.eot_id, tok.eom_id}, [], "length"
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature=temperature, top_p=top_p, generator=generator)
            if int(nxt) in stops:
                stopped = "stop"
                break
            out.append(int(nxt))
            if step < max_new_tokens - 1:
                logits = model(nxt[:, None].to(model.device), cache)[:, -1].float()
        citations, other = self._cite(cache.attention_mass()[0])
        t2 = time.perf_counter()
        return Answer(tok.decode(out).strip(), citations, other, len(suffix), len(out), t1 - t0, t2 - t1, stopped)

    def _cite(self, mass: torch.Tensor) -> tuple[list[Citation], float]:
        """Attention mass per position (L,) -> documents ranked by their share, and the rest."""
        shares = (mass.double() / mass.double().sum()).numpy()
        by_doc: dict[int, dict] = {}
        for s in self.spans:
            share = float(shares[self.offset + s["start"] : self.offset + s["end"]].sum())
            d = by_doc.setdefault(s["doc_id"], {"share": 0.0, "pages": {}})
            d["share"] += share
            d["pages"][s["page"]] = d["pages"].get(s["page"], 0.0) + share
        cites = []
        for doc_id, d in by_doc.items():
            doc = self.documents[doc_id]
            page = max(d["pages"], key=d["pages"].get)
            cites.append(Citation(doc_id, doc["title"], doc["source"], page, d["share"]))
        cites.sort(key=lambda c: (-c.share, c.doc_id))
        return cites, float(1.0 - sum(c.share for c in cites))

    # ---- persistence ------------------------------------------------------------------------
    def save(self, folder) -> Path:
        """Persist the prefilled cache and what citing needs (spans, document titles and
        hashes). Atomic: the folder is built beside the target and renamed into place."""
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            self.cache.save(tmp / "cache")
            np.save(tmp / "prefix.npy", np.asarray(self.prefix, dtype=np.int64))
            meta = {"format": SESSION_FORMAT, "spans": self.spans, "documents": self.documents,
                    "offset": self.offset, "chunk_size": self.chunk_size, "max_context": self.max_context,
                    "prefix_sha256": token_hash(self.prefix[None])[0]}
            (tmp / "session.json").write_text(json.dumps(meta))
        return folder

    @classmethod
    def load(cls, model, folder, corpus=None, *, offload: OffloadPolicy | None = None) -> "Session":
        """Load a saved session. Refuses another model (``CacheError``); with ``corpus``, also
        refuses it (``QAError``) if its documents are not the ones the session was built from."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "session.json").read_text())
            prefix = np.load(folder / "prefix.npy").astype(np.int64)
        except FileNotFoundError as e:
            raise QAError(f"{folder}: not a saved session ({Path(e.filename).name} missing)") from None
        if meta.get("format") != SESSION_FORMAT:
            raise QAError(f"{folder}: unknown session format {meta.get('format')!r}")
        if corpus is not None:
            saved = [d["sha256"] for d in meta["documents"]]
            have = [d.sha256 for d in corpus.documents]
            if have != saved:
                diff = next((i for i, (a, b) in enumerate(zip(have, saved)) if a != b), min(len(have), len(saved)))
                raise QAError(f"{folder}: saved for other documents than this corpus ({len(saved)} saved, "
                              f"{len(have)} given; first difference at document {diff})")
        if token_hash(prefix[None])[0] != meta["prefix_sha256"]:
            raise QAError(f"{folder}: prefix.npy does not match session.json")
        self = object.__new__(cls)
        self._init(model, meta["spans"], meta["documents"], prefix, meta["offset"], meta["chunk_size"],
                   meta.get("max_context"))
        self._tokenizer(model)
        self.cache = KVCache.load(folder / "cache", model, tokens=torch.from_numpy(prefix)[None], offload=offload)
        self.prefill_s = 0.0
        return self


# ---- batch jobs -----------------------------------------------------------------------------
# Output: one JSON object per line, {"job", "id", "question", "answer", "citations", "error"}.
# A line is the unit of progress: written whole, flushed and fsync'd before the next question.


def _read_records(path: Path, *, repair: bool) -> list[tuple[tuple[str, str], str]]:
    """((job, id), line) of every complete, parseable line of an answers file. A torn last line
    (a crash mid-write) is cut off the file when ``repair`` (the file's own writer), else just
    ignored; an unparseable complete line is skipped with a warning (its question is redone)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
        data = data[:cut]
    out = []
    for n, raw in enumerate(data.split(b"\n")[:-1], 1):
        try:
            line = raw.decode("utf-8")
            rec = json.loads(line)
            out.append(((str(rec["job"]), str(rec["id"])), line))
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{path}:{n}: unreadable answer line skipped (its question will be asked again)")
    return out


def _rank_files(out_jsonl: Path) -> list[Path]:
    return sorted(out_jsonl.parent.glob(out_jsonl.name + ".rank*"))


def _parse_jobs(jobs_jsonl: Path) -> list[dict]:
    """Jobs in file order; a malformed line or job becomes a job that carries its error (id
    ``line<N>``). Relative corpus paths are taken relative to the jobs file's folder."""
    jobs, seen = [], {}
    for n, line in enumerate(Path(jobs_jsonl).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
            if not isinstance(job, dict) or "corpus" not in job or not isinstance(job.get("questions"), list):
                raise ValueError('a job is an object with "corpus" and a "questions" list')
            corpus = job["corpus"]
            corpus = [corpus] if isinstance(corpus, str) else corpus
            if not isinstance(corpus, list) or not corpus or not all(isinstance(p, str) for p in corpus):
                raise ValueError('"corpus" must be a path or a non-empty list of paths')
            base = Path(jobs_jsonl).parent
            job["paths"] = [str(base / Path(p).expanduser()) if not Path(p).expanduser().is_absolute()
                            else str(Path(p).expanduser()) for p in corpus]
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
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            jobs.append({"id": f"line{n}", "error": f"{jobs_jsonl}:{n}: malformed job ({e})",
                         "questions": [{"id": "-", "question": None}]})
    return jobs


def _write(fh, rec: dict) -> None:
    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")  # one write per line
    fh.flush()
    os.fsync(fh.fileno())


def _seed(seed: int, job: str, qid: str) -> int:
    """A per-question seed, so sampled answers do not depend on sharding or restarts."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{job}/{qid}".encode()).digest()[:8], "little") >> 1


def _distributed(model) -> tuple[int, int, bool]:
    """(world, rank, created): join torch.distributed when launched by torchrun (WORLD_SIZE>1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), False
    cuda = model.device.type == "cuda"
    if cuda:
        local = os.environ.get("LOCAL_RANK")
        if local is not None and model.device.index != int(local):
            warnings.warn(f"the model is on {model.device} but LOCAL_RANK is {local}: under torchrun load it on "
                          f"cuda:LOCAL_RANK (NCCL refuses two ranks on one GPU)")
        torch.cuda.set_device(model.device)
    # NOTE: ranks meet only at the end, where the fastest waits for the slowest; the default
    # collective timeout (10-30 min) would kill a long uneven batch, so wait up to a week.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(days=7))
    return dist.get_world_size(), dist.get_rank(), True


def run_batch(model, jobs_jsonl, out_jsonl, *, max_new_tokens: int = 64, temperature: float = 0.0,
              seed: int = 0, chunk_size: int = 2048, offload: OffloadPolicy | None = None,
              max_context: int | None = None, progress: bool = True) -> Path:
    """Answer every question of every job in ``jobs_jsonl`` into ``out_jsonl``; returns it.

    A job: {"id", "corpus": a folder/file or a list of them (relative to the jobs file's
    folder), "questions": [{"id", "question"} or a plain string, ...]}. Each output line:
    {"job", "id", "question", "answer", "stopped": "stop" | "length", "citations": [{"title",
    "source", "page", "share"}] (top 5), "error": null}, or for a job or question that failed {"job", "id", "question",
    "error": "..."} (missing/unreadable corpus, malformed line, too long for max_context).
    Consecutive jobs naming the same corpus share one prefill. Resumable: answered (job, id)
    pairs are skipped. Under torchrun each rank answers jobs i with i % world == rank into
    ``<out>.rank<r>`` and rank 0 then writes ``out_jsonl`` with every answer in job order."""
    world, rank, created = _distributed(model)
    jobs_jsonl, out_jsonl = Path(jobs_jsonl), Path(out_jsonl)
    mine = out_jsonl.with_name(out_jsonl.name + f".rank{rank}") if world > 1 else out_jsonl
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    jobs = _parse_jobs(jobs_jsonl)
    rank_files = _rank_files(out_jsonl)
    done = {k for k, _ in _read_records(mine, repair=True)}
    for path in {out_jsonl, *rank_files} - {mine}:  # answers of earlier runs, any layout
        done |= {k for k, _ in _read_records(path, repair=False)}
    todo = [j for i, j in enumerate(jobs) if i % world == rank]
    bar = tqdm(total=sum(len(j["questions"]) for j in todo), desc=f"batch (rank {rank})" if world > 1 else "batch",
               unit="q", disable=not progress, position=rank)
    last: tuple[tuple, Session] | None = None  # the latest corpus session, reused by the next job
    with open(mine, "a", encoding="utf-8") as fh:
        for job in todo:
            qs = [q for q in job["questions"] if (job["id"], q["id"]) not in done]
            bar.update(len(job["questions"]) - len(qs))
            if not qs:
                continue
            session, error = None, job.get("error")
            if error is None:
                key = (tuple(job["paths"]), chunk_size, max_context)
                if last is not None and last[0] == key:
                    session = last[1]
                else:
                    last = None  # free the previous corpus's cache before prefilling the next
                    try:
                        corpus = ingest(job["paths"], progress=False)
                        session = Session(model, corpus, offload=offload, chunk_size=chunk_size,
                                          max_context=max_context, progress=False)
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
                        a = session.ask(q["question"], max_new_tokens=max_new_tokens, temperature=temperature,
                                        generator=gen)
                        rec.update(answer=a.text, stopped=a.stopped, citations=[
                            {"title": c.title, "source": c.source, "page": c.page, "share": round(c.share, 6)}
                            for c in a.citations[:5]], error=None)
                    except (QAError, CacheError) as e:
                        rec["error"] = str(e)
                else:
                    rec["error"] = error
                _write(fh, rec)
                bar.update(1)
    bar.close()
    if world > 1:
        import torch.distributed as dist

        # Gather every rank's lines to rank 0 (no shared file system needed), merge, wait.
        lines = [line for _, line in _read_records(mine, repair=False)]
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(lines, gathered, dst=0)
        if rank == 0:  # plus rank files of earlier runs with another world size, if here
            local = [l for p in _rank_files(out_jsonl) for _, l in _read_records(p, repair=False)]
            _merge(jobs, out_jsonl, [l for part in gathered for l in part] + local)
        dist.barrier()
        if created:
            dist.destroy_process_group()
    elif rank_files:  # a single process finishing a sharded run: fold the rank files in
        _merge(jobs, out_jsonl, [l for p in rank_files for _, l in _read_records(p, repair=False)])
    return out_jsonl


def _merge(jobs: list[dict], out_jsonl: Path, lines: list[str]) -> None:
    """Write ``out_jsonl`` atomically: its own answers and ``lines``, one per (job, id), in job
    order; answers of ids the jobs file no longer has follow, in the order first seen."""
    recs: dict[tuple[str, str], str] = {}
    for key, line in _read_records(out_jsonl, repair=False):
        recs.setdefault(key, line)
    for line in lines:
        rec = json.loads(line)
        recs.setdefault((str(rec["job"]), str(rec["id"])), line)
    order = [(j["id"], q["id"]) for j in jobs for q in j["questions"]]
    known = set(order)
    keys = [k for k in order if k in recs] + [k for k in recs if k not in known]
    tmp = out_jsonl.with_name(f".{out_jsonl.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(recs[k] + "\n" for k in keys)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_jsonl)
