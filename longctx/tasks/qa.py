"""Cross-document QA: prefill a corpus once, ask many questions, cite the documents used.

    session = Session(model, ingest(["reports/"]))      # packs and prefills once
    a = session.ask("Which report mentions the merger?")
    a.text, a.citations[0].title, a.citations[0].share

Each ``ask`` appends the question to a *fork* of the corpus cache (sealed KV segments are
shared, not copied) and drops the fork afterwards, so questions never re-prefill the corpus
and never see each other. Citations rank documents by the share of global-layer attention
mass that the answer's tokens put on each document's span (``KVCache.record_attention``);
shares over documents plus the non-document tokens (template, question, answer) sum to 1.

Batch jobs over many corpora and questions: ``longctx.tasks.batch.run_batch``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..cache import KVCache, OffloadPolicy, atomic_folder, token_hash
from ..generate import decode, prefill
from ..text.ingest import BudgetError
from ..text.prompt import context_prefix, question_suffix

if TYPE_CHECKING:
    from ..model import Model
    from ..text.ingest import Corpus
    from ..text.tokenizer import Tokenizer

__all__ = ["Answer", "Citation", "QAError", "Session"]

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


@dataclass
class _Prefilled:
    """A packed corpus in a KV cache: what a Session holds besides the model and its settings.

    prefix: prompt header + packed corpus ids, one int64 array (a list of Python ints would
    cost ~36 bytes a token, 360 MB at 10M tokens); offset: where the packed ids start in it (the
    header's length); spans: ``DocumentSpan`` dicts, start/end into the packed ids; documents:
    {"title", "source", "sha256"} per document; cache: the prefix's KV; prefill_s: its seconds.
    """

    prefix: np.ndarray
    offset: int
    spans: list[dict]
    documents: list[dict]
    cache: KVCache
    prefill_s: float


def _tokenizer(model: Model) -> Tokenizer:
    if getattr(model, "tokenizer", None) is None:
        raise QAError("the model has no tokenizer (load it from a folder with tokenizer.model)")
    return model.tokenizer


def _pack_and_prefill(model: Model, corpus: Corpus, offload: OffloadPolicy | None, chunk_size: int,
                      max_context: int | None, budget: int | None, progress: bool | None) -> _Prefilled:
    """Pack ``corpus`` behind the prompt header (QAError, before any prefill, if it does not
    fit) and prefill it into a new cache."""
    tok, cfg = _tokenizer(model), model.config
    limit = max_context or cfg.max_position_embeddings
    head = np.asarray(context_prefix(tok, []), dtype=np.int64)  # the prompt header
    try:
        packed = corpus.pack(tok, budget=limit - len(head) if budget is None else budget, progress=bool(progress),
                             chunk=cfg.attention_chunk_size if cfg.chunk_markers else None, offset=len(head))
    except BudgetError as e:
        raise QAError(f"the corpus does not fit the context of {limit} tokens ({len(head)} of them are the prompt "
                      f"header): {e}") from e
    prefix = np.concatenate([head, np.asarray(packed.ids, dtype=np.int64)])  # = context_prefix(tok, packed.ids)
    cache = model.new_cache(offload=offload)
    t0 = time.perf_counter()
    prefill(model, torch.from_numpy(prefix)[None], cache, chunk_size, progress)
    return _Prefilled(prefix, len(head), [dataclasses.asdict(s) for s in packed.spans],
                      [{"title": d.title, "source": d.source, "sha256": d.sha256} for d in corpus.documents],
                      cache, time.perf_counter() - t0)


class Session:
    """A corpus packed and prefilled once; ``ask`` as often as you like.

    offload: where global-layer KV goes (``OffloadPolicy``); chunk_size: prefill chunk in
    tokens; max_context: the most tokens corpus + question + answer may take (default: the
    model's ``max_position_embeddings``); budget: token budget for the packed corpus (default:
    what fits in max_context). A corpus that does not fit raises ``QAError`` before any prefill.
    ``_prefilled`` is ``Session.load``'s way in: a saved corpus and its loaded cache, used as
    they are (``corpus`` is then None, and nothing is packed or prefilled).
    """

    def __init__(self, model: Model, corpus: Corpus | None, *, offload: OffloadPolicy | None = None,
                 chunk_size: int = 2048, max_context: int | None = None, budget: int | None = None,
                 progress: bool | None = None, _prefilled: _Prefilled | None = None):
        if _prefilled is None:
            if corpus is None:
                raise QAError("a Session needs a corpus (or use Session.load for a saved one)")
            _prefilled = _pack_and_prefill(model, corpus, offload, chunk_size, max_context, budget, progress)
        self.model, self.chunk_size, self.max_context = model, chunk_size, max_context
        p = _prefilled
        self.prefix, self.offset, self.spans, self.documents = p.prefix, p.offset, p.spans, p.documents
        self.cache, self.prefill_s = p.cache, p.prefill_s

    @property
    def n_tokens(self) -> int:
        """Tokens in the prefilled prefix (template + packed corpus); ``prefix`` holds them
        (int64 array)."""
        return len(self.prefix)

    def __repr__(self) -> str:
        return f"Session({len(self.documents)} documents, {self.n_tokens} tokens)"

    @torch.inference_mode()
    def ask(self, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
            generator: torch.Generator | None = None, max_context: int | None = None,
            on_token: Callable[[int, list[int | None]], None] | None = None) -> Answer:
        """Answer ``question`` from the corpus (greedy at temperature 0; else sampled with
        ``generator``). Stops at <|eot|>/<|eom|> or the config's eos ids, or after
        ``max_new_tokens``. Raises ``QAError`` if corpus + question + answer would not fit in
        ``max_context`` tokens (default: the session's, else max_position_embeddings).
        ``on_token(step, [id or None])`` sees each answer token as it is decoded (``decode``)."""
        if not isinstance(question, str) or not question.strip():
            raise QAError(f"a question must be a non-empty string, got {question!r}")
        model, tok = self.model, _tokenizer(self.model)
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
        gen = decode(model, cache, logits, max_new_tokens=max_new_tokens,
                     stop_ids=set(model.config.stop_ids) | {tok.eot_id, tok.eom_id}, temperature=temperature,
                     top_p=top_p, generator=generator, on_token=on_token)
        out = gen.tokens[0]
        citations, other = self._cite(cache.attention_mass()[0])
        t2 = time.perf_counter()
        return Answer(tok.decode(out).strip(), citations, other, len(suffix), len(out), t1 - t0, t2 - t1,
                      gen.stopped[0])

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
    def load(cls, model: Model, folder, corpus: Corpus | None = None, *,
             offload: OffloadPolicy | None = None) -> Session:
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
        _tokenizer(model)
        cache = KVCache.load(folder / "cache", model, tokens=torch.from_numpy(prefix)[None], offload=offload)
        return cls(model, None, chunk_size=meta["chunk_size"], max_context=meta.get("max_context"),
                   _prefilled=_Prefilled(prefix, meta["offset"], meta["spans"], meta["documents"], cache, 0.0))
