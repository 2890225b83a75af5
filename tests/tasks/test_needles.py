"""Needle keys: vocab keys as they were, open keys split by word, deterministic per seed."""

from __future__ import annotations

import random
import re

import pytest

from longctx.tasks import needles


def _draw(split: str, seeds: range, n: int) -> list[str]:
    return [k for s in seeds for k in needles.make_keys(random.Random(s), n, split, "open")]


def test_open_keys_are_split_by_word():
    """No word of an eval-split open key is a word of any train-split key (open or vocab), over
    thousands of draws; every word of a key belongs to its key's split."""
    train, held_out = _draw("train", range(40), 50), _draw("eval", range(100, 140), 50)
    train_words = {w for k in train for w in needles.key_words(k)}
    eval_words = {w for k in held_out for w in needles.key_words(k)}
    vocab_words = {
        w for s in range(40) for k in needles.make_keys(random.Random(s), 50, "train") for w in re.split("-", k)
    }
    assert len(train_words) > 1000 and len(eval_words) > 200  # an open pool, not a short list
    assert not train_words & eval_words
    assert not vocab_words & eval_words  # training that mixes in vocab keys leaks nothing either
    assert {needles.word_split(w) for w in train_words} == {"train"}
    assert {needles.word_split(w) for w in eval_words} == {"eval"}
    pool = needles.open_words()
    assert not set(pool["train"]) & set(pool["eval"])
    assert 0.05 < len(pool["eval"]) / (len(pool["train"]) + len(pool["eval"])) < 0.15


def test_open_keys_are_deterministic_per_seed_and_varied(tok):
    """Same seed, same keys; another seed, other keys. The keys are of every promised form:
    1-4 words, capitalised words, codes like "srv-04b", numbers, keys of several tokens; and no
    key holds a word the question templates use to find it ("for", "and")."""
    a = needles.make_keys(random.Random(7), 300, "eval", "open")
    assert a == needles.make_keys(random.Random(7), 300, "eval", "open")
    assert a != needles.make_keys(random.Random(8), 300, "eval", "open")
    assert len({k.lower() for k in a}) == len(a)  # distinct
    n_words = {len(needles.key_words(k)) for k in a}
    assert {1, 2, 3, 4} <= n_words
    assert any(re.fullmatch(r"[a-z]{2,4}-\d{1,2}[abx]?", k) for k in a)  # codes
    assert any(k.isdigit() for k in a)  # numbers
    assert any(k[0].isupper() for k in a)  # capitalised names
    assert any(len(tok.encode(" " + k)) >= 4 for k in a)  # multi-token pieces
    assert not any({"for", "and", "is"} & set(needles.key_words(k)) for k in a)


def test_vocab_keys_are_the_default_and_unchanged():
    """``kind="vocab"`` is the default and draws the same keys as before open keys existed (the
    records of the shipped model and the NIAH cell hashes depend on it)."""
    rng_a, rng_b = random.Random(3), random.Random(3)
    keys = needles.make_keys(rng_a, 20)
    assert keys == needles.make_keys(rng_b, 20, "eval", "vocab")
    for k in keys:
        adj, noun = k.split("-")
        assert adj in needles._ADJECTIVES and noun in needles._NOUNS and needles.key_split(k) == "eval"
    # The draw before open keys: adjective, noun, rejection by the key's hash.
    rng = random.Random(3)
    old = []
    while len(old) < 20:
        k = f"{rng.choice(needles._ADJECTIVES)}-{rng.choice(needles._NOUNS)}"
        if needles.key_split(k) == "eval" and k not in old:
            old.append(k)
    assert keys == old


def test_bad_key_kind_or_split_is_refused():
    with pytest.raises(ValueError, match="key kind"):
        needles.make_key(random.Random(0), "eval", "words")
    with pytest.raises(ValueError, match="split"):
        needles.make_key(random.Random(0), "test", "open")
