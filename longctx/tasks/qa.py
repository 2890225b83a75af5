"""Cross-document QA: prefill a corpus once, ask many questions, cite the documents used.

    session = Session(model, ingest(["reports/"]))      # packs and prefills once
    a = session.ask("What is the special magic number for pilot-9?")
    a.text, a.citations[0].title, a.citations[0].share
    for piece in session.ask("Which document mentions ...?", stream=True):   # text as decoded
        print(piece, end="", flush=True)

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
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..cache import CacheError, KVCache, OffloadPolicy, token_hash
from ..generate import TextStream, check_int, check_sampling, decode_steps, prefill
from ..notebook import html_table
from ..sparse import SparseDecode, read_share, reset_reads
from ..storage import Manifest, atomic_folder, recover, write_manifest
from ..text.ingest import BudgetError, Corpus
from ..text.prompt import context_prefix, question_suffix
from .answer import Answer, AnswerStream, Citation

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from ..model import Model
    from ..text.tokenizer import Tokenizer

__all__ = ["Answer", "AnswerStream", "Citation", "QAError", "Session"]

SESSION_FORMAT = "longctx-session-2"  # 2: session files listed with SHA-256 in manifest.json


class QAError(ValueError):
    """A question or session that can't be served (too long, other documents, ...)."""


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
    dropped: list[dict] = field(default_factory=list)  # {"title", "source"} of documents left out


def _tokenizer(model: Model) -> Tokenizer:
    if getattr(model, "tokenizer", None) is None:
        raise QAError("the model has no tokenizer (load it from a folder with tokenizer.model)")
    return model.tokenizer


def _check_corpus(corpus) -> None:
    """TypeError unless ``corpus`` is a ``Corpus`` (paths must go through ``ingest`` first);
    QAError if it has no documents."""
    if isinstance(corpus, (str, os.PathLike)):
        raise TypeError(
            f"corpus must be a Corpus, got the path {os.fspath(corpus)!r}: read it first with longctx.ingest([path])"
        )
    if not isinstance(corpus, Corpus):
        raise TypeError(f"corpus must be a Corpus (longctx.ingest makes one), got {type(corpus).__name__}")
    if len(corpus) == 0:
        skipped = (
            f" ({len(corpus.skipped)} inputs skipped, e.g. {corpus.skipped[0].path}: {corpus.skipped[0].reason})"
            if corpus.skipped
            else ""
        )
        raise QAError(f"corpus has no documents{skipped}: nothing to answer from")


def _pack_and_prefill(
    model: Model,
    corpus: Corpus,
    offload: OffloadPolicy | None,
    chunk_size: int,
    max_context: int | None,
    budget: int | None,
    progress: bool | None,
    overflow: str = "error",
    sparse: SparseDecode | None = None,
    context_parallel=False,
) -> _Prefilled:
    """Pack ``corpus`` behind the prompt header (QAError, before any prefill, if it does not
    fit) and prefill it into a new cache."""
    tok, cfg = _tokenizer(model), model.config
    limit = max_context or cfg.max_position_embeddings
    head = np.asarray(context_prefix(tok, []), dtype=np.int64)  # the prompt header
    try:
        packed = corpus.pack(
            tok,
            budget=limit - len(head) if budget is None else budget,
            progress=bool(progress),
            chunk=cfg.attention_chunk_size if cfg.chunk_markers else None,
            offset=len(head),
            overflow=overflow,
        )
    except BudgetError as e:
        raise QAError(
            f"the corpus does not fit the context of {limit} tokens ({len(head)} of them are the prompt "
            f"header): {e} (command line: --overflow drop|truncate)"
        ) from e
    prefix = np.concatenate([head, np.asarray(packed.ids, dtype=np.int64)])  # = context_prefix(tok, packed.ids)
    cache = model.new_cache(offload=offload, sparse=sparse, context_parallel=context_parallel)
    t0 = time.perf_counter()
    prefill(model, torch.from_numpy(prefix)[None], cache, chunk_size, progress)
    return _Prefilled(
        prefix,
        len(head),
        [dataclasses.asdict(s) for s in packed.spans],
        [{"title": d.title, "source": d.source, "sha256": d.sha256} for d in corpus.documents],
        cache,
        time.perf_counter() - t0,
        [{"title": d.title, "source": d.source} for d in packed.dropped],
    )


class Session:
    """A corpus packed and prefilled once; ``ask`` as often as you like.

    offload: where global-layer KV goes (``OffloadPolicy``); chunk_size: prefill chunk in
    tokens; max_context: the most tokens corpus + question + answer may take (default: the
    model's ``max_position_embeddings``); budget: token budget for the packed corpus (default:
    what fits in max_context); overflow: what to do with a corpus over the budget, as in
    ``Corpus.pack``: "error" (``QAError``, before any prefill), "drop" (leave out whole
    documents from the end) or "truncate" (also cut the first one that does not fit);
    ``dropped`` lists the documents left out. sparse: a ``longctx.sparse.SparseDecode`` for
    answers that read only the KV pages their queries select (default: exact). context_parallel:
    True or a ``torch.distributed`` group spreads the corpus's KV over its ranks
    (``longctx.distributed``); every rank then makes the same Session and asks the same
    questions, and gets the same answers. Arguments are checked before any packing:
    ``corpus`` must be a non-empty ``Corpus`` (``longctx.ingest`` makes one).
    ``_prefilled`` is ``Session.load``'s way in: a saved corpus and its loaded cache, used as
    they are (``corpus`` is then None, and nothing is packed or prefilled).
    """

    def __init__(
        self,
        model: Model,
        corpus: Corpus | None,
        *,
        offload: OffloadPolicy | None = None,
        chunk_size: int = 2048,
        max_context: int | None = None,
        budget: int | None = None,
        progress: bool | None = None,
        overflow: str = "error",
        sparse: SparseDecode | None = None,
        context_parallel: bool | ProcessGroup = False,
        _prefilled: _Prefilled | None = None,
    ):
        check_int("chunk_size", chunk_size, 1)
        if max_context is not None:
            check_int("max_context", max_context, 1)
        if _prefilled is None:
            _check_corpus(corpus)
            if budget is not None:
                check_int("budget", budget, 1)
            if overflow not in ("error", "drop", "truncate"):
                raise ValueError(f"overflow must be 'error', 'drop' or 'truncate', got {overflow!r}")
            _tokenizer(model)
            _prefilled = _pack_and_prefill(
                model, corpus, offload, chunk_size, max_context, budget, progress, overflow, sparse, context_parallel
            )
        self.model, self.chunk_size, self.max_context = model, chunk_size, max_context
        p = _prefilled
        self.prefix, self.offset, self.spans, self.documents = p.prefix, p.offset, p.spans, p.documents
        self.cache, self.prefill_s, self.dropped = p.cache, p.prefill_s, p.dropped

    @property
    def n_tokens(self) -> int:
        """Tokens in the prefilled prefix (template + packed corpus); ``prefix`` holds them
        (int64 array)."""
        return len(self.prefix)

    def __repr__(self) -> str:
        dropped = f", {len(self.dropped)} dropped" if self.dropped else ""
        return (
            f"Session({len(self.documents)} documents, {self.n_tokens} tokens{dropped}, prefill {self.prefill_s:.1f} s)"
        )

    def to_dict(self) -> dict:
        """Plain fields: documents ({"title", "source", "sha256"}), dropped, n_tokens, prefill_s,
        chunk_size, max_context."""
        return {
            "documents": [dict(d) for d in self.documents],
            "dropped": [dict(d) for d in self.dropped],
            "n_tokens": self.n_tokens,
            "prefill_s": self.prefill_s,
            "chunk_size": self.chunk_size,
            "max_context": self.max_context,
        }

    def _repr_html_(self) -> str:
        rows = [(i, d["title"], d["source"] or "in memory") for i, d in enumerate(self.documents[:20])]
        more = len(self.documents) - len(rows)
        return (
            f"<p>Session: {len(self.documents)} documents, {self.n_tokens:,} tokens prefilled in "
            f"{self.prefill_s:.2f} s"
            + (f", {len(self.dropped)} dropped by the budget" if self.dropped else "")
            + "</p>"
            + html_table(("id", "document", "source"), rows, f"{more} more" if more > 0 else None)
        )

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        max_context: int | None = None,
        on_token: Callable[[int, list[int | None]], None] | None = None,
        on_text: Callable[[str], None] | None = None,
        stream: bool = False,
    ) -> Answer | AnswerStream:
        """Answer ``question`` from the corpus (greedy at temperature 0; else sampled with
        ``generator``). Stops at <|eot|>/<|eom|> or the config's eos ids, or after
        ``max_new_tokens``. Raises ``QAError`` if corpus + question + answer would not fit in
        ``max_context`` tokens (default: the session's, else max_position_embeddings).
        ``on_token(step, [id or None])`` sees each answer token as it is decoded (``decode``);
        ``on_text(piece)`` each piece of the answer's text as it is decoded (``TextStream``).
        ``stream=True`` returns an ``AnswerStream`` instead: iterate it for the text pieces, then
        read its ``answer``. Arguments are checked here, before any prefill (TypeError /
        ValueError naming the argument; an empty question is a ``QAError``)."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        if not question.strip():
            raise QAError(f"question must be a non-empty string, got {question!r}")
        check_int("max_new_tokens", max_new_tokens, 0)
        check_sampling(temperature, top_p)
        if max_context is not None:
            check_int("max_context", max_context, 1)
        model, tok = self.model, _tokenizer(self.model)
        suffix = question_suffix(tok, question, at=self.n_tokens, chunk=model.config.local_chunk)
        limit = max_context or self.max_context or model.config.max_position_embeddings
        if self.n_tokens + len(suffix) + max_new_tokens > limit:
            raise QAError(
                f"question of {len(suffix)} tokens + {max_new_tokens} answer tokens does not fit: "
                f"the corpus holds {self.n_tokens} of {limit} tokens"
            )
        steps = self._answer(question, suffix, max_new_tokens, temperature, top_p, generator, on_token)
        if stream:
            return AnswerStream(steps)
        run = AnswerStream(steps)
        for piece in run:
            if on_text is not None:
                on_text(piece)
        return run.answer

    @torch.inference_mode()
    def _answer(
        self,
        question: str,
        suffix: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator,
        on_token,
    ) -> Generator[str, None, Answer]:
        """``ask``'s work once its arguments are checked: yields the answer's text pieces,
        returns the ``Answer``."""
        model, tok = self.model, self.model.tokenizer
        cache = self.cache.fork()  # dropped on return: the session's cache never sees the question
        t0 = time.perf_counter()
        if len(suffix) > 1:
            prefill(model, torch.tensor([suffix[:-1]]), cache, self.chunk_size, progress=False)
        # Record from the query that predicts the first answer token on: those are the queries
        # whose attention produced the answer.
        cache.record_attention()
        reset_reads(cache)
        logits = model(torch.tensor([suffix[-1:]], device=model.device), cache)[:, -1].float()
        t1 = time.perf_counter()
        steps = decode_steps(
            model,
            cache,
            logits,
            max_new_tokens=max_new_tokens,
            stop_ids=set(model.config.stop_ids) | {tok.eot_id, tok.eom_id},
            temperature=temperature,
            top_p=top_p,
            generator=generator,
        )
        text = TextStream(tok.token_bytes)
        step = 0
        while True:
            try:
                new = next(steps)
            except StopIteration as end:
                gen = end.value
                break
            if on_token is not None:
                on_token(step, new)
            step += 1
            if new[0] is not None and (piece := text.push(new[0])):
                yield piece
        if piece := text.close():
            yield piece
        out = gen.tokens[0]
        citations, other = self._cite(cache.attention_mass()[0])
        t2 = time.perf_counter()
        return Answer(
            tok.decode(out).strip(),
            citations,
            other,
            len(suffix),
            len(out),
            t1 - t0,
            t2 - t1,
            gen.stopped[0],
            question,
            read_share(cache),
        )

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
            meta = {
                "format": SESSION_FORMAT,
                "spans": self.spans,
                "documents": self.documents,
                "dropped": self.dropped,
                "offset": self.offset,
                "chunk_size": self.chunk_size,
                "max_context": self.max_context,
                "prefix_sha256": token_hash(self.prefix[None])[0],
            }
            (tmp / "session.json").write_text(json.dumps(meta))
            write_manifest(tmp)  # session.json and prefix.npy; cache/ carries its own
        return folder

    @classmethod
    def load(
        cls,
        model: Model,
        folder,
        corpus: Corpus | None = None,
        *,
        offload: OffloadPolicy | None = None,
        sparse: SparseDecode | None = None,
    ) -> Session:
        """Load a saved session (``sparse``: see ``Session``; the cache must have been saved
        with its page summaries). Refuses another model (``CacheError``); with ``corpus``, also
        refuses it (``QAError``) if its documents are not the ones the session was built from."""
        folder = Path(folder)
        if not (folder / "session.json").is_file():
            raise QAError(f"{folder}: not a saved session (session.json missing)")
        try:
            recover(folder)  # a save killed part way: put the complete copy back first
            manifest = Manifest(folder)
            meta = json.loads(manifest.check("session.json").read_text())
            prefix = np.load(manifest.check("prefix.npy"), allow_pickle=False).astype(np.int64)
        except CacheError as e:  # the files are checked before they are read
            raise QAError(f"saved session: {e}") from None
        except (OSError, ValueError) as e:  # verified bytes that still don't parse: another writer
            raise QAError(f"{folder}: unreadable session ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict) or meta.get("format") != SESSION_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise QAError(f"{folder}: unknown session format {got!r} (this longctx writes {SESSION_FORMAT})")
        if corpus is not None:
            saved = [d["sha256"] for d in meta["documents"]]
            have = [d.sha256 for d in corpus.documents]
            if have != saved:
                diff = next((i for i, (a, b) in enumerate(zip(have, saved)) if a != b), min(len(have), len(saved)))
                raise QAError(
                    f"{folder}: saved for other documents than this corpus ({len(saved)} saved, "
                    f"{len(have)} given; first difference at document {diff})"
                )
        if token_hash(prefix[None])[0] != meta["prefix_sha256"]:
            raise QAError(f"{folder}: prefix.npy does not match session.json")
        _tokenizer(model)
        cache = KVCache.load(
            folder / "cache", model, tokens=torch.from_numpy(prefix)[None], offload=offload, sparse=sparse
        )
        return cls(
            model,
            None,
            chunk_size=meta["chunk_size"],
            max_context=meta.get("max_context"),
            _prefilled=_Prefilled(
                prefix, meta["offset"], meta["spans"], meta["documents"], cache, 0.0, meta.get("dropped", [])
            ),
        )
