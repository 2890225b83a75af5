"""A small byte-level BPE trainer: learns tiktoken rank tables for `Tokenizer.from_ranks`.

    ranks = train_bpe(texts, vocab_size=4096)          # {token bytes: rank}
    tok = Tokenizer.from_ranks(ranks)                  # Llama 4 special tokens after the ranks

Used to build the embedded tiny model's tokenizer (examples/train_tokenizer.py); the
tokenizer itself never needs it.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable

from .tokenizer import LLAMA4_PATTERN

__all__ = ["train_bpe"]


def train_bpe(texts: Iterable[str], vocab_size: int, *, pattern: str = LLAMA4_PATTERN) -> dict[bytes, int]:
    """Byte-level BPE: learn `vocab_size` ranks (256 single bytes + merges) from `texts`.

    Ranks 0..255 are the bytes 0..255, so every string is encodable. Texts are split with
    `pattern` (the same regex tiktoken uses) and identical pieces are counted first; merges are
    then learned on the counted pieces: repeatedly the most frequent adjacent pair (ties: the
    lowest ids) becomes a new token with the next rank, so every token's rank is above its parts'.
    That is the order tiktoken applies merges in (lowest rank first). Deterministic for
    deterministic input. Stops early if no pair is left. Returns {token bytes: rank}.
    """
    vocab, _ = _train_bpe(texts, vocab_size, pattern)
    return {tok: rank for rank, tok in enumerate(vocab)}


def _train_bpe(texts: Iterable[str], vocab_size: int, pattern: str) -> tuple[list[bytes], dict[str, list[int]]]:
    """`train_bpe`'s work: returns (token bytes by rank, {training piece: its final token ids})."""
    import regex  # tiktoken depends on `regex`; stdlib `re` has no \p{...} classes

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the single bytes), got {vocab_size}")
    split = regex.compile(pattern)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(split.findall(text))
    words = [list(w.encode("utf-8")) for w in counts]
    freqs = list(counts.values())

    vocab = [bytes([i]) for i in range(256)]  # id -> bytes; id == rank
    ids = {b: i for i, b in enumerate(vocab)}
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)  # may hold stale word indices
    for wi, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_count[p] += freqs[wi]
            pair_words[p].add(wi)
    # Max-heap with lazy deletion: an entry is live only if its count is still the pair's count.
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        negc, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -negc or negc == 0:
            continue
        merged = vocab[a] + vocab[b]
        new = ids.get(merged)
        if new is None:
            new = len(vocab)
            vocab.append(merged)
            ids[merged] = new
        # else: the bytes already are a token (built from another split): tiktoken would join
        # these two parts into it too, so merge into the existing id without a new rank.
        changed = set()
        for wi in sorted(pair_words.pop((a, b))):
            w, f = words[wi], freqs[wi]
            for p in zip(w, w[1:]):
                pair_count[p] -= f
                changed.add(p)
            nw, i = [], 0
            while i < len(w):  # left to right, like tiktoken on runs such as "aaa"
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    nw.append(new)
                    i += 2
                else:
                    nw.append(w[i])
                    i += 1
            for p in zip(nw, nw[1:]):
                pair_count[p] += f
                pair_words[p].add(wi)
                changed.add(p)
            words[wi] = nw
        pair_count.pop((a, b), None)
        for p in changed:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, *p))
            else:
                pair_count.pop(p, None)
    return vocab, dict(zip(counts, words))
