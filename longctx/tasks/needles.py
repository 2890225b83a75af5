"""Needles, keys, values and haystack text shared by training (the embedded model) and NIAH.

Keys are two words joined by a hyphen ("amber-falcon"). Every key belongs to one split by a
hash of its text: about one key in ten is ``"eval"`` and is never produced for ``"train"``,
so evaluation asks about keys the embedded model never saw in training.

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


def key_split(key: str) -> str:
    """``"eval"`` for about 1 key in 10 (by SHA-256 of the key), else ``"train"``."""
    return "eval" if hashlib.sha256(key.encode()).digest()[0] % 10 == 0 else "train"


def make_key(rng: random.Random, split: str = "eval") -> str:
    """A random two-word key from ``split`` ("train", "eval" or "any")."""
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if split == "any" or key_split(key) == split:
            return key


def make_keys(rng: random.Random, n: int, split: str = "eval") -> list[str]:
    """n distinct keys."""
    keys: list[str] = []
    while len(keys) < n:
        k = make_key(rng, split)
        if k not in keys:
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
