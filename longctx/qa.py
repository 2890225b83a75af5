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
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import KVCache, OffloadPolicy, token_hash
from .documents import DocumentSpan, IngestError, ingest
from .generate import prefill, sample
from .prompt import context_prefix, question_suffix


class QAError(ValueError):
    """A question or session that can't be served (too long, other documents, ...)."""


@dataclass
class Citation:
    doc_id: int
    title: str
    source: str | None
    page: int | None  # the page holding most of the document's share (paged documents)
    share: float  # of all global-layer attention mass of the answer's tokens


@dataclass
class Answer:
    text: str
    citations: list[Citation]
    other_share: float  # mass on template, question and answer tokens
    question_tokens: int
    answer_tokens: int
    prefill_s: float  # the question's own prefill (the corpus is already in the cache)
    decode_s: float


class Session:
    """A corpus packed and prefilled once; ``ask`` as often as you like.

    offload: where global-layer KV goes (``OffloadPolicy``); chunk_size: prefill chunk in
    tokens; budget: token budget for the packed corpus (``Corpus.pack``).
    """

    def __init__(self, model, corpus, *, offload: OffloadPolicy | None = None, chunk_size: int = 2048,
                 budget: int | None = None, progress: bool | None = None):
        tok = self._tokenizer(model)
        packed = corpus.pack(tok, budget=budget, progress=bool(progress))
        prefix = context_prefix(tok, packed.ids)
        self._init(model, [dataclasses.asdict(s) for s in packed.spans],
                   [{"title": d.title, "source": d.source, "sha256": d.sha256} for d in corpus.documents],
                   prefix, len(prefix) - len(packed.ids), chunk_size)
        self.cache = model.new_cache(offload=offload)
        t0 = time.perf_counter()
        prefill(model, torch.tensor([prefix]), self.cache, chunk_size, progress)
        self.prefill_s = time.perf_counter() - t0

    def _init(self, model, spans, documents, prefix, offset, chunk_size) -> None:
        self.model, self.spans, self.documents = model, spans, documents
        self.prefix, self.offset, self.chunk_size = prefix, offset, chunk_size

    @staticmethod
    def _tokenizer(model):
        if model.tokenizer is None:
            raise QAError("the model has no tokenizer (load it from a folder with tokenizer.model)")
        return model.tokenizer

    @property
    def n_tokens(self) -> int:
        """Tokens in the prefilled prefix (template + packed corpus)."""
        return len(self.prefix)

    @torch.inference_mode()
    def ask(self, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
            generator: torch.Generator | None = None, max_context: int | None = None) -> Answer:
        """Answer ``question`` from the corpus. Raises ``QAError`` if question + answer would
        not fit in ``max_context`` tokens (default: the model's max_position_embeddings)."""
        model, tok = self.model, self._tokenizer(self.model)
        suffix = question_suffix(tok, question)
        limit = max_context or model.config.max_position_embeddings
        if self.n_tokens + len(suffix) + max_new_tokens > limit:
            raise QAError(f"question of {len(suffix)} tokens + {max_new_tokens} answer tokens does not fit: "
                          f"the corpus holds {self.n_tokens} of {limit} tokens")
        cache = self.cache.fork()
        t0 = time.perf_counter()
        if len(suffix) > 1:
            prefill(model, torch.tensor([suffix[:-1]]), cache, self.chunk_size, progress=False)
        cache.record_attention()  # from the query that predicts the first answer token on
        logits = model(torch.tensor([suffix[-1:]], device=model.device), cache)[:, -1].float()
        t1 = time.perf_counter()
        stops, out = set(model.config.stop_ids) | {tok.eot_id, tok.eom_id}, []
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature=temperature, top_p=top_p, generator=generator)
            if int(nxt) in stops:
                break
            out.append(int(nxt))
            if step < max_new_tokens - 1:
                logits = model(nxt[:, None].to(model.device), cache)[:, -1].float()
        t2 = time.perf_counter()
        citations, other = self._cite(cache.attention_mass()[0])
        return Answer(tok.decode(out).strip(), citations, other, len(suffix), len(out), t1 - t0, t2 - t1)

    def _cite(self, mass: torch.Tensor) -> tuple[list[Citation], float]:
        shares = (mass / mass.sum()).double().numpy()
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
        cites.sort(key=lambda c: -c.share)
        return cites, float(1.0 - sum(c.share for c in cites))

    # ---- persistence ------------------------------------------------------------------------
    def save(self, folder) -> Path:
        """Persist the prefilled cache (atomically) with the spans needed to cite."""
        folder = Path(folder)
        self.cache.save(folder / "cache")
        meta = {"spans": self.spans, "documents": self.documents, "offset": self.offset,
                "chunk_size": self.chunk_size, "prefix_sha256": token_hash([self.prefix])[0]}
        np.save(folder / "prefix.npy", np.asarray(self.prefix, dtype=np.int32))
        tmp = folder / "session.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, folder / "session.json")
        return folder

    @classmethod
    def load(cls, model, folder, corpus=None, *, offload: OffloadPolicy | None = None) -> "Session":
        """Load a saved session. Refuses another model; with ``corpus``, also refuses it if its
        documents are not the ones the session was built from."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "session.json").read_text())
            prefix = np.load(folder / "prefix.npy").tolist()
        except FileNotFoundError as e:
            raise QAError(f"{folder}: not a saved session ({e.filename} missing)") from None
        if corpus is not None:
            saved = [d["sha256"] for d in meta["documents"]]
            if [d.sha256 for d in corpus.documents] != saved:
                raise QAError(f"{folder}: saved for other documents than this corpus")
        self = object.__new__(cls)
        self._init(model, meta["spans"], meta["documents"], prefix, meta["offset"], meta["chunk_size"])
        if token_hash([prefix])[0] != meta["prefix_sha256"]:
            raise QAError(f"{folder}: prefix.npy does not match session.json")
        self.cache = KVCache.load(folder / "cache", model, tokens=torch.tensor([prefix]), offload=offload)
        self.prefill_s = 0.0
        return self


# ---- batch jobs -----------------------------------------------------------------------------


def _read_done(path: Path) -> set[tuple[str, str]]:
    """(job, question) ids already in an answers file; a torn last line is cut off first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)  # drop the partial line a crash left
        data = data[: data.rfind(b"\n") + 1]
    done = set()
    for line in data.decode("utf-8").splitlines():
        rec = json.loads(line)
        done.add((str(rec["job"]), str(rec["id"])))
    return done


def _parse_jobs(jobs_jsonl: Path) -> list[dict]:
    """Jobs in file order; a malformed line becomes a job that carries its error."""
    jobs = []
    for n, line in enumerate(Path(jobs_jsonl).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
            if not isinstance(job, dict) or "corpus" not in job or not isinstance(job.get("questions"), list):
                raise ValueError('a job needs "corpus" and a "questions" list')
            job.setdefault("id", f"line{n}")
            for k, q in enumerate(job["questions"]):
                if isinstance(q, str):
                    job["questions"][k] = {"id": str(k), "question": q}
                elif not isinstance(q, dict) or "question" not in q:
                    raise ValueError(f"question {k} must be a string or an object with \"question\"")
                else:
                    q.setdefault("id", str(k))
            jobs.append(job)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            jobs.append({"id": f"line{n}", "error": f"{jobs_jsonl}:{n}: malformed job ({e})",
                         "questions": [{"id": "-", "question": None}]})
    return jobs


def _write(fh, rec: dict) -> None:
    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def run_batch(model, jobs_jsonl, out_jsonl, *, max_new_tokens: int = 64, chunk_size: int = 2048,
              offload: OffloadPolicy | None = None, max_context: int | None = None,
              progress: bool = True) -> Path:
    """Answer every question of every job; see the module docstring. Each output line:
    {"job", "id", "question", "answer", "citations": [{"title", "source", "page", "share"}],
    "error": null} or, for a job or question that failed, {"job", "id", "error": "..."}."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    out_jsonl = Path(out_jsonl)
    mine = out_jsonl.with_name(out_jsonl.name + f".rank{rank}") if world > 1 else out_jsonl
    jobs = _parse_jobs(Path(jobs_jsonl))
    done = _read_done(mine) | (_read_done(out_jsonl) if world > 1 else set())
    todo = [j for i, j in enumerate(jobs) if i % world == rank]
    total = sum(len(j["questions"]) for j in todo)
    bar = tqdm(total=total, desc=f"batch (rank {rank})" if world > 1 else "batch", unit="q", disable=not progress)
    with open(mine, "a", encoding="utf-8") as fh:
        for job in todo:
            qs = [q for q in job["questions"] if (str(job["id"]), str(q["id"])) not in done]
            bar.update(len(job["questions"]) - len(qs))
            if not qs:
                continue
            session, error = None, job.get("error")
            if error is None:
                try:
                    paths = job["corpus"] if isinstance(job["corpus"], list) else [job["corpus"]]
                    session = Session(model, ingest([str(p) for p in paths], progress=False), offload=offload,
                                      chunk_size=chunk_size, progress=False)
                except (IngestError, QAError, ValueError, OSError) as e:
                    error = f"corpus: {e}"
            for q in qs:
                rec = {"job": job["id"], "id": q["id"], "question": q["question"]}
                if error is None:
                    try:
                        a = session.ask(q["question"], max_new_tokens=max_new_tokens, max_context=max_context)
                        rec.update(answer=a.text, citations=[
                            {"title": c.title, "source": c.source, "page": c.page, "share": round(c.share, 6)}
                            for c in a.citations[:5]], error=None)
                    except QAError as e:
                        rec["error"] = str(e)
                else:
                    rec["error"] = error
                _write(fh, rec)
                bar.update(1)
    bar.close()
    if world > 1:
        dist.barrier()
        if rank == 0:
            _merge_ranks(jobs, out_jsonl, world)
        dist.barrier()
    return out_jsonl


def _merge_ranks(jobs: list[dict], out_jsonl: Path, world: int) -> None:
    """Rank 0: all ranks' answers (and any earlier merged file) into out_jsonl, in job order."""
    recs = {}
    for path in [out_jsonl] + [out_jsonl.with_name(out_jsonl.name + f".rank{r}") for r in range(world)]:
        if path.exists():
            _read_done(path)  # cuts a torn line
            for line in path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                recs.setdefault((str(rec["job"]), str(rec["id"])), line)
    order = [(str(j["id"]), str(q["id"])) for j in jobs for q in j["questions"]]
    tmp = out_jsonl.with_name(out_jsonl.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(recs[k] + "\n" for k in order if k in recs)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_jsonl)
