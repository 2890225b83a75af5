"""Splitting very long inputs on boundaries that cannot change the tokenization, so tiktoken
can encode them in pieces (on several threads) and never meets a whitespace run its regex
engine cannot handle. ``encode(a + b) == encode(a) + encode(b)`` at every cut made here."""

from __future__ import annotations

import functools
import re

# Exactly the characters of the regex's \s (Unicode White_Space), spelled out because Python's
# str.isspace() also accepts U+001C..U+001F, which the tiktoken regex does not.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_HWS = "\t\x0b\x0c \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # \s minus [\r\n]

# NOTE: tiktoken's regex engine gives up (a Rust panic, "StackOverflow") when one match attempt
# backtracks over ~1e6 characters. That happens for a run of ~1e6 non-newline whitespace
# characters that ends in a non-space or follows a newline (`\s*[\r\n]+` and `\s+(?!\S)` each
# backtrack over the whole run). Runs longer than this are handled without the regex (below).
MAX_WS_RUN = 65_536
# Inputs longer than this are cut on safe newlines into pieces of about this size, which
# tiktoken then encodes on several threads.
CHUNK_CHARS = 65_536

# A safe cut: right after "\n" when the next character is neither whitespace nor "/". The
# regex piece that contains the "\n" always ends there (no alternative lets whitespace or a
# newline continue into a non-space, except `[\r\n/]*` after punctuation, hence "/"), the
# pattern has no look-behind, and its only look-ahead (`(?!\S)`) is never consulted at that
# position; so encode(a + b) == encode(a) + encode(b). tests/text/test_tokenizer.py checks this
# against one tiktoken call on adversarial strings with tiny chunk sizes.
_SAFE_CUT = re.compile(f"\n(?=[^{_WS}/])")
_NON_SPACE = re.compile(r"\S")  # Python's \s includes every character of _HWS


@functools.lru_cache(maxsize=8)
def _long_hws_run(n: int) -> re.Pattern:
    return re.compile(f"[{_HWS}]{{{n},}}")


def split_for_encoding(text: str, chunk_chars: int = CHUNK_CHARS, max_ws_run: int = MAX_WS_RUN) -> list[str | bytes]:
    """Cut `text` into parts whose encodings concatenate to the encoding of `text`.

    A `str` part is encoded with the regex (tiktoken's `encode_ordinary`); a `bytes` part is one
    regex piece, BPE-encoded directly. `"".join(decoded parts) == text`.

    Long runs of non-newline whitespace H = text[a:b] (len >= max_ws_run, not followed by
    \\r or \\n) are the only thing taken out of the regex. What the regex does with H is fixed:
    H starts a new piece (no earlier piece can absorb a space), so text[:a] stands alone; if H
    ends the text it is one piece (`\\s+(?!\\S)` matches all of it); otherwise `\\s+(?!\\S)`
    matches H[:-1] and the last character starts the next piece, so text[b-1:] stands alone.
    """
    parts: list[str | bytes] = []
    start = 0
    n = max(max_ws_run, 2)  # >= 2 so that H[:-1] is not empty
    for m in _long_hws_run(n).finditer(text) if may_hold_long_space_run(text, n) else ():
        a, b = m.span()
        if b < len(text) and text[b] in "\r\n":
            continue  # `\s*[\r\n]+` matches H plus the newline without backtracking over H
        end = b if b == len(text) else b - 1
        _cut_on_newlines(text[start:a], chunk_chars, parts)
        parts.append(text[a:end].encode("utf-8"))
        start = end
    _cut_on_newlines(text[start:], chunk_chars, parts)
    return parts


def may_hold_long_space_run(text: str, n: int = MAX_WS_RUN) -> bool:
    """False only if `text` has no run of `n` or more whitespace characters.

    Why: looking for such runs with `_long_hws_run` tries a match at every character, while a
    run of 2B-1 or more characters covers a whole aligned block of B = (n + 1) // 2 characters,
    so finding a non-space in every block rules runs of n out with one short search per block.
    """
    if len(text) < n:
        return False
    block = (n + 1) // 2
    return any(_NON_SPACE.search(text, a, a + block) is None for a in range(0, len(text) - block + 1, block))


def _cut_on_newlines(text: str, chunk_chars: int, out: list[str | bytes]) -> None:
    """Append `text` to `out` in pieces of >= chunk_chars characters, cut only at `_SAFE_CUT`."""
    pos = 0
    while len(text) - pos > chunk_chars:
        m = _SAFE_CUT.search(text, pos + chunk_chars - 1)
        if m is None:
            break
        out.append(text[pos : m.end()])
        pos = m.end()
    if pos < len(text) or not out:
        out.append(text[pos:])


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
