"""Haystacks: token streams to hide needles in, with the indices where sentences start (English
prose from Python's documentation, repeated noise sentences, or a user's packed corpus)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import needles

if TYPE_CHECKING:
    from ..text.pack import Packed
    from ..text.tokenizer import Tokenizer


@dataclass
class Haystack:
    """A token stream to hide needles in, with the indices where sentences start."""

    name: str
    ids: np.ndarray  # int32 token ids
    bounds: np.ndarray  # sorted sentence-start indices into ids (0 included)
    packed: Packed | None = None  # the packed corpus, for provenance (document, page)
    labels: list[str] | None = None  # per unit (sentence) what it stands for: aggregation counts these
    whole: bool = False  # cut only between units; a cell's leftover tokens become newlines


def make_haystack(tokenizer: Tokenizer, source="english", min_tokens: int = 0, seed: int = 0) -> Haystack:
    """source: "english" (Python's documentation prose), "noise" (five repeated sentences), or
    a ``Corpus`` (packed with ``tokenizer``; needles then carry document and page). The English
    text starts at a seeded sentence and wraps around until ``min_tokens`` are there; a longer
    ``min_tokens`` only extends the stream (its start is the same), so cells of a short length
    are identical whatever the longest length of the grid."""
    if hasattr(source, "pack"):
        return corpus_haystack(tokenizer, source)
    if source not in ("english", "noise"):
        raise ValueError(f"haystack must be 'english', 'noise' or a Corpus, got {source!r}")
    sents = needles.encoded_sentences(tokenizer, source)
    i = random.Random(seed).randrange(len(sents)) if source == "english" else 0
    pieces, total = [], 0
    while total < max(min_tokens, 1):
        pieces.append(sents[i % len(sents)])
        total += len(pieces[-1])
        i += 1
    lens = np.array([len(p) for p in pieces])
    return Haystack(
        source, np.array([t for p in pieces for t in p], dtype=np.int32), np.concatenate([[0], np.cumsum(lens)[:-1]])
    )


def sentence_end_table(tokenizer: Tokenizer) -> np.ndarray:
    """bool per token id: the token's text ends a sentence or a line (``.``, ``!``, ``?``,
    newline, then optional spaces). One pass over the vocabulary instead of one decode per
    token of the corpus."""
    table = np.zeros(tokenizer.vocab_size, dtype=bool)
    end = re.compile(rb"[.!?\n]\s*$")
    for i in range(tokenizer.n_ranks):
        table[i] = end.search(tokenizer.token_bytes(i)) is not None
    return table


def corpus_haystack(tokenizer: Tokenizer, corpus) -> Haystack:
    """The packed corpus; sentence boundaries only inside document text (never in the
    delimiters), so every needle lands in a document and records its document and page."""
    packed = corpus.pack(tokenizer, progress=False)
    ids = packed.ids.astype(np.int32)
    inside = np.zeros(len(ids) + 1, dtype=bool)
    starts = []
    for span in packed.spans:
        if span.end > span.start:
            inside[span.start : span.end] = True
            starts.append(span.start)
    after_end = np.flatnonzero(sentence_end_table(tokenizer)[ids]) + 1
    bounds = np.union1d(after_end[inside[after_end]], np.array(starts, dtype=np.int64)).astype(np.int64)
    if len(bounds) == 0:
        raise ValueError("the corpus has no document text to hide needles in")
    return Haystack("corpus", ids, bounds, packed)
