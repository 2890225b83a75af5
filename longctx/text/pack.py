"""Packing: lay a corpus out as one token sequence, with delimiters and exact spans.

    packed = pack(corpus, tokenizer, budget=1_000_000)   # or corpus.pack(tokenizer, ...)
    packed.ids            # numpy int32 array of token ids
    packed.spans          # DocumentSpan(doc_id, title, page, start, end, truncated, ...)
    packed.locate(12345)  # -> (Document, page) or None for delimiter tokens

Each document is [header][text][footer] from a plain-text template, each piece encoded on its
own so that spans are exact; see `pack` for the layout and the budget policies, `delimiters`
for the header/footer text of one document.

Document text can't forge the layout: delimiter-shaped text is escaped before it is packed
(``longctx.text.delimiters``), so the packed ids hold exactly one header per packed document;
`Packed.text` gives a document's text as packed (what its spans decode to).
"""

from __future__ import annotations

import bisect
import dataclasses
import html
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from .delimiters import (
    DEFAULT_MARKER,
    DEFAULT_TEMPLATE,
    ESCAPE,
    delimiters,
    escape,
    lookalikes,
    render,
    rewrite,
    split_template,
    unescape,
)
from .document import BudgetError, Document, DocumentSpan, progress_bar

__all__ = ["DEFAULT_MARKER", "DEFAULT_TEMPLATE", "ESCAPE", "Packed", "delimiters", "escape", "pack", "unescape"]

# Show the tokenizing progress bar by default only for corpora this big (and only on a terminal).
_PROGRESS_MIN_CHARS = 20_000_000
# A tokenizer without `encode_arrays` gets the texts in `encode_batch` calls of about this many
# characters, so that the progress bar moves.
_ENCODE_GROUP_CHARS = 8_000_000


def pack(
    corpus,
    tokenizer,
    *,
    budget: int | None = None,
    template: str = DEFAULT_TEMPLATE,
    overflow: str = "error",
    chunk: int | None = None,
    offset: int = 0,
    marker: str = DEFAULT_MARKER,
    progress: bool | None = None,
    num_threads: int | None = None,
) -> Packed:
    """Lay the documents of `corpus` out as token ids with delimiters; return ids and exact spans.

    corpus: a `Corpus` (its `documents`, in order).
    tokenizer: a `longctx.text.tokenizer.Tokenizer`, or any object with `encode_batch` and
        `decode_bytes` (its `encode_arrays` is used when it has one).
    budget: the most tokens the result may have (delimiters included); None = no limit.
    template: delimiter format with exactly one `{text}` field; the part before it is the
        header, the part after it the footer, both formatted with {id}, {title}, {source}
        (values HTML-escaped and on one line, so a title cannot break the markup).
    overflow: what to do when the documents need more than `budget` tokens:
        "error"    raise BudgetError saying how many tokens over (the default);
        "drop"     keep the longest prefix of whole documents that fits, drop the rest;
        "truncate" as "drop", then cut the first document that does not fit to fill the
                   remaining budget (header and footer kept, text cut at a token boundary
                   that is also a character boundary; its last span has truncated=True).
        Left-out documents are listed in `Packed.dropped`.
    chunk: for a model whose local attention layers see only their own chunk of `chunk`
        tokens (Llama 4's iRoPE layers: `ModelConfig.attention_chunk_size`): every chunk
        that holds a document's text then names the document too, after that text: the
        text stops short of each chunk's end (at a character boundary) for a `marker`
        line, and the last piece is closed by one as well. Every text token then has its
        document's marker later in its own chunk (where a local layer at the marker can
        read the text it closes). None (default): no markers.
    offset: the prompt position of the first packed token (the tokens the prompt puts
        before the corpus, e.g. `len(longctx.text.prompt.context_prefix(tok, []))`), so that
        markers fall on the model's chunk starts. Only with `chunk`.
    marker: the marker line, formatted with {id}, {title}, {source} like the header; at
        most chunk // 2 tokens. Its look-alikes are escaped in the text with or without `chunk`
        (a model trained on markers reads them either way).
    progress: a tqdm bar (None: only for big corpora on a terminal).
    num_threads: encoding threads (default: all cores).

    Layout, per document: [header tokens][text tokens][footer tokens]. Header, footer and
    each page of the text are encoded separately and concatenated, never merged across a
    boundary; so the tokens of each span decode to exactly that page's text (BPE merges
    across a page boundary are given up, which costs a token now and then), and `locate`
    is exact. The text is packed escaped (`escape`): delimiter look-alikes of `template` and
    `marker` in it get an ESCAPE, so a document can't forge another's header, footer or
    marker; ValueError for a template or marker whose delimiters can't be told from text (one
    that starts with a field, or has one character of fixed text). Spans index that text
    (`Packed.text`). Spans are per page for paged documents (PDFs), one per document otherwise;
    with `chunk`, [header][text][marker][text][marker]...[footer], and a page is split into
    one span per piece between markers.
    """
    if not hasattr(tokenizer, "encode_batch") or not hasattr(tokenizer, "decode_bytes"):
        raise TypeError(
            f"tokenizer must be a longctx Tokenizer (or have encode_batch and decode_bytes), got "
            f"{type(tokenizer).__name__}: e.g. corpus.pack(model.tokenizer) or corpus.pack(Tokenizer.default())"
        )
    if overflow not in ("error", "drop", "truncate"):
        raise ValueError(f"overflow must be 'error', 'drop' or 'truncate', got {overflow!r}")
    if budget is not None and (not isinstance(budget, int) or budget < 0):
        raise ValueError(f"budget must be a non-negative int or None, got {budget!r}")
    header_fmt, footer_fmt = split_template(template)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 8):
        raise ValueError(f"chunk must be an int >= 8 or None, got {chunk!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    marker_fmt = ""
    if chunk:
        try:  # the marker takes the header's fields and no {text}
            marker_fmt, _ = split_template(marker + "{text}")
        except ValueError as e:
            raise ValueError(f"bad marker {marker!r}: {e}") from None
    looks = lookalikes(template, marker)
    threads = num_threads or os.cpu_count() or 1

    # One entry per document: header, footer and page strings, and their char ranges in the
    # text as packed (delimiter look-alikes escaped; `texts` holds the texts that changed).
    plans, texts = [], {}
    for doc in corpus.documents:
        ranges = doc.page_ranges()
        text, grown = rewrite(doc.text, looks, +1)
        if text is not doc.text and text != doc.text:
            texts[doc.id] = text
        if grown:  # page bounds move by what the characters before them grew
            at, added = [i for i, _ in grown], np.cumsum([0] + [n for _, n in grown]).tolist()
            ranges = [
                (page, a + added[bisect.bisect_left(at, a)], b + added[bisect.bisect_left(at, b)])
                for page, a, b in ranges
            ]
        pieces = list(render(doc, header_fmt, footer_fmt))
        if chunk:
            pieces.append(render(doc, marker_fmt, "")[0])
        pieces += [text[a:b] for _, a, b in ranges]
        plans.append((doc, ranges, pieces))

    # Tokenize, in document order, on all cores. Under "drop"/"truncate" we stop once the
    # budget is passed: documents after that are dropped without being tokenized.
    encoded: list[list[np.ndarray]] = []
    total = 0
    stop_early = budget is not None and overflow != "error"
    bar = progress_bar(progress, sum(len(d.text) for d in corpus.documents), _PROGRESS_MIN_CHARS, "tokenizing", "char")
    stream = _encoded(tokenizer, [p for _, _, pieces in plans for p in pieces], threads)
    try:
        for doc, _, pieces in plans:
            if stop_early and total > budget:
                break
            arrs = [next(stream) for _ in pieces]
            encoded.append(arrs)
            total += sum(len(a) for a in arrs)
            bar.update(len(doc.text))
    finally:
        stream.close()
        bar.close()

    # Decide what fits. With markers a document's size depends on where it starts.
    marks = _Marks(chunk, offset) if chunk else None
    if marks is None:
        sizes = [sum(len(a) for a in arrs) for arrs in encoded]
    else:
        long = next((plans[i][0] for i, arrs in enumerate(encoded) if len(arrs[2]) > chunk // 2), None)
        if long is not None:  # (a marker must leave most of a chunk to the text)
            raise ValueError(
                f"the chunk marker of document {long.id} ({long.title!r}) takes more than "
                f"chunk // 2 = {chunk // 2} tokens; use a shorter marker or a larger chunk"
            )
        sizes, pos = [], 0
        for (_, ranges, _), arrs in zip(plans, encoded):
            sizes.append(sum(len(ids) for ids, _ in _lay_out(tokenizer, ranges, arrs, pos, marks)))
            pos += sizes[-1]
        total = sum(sizes)
    n_keep, cut = len(encoded), None
    if budget is not None and total > budget:
        if overflow == "error":
            fit, used = 0, 0
            while fit < len(sizes) and used + sizes[fit] <= budget:
                used += sizes[fit]
                fit += 1
            raise BudgetError(
                f"the packed corpus needs {total} tokens but the budget is {budget}: "
                f"{total - budget} tokens over ({len(sizes)} documents; the first {fit} fit). "
                "Raise the budget, or pass overflow='drop' (drop whole documents from the end) "
                "or overflow='truncate' (also cut the first document that does not fit).",
                needed=total,
                budget=budget,
            )
        used, n_keep = 0, 0
        while used + sizes[n_keep] <= budget:
            used += sizes[n_keep]
            n_keep += 1
        if overflow == "truncate":
            cut = _truncate(tokenizer, plans[n_keep][1], encoded[n_keep], budget - used, used, marks)
    return Packed._build(plans, encoded, n_keep, cut, tokenizer, template, budget, marks, texts, marker)


def _encoded(tokenizer, texts: list[str], num_threads: int) -> Iterator[np.ndarray]:
    """The ids of each of `texts` as an int32 array (n_tokens,), in order; closing the generator
    early stops the work. Uses `tokenizer.encode_arrays` when there is one, else `encode_batch`
    on groups of about _ENCODE_GROUP_CHARS characters."""
    if hasattr(tokenizer, "encode_arrays"):
        yield from tokenizer.encode_arrays(texts, num_threads=num_threads)
        return
    k = 0
    while k < len(texts):
        j, chars = k, 0
        while j < len(texts) and (j == k or chars < _ENCODE_GROUP_CHARS):
            chars += len(texts[j])
            j += 1
        for ids in tokenizer.encode_batch(texts[k:j], num_threads=num_threads):
            yield np.asarray(ids, dtype=np.int32)
        k = j


class _Marks(NamedTuple):
    """Chunk markers of `pack`: the attention chunk and the prompt offset of the packing."""

    chunk: int
    offset: int


def _lay_out(
    tokenizer,
    ranges,
    arrs: list[np.ndarray],
    pos: int,
    marks: _Marks | None,
    cut: tuple[int, int | None] | None = None,
    chars: bool = False,
) -> list[tuple[np.ndarray, tuple | None]]:
    """One document's pieces in packed order, its header at token position `pos`: a list of
    (ids, where), where is None for a delimiter (header, marker, footer) and
    (page, char_start, char_end, truncated) for text (char offsets only with `chars`, else
    None). `arrs` is the document's [header, footer, (marker,) page...] ids; `cut` keeps only
    the first cut[0] text tokens, which end at char cut[1]."""
    header, footer = arrs[0], arrs[1]
    marker, pages = (arrs[2], arrs[3:]) if marks else (None, arrs[2:])
    out: list[tuple[np.ndarray, tuple | None]] = [(header, None)]
    pos += len(header)
    open_text = False  # text since the latest marker
    limit = None if cut is None else cut[0]
    for (page, a, b), arr in zip(ranges, pages):
        truncated = False
        if limit is not None:
            if limit <= 0:
                break
            if len(arr) >= limit:  # the cut falls in this page (or right at its end)
                truncated, arr, b = True, arr[:limit], cut[1]
            limit -= len(arr)
        if marks is None:
            out.append((arr, (page, a, b, truncated)))
            pos += len(arr)
            continue
        i = 0
        while True:
            room = marks.chunk - (marks.offset + pos) % marks.chunk - len(marker)  # text before this chunk's marker
            j = min(len(arr), i + max(room, 0))
            while i < j < len(arr) and tokenizer.decode_bytes([int(arr[j])])[:1] in _UTF8_CONTINUATION:
                j -= 1  # back to a character boundary
            if j == i < len(arr):  # no room left in this chunk: mark it and go on in the next
                out.append((marker, None))
                pos, open_text = pos + len(marker), False
                continue
            end = (
                b if j == len(arr) or not chars else a + len(tokenizer.decode_bytes(arr[i:j].tolist()).decode("utf-8"))
            )
            out.append((arr[i:j], (page, a if chars else None, end if chars else None, truncated and j == len(arr))))
            pos, open_text = pos + j - i, open_text or j > i
            a, i = end, j
            if i == len(arr):
                break
            out.append((marker, None))  # the chunk is full: its marker closes it
            pos, open_text = pos + len(marker), False
    if open_text:
        out.append((marker, None))
    out.append((footer, None))
    return out


_UTF8_CONTINUATION = frozenset(bytes([c]) for c in range(0x80, 0xC0))


def _truncate(tokenizer, ranges, arrs: list[np.ndarray], room: int, pos: int, marks: _Marks | None):
    """How much of a document fits in `room` tokens from position `pos`: (n text tokens kept,
    chars kept) or None.

    The cut is at a token boundary that is also a character boundary: byte-level BPE can end a
    token inside a multi-byte character, and a span must decode exactly to a prefix of the text.
    """
    header, footer, pages = arrs[0], arrs[1], arrs[2 + (marks is not None) :]
    text_ids = np.concatenate(pages) if pages else np.zeros(0, np.int32)
    if marks is None:
        keep = min(room - len(header) - len(footer), len(text_ids))
    else:  # the most text tokens whose layout (markers included) fits: the size grows with keep

        def size(keep: int) -> int:
            return sum(len(ids) for ids, _ in _lay_out(tokenizer, ranges, arrs, pos, marks, (keep, None)))

        lo, hi = 0, len(text_ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(mid) <= room else (lo, mid - 1)
        keep = lo
    while keep > 0:
        try:
            n_chars = len(tokenizer.decode_bytes(text_ids[:keep].tolist()).decode("utf-8"))
            return keep, n_chars
        except UnicodeDecodeError:
            keep -= 1  # the last token ends inside a character: drop it
    return None


class Packed:
    """Token ids of a packed corpus and where each document lies in them.

    ids: numpy int32 array (n_tokens,).
    spans: list of DocumentSpan in token order; disjoint; one per page of a paged document,
        one per unpaged document (with chunk markers: one per piece between markers). Empty
        pages give empty spans (start == end). A span's tokens decode exactly to
        ``text(doc_id)[char_start:char_end]``: char offsets are into the text as packed, which
        is the document's own unless it holds delimiter look-alikes (see `escape`).
    documents: the packed documents, in order; dropped: those left out by the budget.
    template, marker, budget, tokenizer_fingerprint: how it was packed (the marker's
        look-alikes are escaped with or without chunk markers).
    """

    def __init__(
        self,
        ids: np.ndarray,
        spans: list[DocumentSpan],
        documents: list[Document],
        dropped: list[Document],
        *,
        template: str,
        budget: int | None,
        tokenizer_fingerprint: str | None,
        texts: dict[int, str] | None = None,
        marker: str = DEFAULT_MARKER,
    ):
        self.ids = ids
        self._texts = texts or {}  # the packed texts that differ from their document's (escaped)
        self.spans = spans
        self.documents = documents
        self.dropped = dropped
        self.template = template
        self.marker = marker
        self.budget = budget
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self._docs = {d.id: d for d in documents}
        self._by_doc: dict[int, list[DocumentSpan]] = {}
        for s in spans:
            self._by_doc.setdefault(s.doc_id, []).append(s)
        # Non-empty spans only: locate bisects on their starts.
        live = [s for s in spans if s.end > s.start]
        self._live = live
        self._starts = [s.start for s in live]

    @classmethod
    def _build(
        cls, plans, encoded, n_keep, cut, tokenizer, template, budget, marks=None, texts=None, marker=DEFAULT_MARKER
    ) -> Packed:
        arrays: list[np.ndarray] = []
        spans: list[DocumentSpan] = []
        documents: list[Document] = []
        pos = 0
        n_docs = n_keep + (cut is not None)
        for i in range(n_docs):
            doc, ranges, _ = plans[i]
            for ids, where in _lay_out(
                tokenizer, ranges, encoded[i], pos, marks, cut if i == n_keep else None, chars=True
            ):
                if where is not None:
                    spans.append(DocumentSpan(doc.id, doc.title, where[0], pos, pos + len(ids), *where[1:]))
                arrays.append(ids)
                pos += len(ids)
            documents.append(doc)
        ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        dropped = [p[0] for p in plans[n_docs:]]
        return cls(
            ids,
            spans,
            documents,
            dropped,
            template=template,
            marker=marker,
            budget=budget,
            tokenizer_fingerprint=getattr(tokenizer, "fingerprint", None),
            texts={d.id: texts[d.id] for d in documents if d.id in (texts or {})},
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"Packed({len(self.ids)} tokens, {len(self.documents)} documents, {len(self.spans)} spans, "
            f"{len(self.dropped)} dropped)"
        )

    def to_dict(self) -> dict:
        """Plain fields without the ids (``ids`` itself is the array): n_tokens, spans (dicts),
        documents and dropped (document ids), template, marker, budget, tokenizer_fingerprint."""
        return {
            "n_tokens": len(self.ids),
            "spans": [dataclasses.asdict(s) for s in self.spans],
            "documents": [d.id for d in self.documents],
            "dropped": [d.id for d in self.dropped],
            "template": self.template,
            "marker": self.marker,
            "budget": self.budget,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
        }

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{s.doc_id}</td><td>{html.escape(s.title)}</td><td>{s.page or ''}</td><td>{s.start:,}</td>"
            f"<td>{s.end:,}</td><td>{'yes' if s.truncated else ''}</td></tr>"
            for s in self.spans[:20]
        )
        more = len(self.spans) - 20
        tail = f'<tr><td colspan="6">{more} more spans</td></tr>' if more > 0 else ""
        return (
            f"<p>{html.escape(repr(self))}</p><table><tr><th>document</th><th>title</th><th>page</th><th>start</th>"
            f"<th>end</th><th>truncated</th></tr>{rows}{tail}</table>"
        )

    def span_at(self, index: int) -> DocumentSpan | None:
        """The span holding token `index` (negative counts from the end), or None for a
        delimiter token. IndexError outside 0..len-1."""
        n = len(self.ids)
        if not -n <= index < n:
            raise IndexError(f"token index {index} out of range for {n} tokens")
        index = index + n if index < 0 else index
        k = bisect.bisect_right(self._starts, index) - 1
        if k >= 0 and index < self._live[k].end:
            return self._live[k]
        return None

    def locate(self, index: int) -> tuple[Document, int | None] | None:
        """Token index -> (document, page) it came from; page is 1-based for paged documents and
        None otherwise. Delimiter tokens (headers, footers) come from no document: None."""
        span = self.span_at(index)
        return None if span is None else (self._docs[span.doc_id], span.page)

    def text(self, doc_id: int) -> str:
        """A packed document's text as packed: ``escape(document.text, self.template, self.marker)``, the
        text its spans' char offsets index (KeyError as `document`)."""
        return self._texts.get(doc_id, self.document(doc_id).text)

    def document(self, doc_id: int) -> Document:
        """The packed document with this id (KeyError if it was dropped or never existed)."""
        if doc_id not in self._docs:
            why = "was dropped by the budget" if any(d.id == doc_id for d in self.dropped) else "is not in this corpus"
            raise KeyError(f"document {doc_id} {why}")
        return self._docs[doc_id]

    def page_spans(self, doc_id: int) -> list[DocumentSpan]:
        """The spans of one document, in order (one per page, or one; with chunk markers, one
        per piece of a page between markers)."""
        self.document(doc_id)
        return list(self._by_doc[doc_id])

    def span_of(self, doc_id: int) -> DocumentSpan:
        """One span covering the whole text of a document (page None; truncated if it was cut;
        with chunk markers, the markers inside the text too)."""
        parts = self.page_spans(doc_id)
        first, last = parts[0], parts[-1]
        return DocumentSpan(
            doc_id, first.title, None, first.start, last.end, first.char_start, last.char_end, last.truncated
        )
