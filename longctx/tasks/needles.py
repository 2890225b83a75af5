"""Needles, keys, values and haystack text shared by training (the embedded model) and NIAH.

Two kinds of keys (``make_key(..., kind=)``):

* ``"vocab"``: two words of a fixed list of ~150 adjectives and ~180 nouns, joined by a hyphen
  ("amber-falcon"). A key belongs to one split by a hash of its text (about one in ten is
  ``"eval"``), so evaluation asks about unseen *combinations* of words that training saw.
* ``"open"``: keys a model cannot memorise, as a user would write them: 1-4 words of an open
  pool (every word of the haystack text and every alphabetic piece of the default tokenizer's
  vocabulary, ~5,000), as written or capitalised, joined by "-", " " or "_"; codes ("srv-04b");
  numbers; words with a number. Every *word* (maximal run of letters and digits, compared in
  lower case, ``key_words``) belongs to one split by a hash of it, and a key is made of words
  of its split only, so an ``"eval"`` key holds no word any ``"train"`` key ever holds.

The haystack is English prose from Python's own documentation (``pydoc_data.topics``, part
of the standard library), cut into sentences; it ships with every Python.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re

NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key}?"
QUESTION_MULTI = "What are the special magic numbers for {keys}?"
QUESTION_DOC = "Which document mentions the special magic number for {key}?"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_ADJECTIVES = """amber ancient autumn azure bitter black bold brave bright broken calm clever cold copper
coral crimson curious dark dawn deep desert distant dry dusty early eastern electric empty faint
fierce fiery frozen gentle giant gilded glass golden granite green grey hidden hollow humble icy
iron ivory jade large late lazy little lone loud lucky lunar marble meadow mellow misty modern
muddy narrow noble northern oaken old olive pale patient polar proud purple quiet rapid rare red
restless rising river rough round royal rusty sacred salty scarlet secret shadow sharp shining
silent silver simple sleepy slow small smooth snowy solar southern spring steady steel stone
stormy strong summer sunny swift tall tender thin thunder tidal tiny twilight velvet violet warm
western whispering wild windy winter wise wooden young""".split()
_NOUNS = """anchor apple arrow badger bamboo banner barrel basket beacon bear beetle bell bison
blossom boat bridge brook buffalo button cabin camel candle canyon castle cedar cellar cherry
cliff cloud clover comet compass coyote crane crater crow crystal dolphin dragon eagle ember
falcon feather fern ferry fiddle finch flame forest fountain fox garden garnet glacier goat
harbor hawk hazel heron hill horizon island jaguar jasmine kettle kite ladder lagoon lantern
lark lemon leopard lily lion lizard lotus maple marsh meadow mirror moon moth mountain needle
nest oak ocean orchard otter owl panda panther parrot pebble pepper pine planet pond poppy
quarry rabbit raven reef ridge robin rocket saddle salmon sparrow spruce squirrel star stream
summit swan thistle tiger timber toad tower trout tulip turtle valley violin walnut whale
willow wolf wren yak""".split()


# Words a key may not contain: the question templates find the key after " for" and join two
# keys with " and".
_TEMPLATE_WORDS = frozenset({"for", "and", "is"})


def key_split(key: str) -> str:
    """``"eval"`` for about 1 key in 10 (by SHA-256 of the key), else ``"train"``."""
    return "eval" if hashlib.sha256(key.encode()).digest()[0] % 10 == 0 else "train"


KEY_KINDS = ("vocab", "open")
_VOCAB_WORDS = frozenset(_ADJECTIVES + _NOUNS)


def word_split(word: str) -> str:
    """The split of one word of an open key: ``"eval"`` for about 1 word in 10 (by SHA-256 of
    the word in lower case), else ``"train"``. The words of the vocab keys are always
    ``"train"``: training that mixes both kinds uses them as keys."""
    if word.lower() in _VOCAB_WORDS:
        return "train"
    return "eval" if hashlib.sha256(b"word:" + word.lower().encode()).digest()[0] % 10 == 0 else "train"


def key_words(key: str) -> list[str]:
    """The words of a key, in lower case: its maximal runs of ASCII letters and digits
    ("Srv-04b ledger" -> ["srv", "04b", "ledger"])."""
    return [w.lower() for w in re.findall(r"[A-Za-z0-9]+", key)]


@functools.lru_cache(maxsize=1)
def open_words() -> dict[str, tuple[str, ...]]:
    """The open key pool by split, {"train": words, "eval": words}, each sorted: lower-case
    words of 3-14 letters from the haystack text and from the default tokenizer's vocabulary
    (whole words and word pieces such as "ackages": strings no key list holds)."""
    from ..text.tokenizer import Tokenizer

    tok = Tokenizer.default()
    words = {w.lower() for s in haystack_sentences() for w in re.findall(r"[A-Za-z]{3,14}", s)}
    words |= {
        p for p in (tok.decode([i]).strip().lower() for i in range(tok.vocab_size)) if re.fullmatch("[a-z]{3,14}", p)
    }
    words -= _TEMPLATE_WORDS
    pool: dict[str, list[str]] = {"train": [], "eval": []}
    for w in sorted(words):
        pool[word_split(w)].append(w)
    return {k: tuple(v) for k, v in pool.items()}


def _drawn(rng: random.Random, split: str, draw) -> str:
    """``draw(rng)`` again until the word it gives is of ``split`` and not a template word."""
    while True:
        w = draw(rng)
        if (split == "any" or word_split(w) == split) and w.lower() not in _TEMPLATE_WORDS:
            return w


def _open_key(rng: random.Random, split: str) -> str:
    """One open key of ``split`` (see the module docstring)."""
    pool = open_words()
    pool = pool["train"] + pool["eval"] if split == "any" else pool[split]

    def word(r: random.Random) -> str:
        w = r.choice(pool)
        case = r.random()
        return w.title() if case < 0.25 else w.upper() if case < 0.3 else w

    def number(r: random.Random) -> str:
        return str(r.randrange(10 ** r.randint(0, 3), 10 ** r.randint(4, 5)))

    def letters(r: random.Random) -> str:
        return "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 4)))

    def code_tail(r: random.Random) -> str:  # "04b", "7", "12a"
        return f"{r.randrange(10 ** r.randint(1, 2)):0{r.randint(1, 2)}d}" + r.choice(["", "", "a", "b", "x"])

    form = rng.random()
    if form < 0.6:  # 1-4 words
        n = rng.choice([1, 1, 2, 2, 2, 3, 4])
        sep = rng.choice(["-", "-", " ", "_"])
        return sep.join(_drawn(rng, split, word) for _ in range(n))
    if form < 0.8:  # a code
        return f"{_drawn(rng, split, letters)}-{_drawn(rng, split, code_tail)}"
    if form < 0.9:  # a number
        return _drawn(rng, split, number)
    return f"{_drawn(rng, split, word)} {_drawn(rng, split, number)}"  # a word and a number


def make_key(rng: random.Random, split: str = "eval", kind: str = "vocab") -> str:
    """A random key of ``kind`` ("vocab" or "open", see the module docstring) from ``split``
    ("train", "eval" or "any")."""
    if split not in ("train", "eval", "any"):
        raise ValueError(f"split must be 'train', 'eval' or 'any', got {split!r}")
    if kind == "open":
        return _open_key(rng, split)
    if kind != "vocab":
        raise ValueError(f"key kind must be one of {KEY_KINDS}, got {kind!r}")
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if split == "any" or key_split(key) == split:
            return key


def make_keys(rng: random.Random, n: int, split: str = "eval", kind: str = "vocab") -> list[str]:
    """n distinct keys (distinct in lower case) of ``kind`` from ``split``."""
    keys: list[str] = []
    while len(keys) < n:
        k = make_key(rng, split, kind)
        if k.lower() not in (x.lower() for x in keys):
            keys.append(k)
    return keys


def make_value(rng: random.Random) -> str:
    """A 7-digit number as text (no leading zero)."""
    return str(rng.randrange(1_000_000, 10_000_000))


@functools.lru_cache(maxsize=1)
def haystack_sentences() -> tuple[str, ...]:
    """English sentences from the Python documentation shipped with Python (a few thousand)."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics)))
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        letters = sum(c.isalpha() or c == " " for c in s)
        # Prose only: no grammar rules, code or tables, and no sentence that could be a needle.
        if 30 <= len(s) <= 300 and letters >= 0.9 * len(s) and s[0].isupper() and "magic number" not in s:
            out.append(s)
    return tuple(out)


@functools.lru_cache(maxsize=8)
def encoded_sentences(tokenizer, source: str = "english") -> tuple[tuple[int, ...], ...]:
    """Haystack sentences, each encoded with a leading space (so they join like prose).
    source: "english" (``haystack_sentences``) or "noise" (the five sentences of ``NOISE``)."""
    sents = haystack_sentences() if source == "english" else tuple(re.split(r"(?<=\.) ", NOISE))
    return tuple(tuple(tokenizer.encode(" " + s)) for s in sents)
