"""The BPE trainer: ranks consistent with tiktoken, deterministic, small inputs."""

from __future__ import annotations

import pytest

from longctx.text.bpe import _train_bpe, train_bpe
from longctx.text.tokenizer import LLAMA4_PATTERN, Tokenizer, llama4_special_tokens

BYTE_RANKS = {bytes([i]): i for i in range(256)}

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.\n",
    "Tokenizers split text into pieces and merge frequent pairs of bytes.\n",
    "Numbers like 1234567 and 2024 are split into groups of three digits.\n",
    "    indented code:  x = foo(bar, baz)  # comment\n\n",
    "Ünïcödé wörds, 中文字符, and emoji 😀😀 are bytes too. It's, we're, they'll.\n",
] * 20


def test_trainer_ranks_are_consistent_with_tiktoken():
    vocab, segmentation = _train_bpe(CORPUS, 400, LLAMA4_PATTERN)
    ranks = train_bpe(CORPUS, 400)
    assert ranks == {b: i for i, b in enumerate(vocab)} and len(ranks) == 400
    assert all(ranks[bytes([i])] == i for i in range(256))
    t = Tokenizer.from_ranks(ranks, special_tokens=llama4_special_tokens(400, 32))
    # Every merged token is reachable: its own bytes encode to exactly it.
    assert all(t._enc._encode_single_piece(b) == [r] for b, r in ranks.items())
    # tiktoken reproduces the trainer's segmentation of every training piece...
    for piece, ids in segmentation.items():
        assert t.encode(piece) == ids, piece
    # ...so a training sentence is encoded with merged tokens, and round-trips.
    sentence = CORPUS[0]
    ids = t.encode(sentence)
    assert len(ids) < len(sentence.encode()) / 2.5 and max(ids) >= 256
    assert t.decode(ids) == sentence
    assert train_bpe(CORPUS, 400) == ranks  # deterministic


def test_trainer_small_inputs():
    assert train_bpe([], 300) == BYTE_RANKS  # nothing to merge: stops at the bytes
    r = train_bpe(["aaaa aaaa"], 400)
    assert r[b"aa"] == 256 and max(r.values()) == len(r) - 1
    with pytest.raises(ValueError):
        train_bpe(["x"], 100)
