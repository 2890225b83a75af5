"""Llama-4-style tiktoken tokenizer: BPE rank files, special tokens, chat template, a small trainer.

The tokenizer is tiktoken's byte-level BPE driven by the Llama 4 pre-tokenizer regex
(`LLAMA4_PATTERN`, the o200k-style pattern). Token ids are

    0 .. n_ranks-1                      mergeable BPE ranks (one per line of the rank file)
    n_ranks .. n_ranks+n_special-1      special tokens (Llama 4: 2048 ids, 200000..202047)

so `vocab_size = n_ranks + n_special` (202048 for Scout). Plain text never produces special ids;
they enter a sequence only through `bos`/`eos` flags and `chat`.

File format (Llama 4's `tokenizer.model`): one line per rank, `base64(token_bytes) rank`.
A tokenizer whose special tokens are not the default Llama 4 layout (2048 ids right after the
ranks) is saved with a JSON sidecar next to the rank file (`tokenizer.model` -> `tokenizer.json`)
that lists them; the sidecar carries `"format": "longctx-tokenizer"` so a Hugging Face
`tokenizer.json` in the same folder is never mistaken for it (nor overwritten).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import heapq
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import tiktoken

__all__ = [
    "LLAMA4_PATTERN",
    "Tokenizer",
    "TokenizerError",
    "llama4_special_tokens",
    "load_default_tokenizer",
    "load_ranks",
    "save_ranks",
    "split_for_encoding",
    "train_bpe",
]

# Meta's O200K_PATTERN for Llama 4 (docs/scout_architecture.md §4.2). Numbers split into groups of
# at most three digits (\p{N}{1,3}); a leading space or punctuation mark attaches to the next word.
LLAMA4_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

SIDECAR_FORMAT = "longctx-tokenizer"
DEFAULT_NUM_RESERVED = 2048

# Names every tokenizer must define: the chat template and the stop set depend on them.
_REQUIRED_SPECIALS = {
    "bos_id": "<|begin_of_text|>",
    "eos_id": "<|end_of_text|>",
    "header_start_id": "<|header_start|>",
    "header_end_id": "<|header_end|>",
    "eom_id": "<|eom|>",
    "eot_id": "<|eot|>",
    "pad_id": "<|finetune_right_pad|>",
}


class TokenizerError(ValueError):
    """A tokenizer file, special-token table or chat message is invalid."""


# --------------------------------------------------------------------------------------------
# Special tokens
# --------------------------------------------------------------------------------------------


def _llama4_named_specials() -> list[str]:
    """The 1144 named Llama 4 special tokens, in id order (offsets 0..1143 after the ranks)."""

    def numbered(prefix: str, start: int, stop: int) -> list[str]:
        return [f"<|{prefix}_{i}|>" for i in range(start, stop)]

    text = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text += ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]  # +5..+9
    text += numbered("text_post_train_reserved_special_token", 0, 6)  # +10..+15
    text += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]  # +16..+18
    text += numbered("text_post_train_reserved_special_token", 8, 69)  # +19..+79
    vision = ["<|image_start|>", "<|image_end|>"]  # +80, +81
    vision += numbered("vision_reserved_special_token", 0, 2)
    vision += ["<|tile_x_separator|>", "<|tile_y_separator|>"]  # +84, +85
    vision += numbered("vision_reserved_special_token", 2, 6)
    vision += ["<|image|>"]  # +90
    vision += numbered("vision_reserved_special_token", 6, 7)
    vision += ["<|patch|>"]  # +92
    vision += numbered("vision_reserved_special_token", 7, 1048)  # +93..+1133
    reasoning = numbered("reasoning_reserved_special_token", 0, 8)  # +1134..+1141
    reasoning += ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]  # +1142, +1143
    names = text + vision + reasoning
    assert len(names) == 1144 and len(set(names)) == len(names)
    return names


def llama4_special_tokens(base: int, num_reserved: int = DEFAULT_NUM_RESERVED) -> dict[str, int]:
    """The Llama 4 special-token layout: `num_reserved` ids starting at `base` (= number of ranks).

    Offset k gets the k-th Llama 4 name (begin_of_text +0, end_of_text +1, header_start +5,
    header_end +6, eom +7, eot +8, python_start +16, python_end +17, finetune_right_pad +18, ...,
    vision +80..+1133, reasoning +1134..+1143), and offsets past the 1144 named ones are
    `<|reserved_special_token_{k-1144}|>`. With `base=200000, num_reserved=2048` this is exactly
    Scout's table; a smaller `num_reserved` (>= 19) keeps the same offsets, truncated.
    """
    named = _llama4_named_specials()
    if num_reserved < 19:
        raise TokenizerError(
            f"num_reserved_special_tokens={num_reserved} is too small: the Llama 4 layout needs at "
            "least 19 ids (offsets 0..18 hold begin_of_text .. finetune_right_pad)"
        )
    names = named[:num_reserved]
    names += [f"<|reserved_special_token_{i}|>" for i in range(num_reserved - len(names))]
    return {name: base + k for k, name in enumerate(names)}


# --------------------------------------------------------------------------------------------
# Rank files
# --------------------------------------------------------------------------------------------


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file (`base64(token_bytes) rank` per line) into {token bytes: rank}.

    Blank lines are skipped (as tiktoken does). Raises TokenizerError naming the file and the
    1-based line for a malformed line, a duplicate token or a duplicate rank, and naming the path
    for a missing file. Rank density (0..n-1) is checked by `Tokenizer.from_ranks`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
    ranks: dict[bytes, int] = {}
    seen_ranks: dict[int, int] = {}  # rank -> line number, to name both lines of a duplicate
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.decode("utf-8", errors="replace").split()
        where = f"{path}:{lineno}"
        if len(fields) != 2:
            raise TokenizerError(f"{where}: expected 'base64_token rank', got {line[:80].decode('utf-8', errors='replace')!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{where}: invalid base64 token {fields[0][:40]!r}") from None
        if not fields[1].isdigit():
            raise TokenizerError(f"{where}: rank must be a non-negative integer, got {fields[1][:40]!r}")
        rank = int(fields[1])
        if not token:
            raise TokenizerError(f"{where}: empty token")
        if token in ranks:
            raise TokenizerError(f"{where}: duplicate token {token!r} (also rank {ranks[token]})")
        if rank in seen_ranks:
            raise TokenizerError(f"{where}: duplicate rank {rank} (also on line {seen_ranks[rank]})")
        ranks[token] = rank
        seen_ranks[rank] = lineno
    if not ranks:
        raise TokenizerError(f"{path}: no ranks in tokenizer file")
    return ranks


def save_ranks(ranks: Mapping[bytes, int], path: str | os.PathLike) -> None:
    """Write {token bytes: rank} as a tiktoken BPE file, one `base64 rank` line per rank, in rank order."""
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("".join(lines), encoding="ascii")


def _sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_sidecar(path: Path) -> dict | None:
    """Our sidecar next to `path`, or None if absent or not ours (e.g. a Hugging Face tokenizer.json)."""
    side = _sidecar_path(path)
    if not _is_our_sidecar(side):
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        specials = {str(k): int(v) for k, v in meta["special_tokens"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TokenizerError(f"{side}: malformed tokenizer sidecar: {e}") from None
    return {"special_tokens": specials}


def _is_our_sidecar(side: Path) -> bool:
    # Peek at the head only: an HF tokenizer.json can be tens of MB and is never ours.
    try:
        with open(side, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return re.search(rb'"format"\s*:\s*"' + SIDECAR_FORMAT.encode() + rb'"', head) is not None


# --------------------------------------------------------------------------------------------
# Splitting very long inputs on boundaries that cannot change the tokenization
# --------------------------------------------------------------------------------------------

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
# position; so encode(a + b) == encode(a) + encode(b). tests/test_tokenizer.py checks this
# against one tiktoken call on adversarial strings with tiny chunk sizes.
_SAFE_CUT = re.compile(f"\n(?=[^{_WS}/])")


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
    for m in _long_hws_run(max(max_ws_run, 2)).finditer(text):  # >= 2 so that H[:-1] is not empty
        a, b = m.span()
        if b < len(text) and text[b] in "\r\n":
            continue  # `\s*[\r\n]+` matches H plus the newline without backtracking over H
        end = b if b == len(text) else b - 1
        _cut_on_newlines(text[start:a], chunk_chars, parts)
        parts.append(text[a:end].encode("utf-8"))
        start = end
    _cut_on_newlines(text[start:], chunk_chars, parts)
    return parts


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

_ROLES = ("system", "user", "assistant", "ipython")


class Tokenizer:
    """tiktoken BPE with the Llama 4 regex, special tokens and chat template.

    Attributes: `vocab_size` (ranks + specials; the max special id + 1 when explicit special ids
    leave gaps), `special_tokens` {name: id}, `bos_id`, `eos_id`, `eot_id`, `eom_id`, `pad_id`,
    `stop_ids` = {end_of_text, eom, eot}, `n_ranks`, `name`, `fingerprint`.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], name: str = "custom"):
        """Prefer `from_file` / `from_ranks`; this validates and builds the tiktoken encoding."""
        n = len(mergeable_ranks)
        if set(mergeable_ranks.values()) != set(range(n)):
            missing = min(set(range(n)) - set(mergeable_ranks.values()))
            raise TokenizerError(f"{name}: ranks must be 0..{n - 1} without gaps; rank {missing} is missing")
        missing_bytes = [i for i in range(256) if bytes([i]) not in mergeable_ranks]
        if missing_bytes:
            raise TokenizerError(
                f"{name}: every single byte must be a rank (byte-level BPE), missing {len(missing_bytes)}, "
                f"e.g. {bytes(missing_bytes[:5])!r}"
            )
        ids = list(special_tokens.values())
        if len(set(ids)) != len(ids):
            raise TokenizerError(f"{name}: special token ids are not distinct")
        if any(not isinstance(i, int) or i < n for i in ids):
            raise TokenizerError(f"{name}: special token ids must be integers >= {n} (the number of ranks)")
        missing = [s for s in _REQUIRED_SPECIALS.values() if s not in special_tokens]
        if missing:
            raise TokenizerError(
                f"{name}: special tokens missing {missing}; use llama4_special_tokens(base, n) for the Llama 4 layout"
            )

        self.name = name
        self.n_ranks = n
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self.vocab_size: int = max([n - 1, *ids]) + 1
        for attr, tok in _REQUIRED_SPECIALS.items():
            setattr(self, attr, self.special_tokens[tok])
        self.stop_ids: frozenset[int] = frozenset({self.eos_id, self.eom_id, self.eot_id})
        self._ranks = mergeable_ranks
        self._special_ids = frozenset(ids)
        self._enc = tiktoken.Encoding(
            name=name, pat_str=LLAMA4_PATTERN, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self._header_cache: dict[str, list[int]] = {}

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        special_tokens: dict[str, int] | None = None,
        num_reserved_special_tokens: int = DEFAULT_NUM_RESERVED,
    ) -> "Tokenizer":
        """Load a tiktoken BPE file (a folder means `folder/tokenizer.model`).

        Special tokens, first match wins: `special_tokens` if given; else our JSON sidecar next to
        the file if present; else the Llama 4 layout of `num_reserved_special_tokens` ids.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        ranks = load_ranks(path)
        if special_tokens is None:
            side = _read_sidecar(path)
            if side is not None:
                special_tokens = side["special_tokens"]
        return cls.from_ranks(
            ranks, special_tokens=special_tokens, num_reserved_special_tokens=num_reserved_special_tokens, name=path.name
        )

    @classmethod
    def from_ranks(
        cls,
        mergeable_ranks: dict[bytes, int],
        *,
        special_tokens: dict[str, int] | None = None,
        num_reserved_special_tokens: int = DEFAULT_NUM_RESERVED,
        name: str = "custom",
    ) -> "Tokenizer":
        """Build from {token bytes: rank}; special tokens explicit or the Llama 4 layout after the ranks."""
        if special_tokens is None:
            special_tokens = llama4_special_tokens(len(mergeable_ranks), num_reserved_special_tokens)
        return cls(dict(mergeable_ranks), dict(special_tokens), name=name)

    @classmethod
    def default(cls) -> "Tokenizer":
        """The embedded model's tokenizer (longctx/assets/default/tokenizer.model); cached."""
        return load_default_tokenizer()

    # ---- encoding -------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> token ids (a list of ints), with <|begin_of_text|> / <|end_of_text|> if asked.

        Special-token text such as "<|eot|>" inside `text` is encoded as ordinary text, never as a
        special id. Any length works: inputs are cut on boundaries that leave the result unchanged
        (see `split_for_encoding`), and multi-chunk inputs are encoded on several threads.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._encode_many([text])[0]
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], *, num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts (same rules as `encode`, no bos/eos) on `num_threads` threads."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects a list of str, got an item of type {type(t).__name__}")
        return self._encode_many(list(texts), num_threads)

    def _encode_many(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        plans = [split_for_encoding(t) for t in texts]
        strs = [p for plan in plans for p in plan if isinstance(p, str)]
        if len(strs) <= 1:
            encoded = [self._enc.encode_ordinary(s) for s in strs]
        else:
            # tiktoken releases the GIL while encoding, so threads give real parallelism.
            threads = num_threads or min(8, os.cpu_count() or 1)
            encoded = self._enc.encode_ordinary_batch(strs, num_threads=threads)
        it = iter(encoded)
        out = []
        for plan in plans:
            ids: list[int] = []
            for p in plan:
                ids.extend(next(it) if isinstance(p, str) else self._enc._encode_single_piece(p))
            out.append(ids)
        return out

    # ---- decoding -------------------------------------------------------------------------

    def decode(self, ids) -> str:
        """Token ids (any iterable of ints, or a tensor/array) -> text; special ids render as their
        names. Bytes that are not valid UTF-8 (a sequence cut inside a character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        """Token ids -> the raw bytes they stand for (special ids as their UTF-8 names)."""
        ids = self._as_id_list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            bad = next((i for i in ids if not self._is_valid_id(i)), None)
            raise TokenizerError(f"cannot decode token id {bad!r}: not in this vocabulary (size {self.vocab_size})") from None

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token id (a special id gives its name's bytes)."""
        if not self._is_valid_id(id):
            raise TokenizerError(f"token id {id!r} is not in this vocabulary (size {self.vocab_size})")
        return self._enc.decode_single_token_bytes(int(id))

    def _is_valid_id(self, i) -> bool:
        return isinstance(i, int) and (0 <= i < self.n_ranks or i in self._special_ids)

    @staticmethod
    def _as_id_list(ids) -> list[int]:
        if hasattr(ids, "tolist"):  # torch tensors, numpy arrays
            ids = ids.tolist()
        return [int(i) for i in ids]

    # ---- chat -----------------------------------------------------------------------------

    def chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Llama 4 instruct prompt as token ids, with exactly one <|begin_of_text|>:

            <|begin_of_text|>{turn}...[<|header_start|>assistant<|header_end|>\\n\\n]
            turn = <|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>   (or <|eom|>)

        Messages are {"role": system|user|assistant|ipython ("tool" is an alias of ipython),
        "content": str}, optionally "eom": True on an assistant turn that stopped at a tool call
        (Meta's end_of_message). Contents are encoded as plain text, so a message containing
        "<|eot|>" cannot inject a special token. As in Meta's reference, the role name, the
        "\\n\\n" and the content are encoded separately.
        """
        ids = [self.bos_id]
        for role, content, end in self._turns(messages):
            ids += self._header(role)
            ids += self.encode(content)
            ids.append(self.special_tokens[end])
        if add_generation_prompt:
            ids += self._header("assistant")
        return ids

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The text form of `chat` for display. NOTE: it is not an encoding input: re-encoding it
        gives the special tokens' names as plain text; use `chat` for token ids."""
        parts = ["<|begin_of_text|>"]
        for role, content, end in self._turns(messages):
            parts.append(f"<|header_start|>{role}<|header_end|>\n\n{content}{end}")
        if add_generation_prompt:
            parts.append("<|header_start|>assistant<|header_end|>\n\n")
        return "".join(parts)

    def header(self, role: str) -> list[int]:
        """Ids of <|header_start|>{role}<|header_end|>\n\n (the start of a chat turn)."""
        return self._header(role)

    def _header(self, role: str) -> list[int]:
        if role not in self._header_cache:
            self._header_cache[role] = [self.header_start_id, *self.encode(role), self.header_end_id, *self.encode("\n\n")]
        return list(self._header_cache[role])

    @staticmethod
    def _turns(messages) -> list[tuple[str, str, str]]:
        """Validate messages -> [(role, content, end-token name)]."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
            raise TokenizerError("chat expects a list of {'role': ..., 'content': ...} dicts")
        turns = []
        for k, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise TokenizerError(f"message {k}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
            extra = set(msg) - {"role", "content", "eom"}
            if extra:
                raise TokenizerError(f"message {k}: unsupported keys {sorted(extra)} (allowed: role, content, eom)")
            role = msg.get("role")
            role = "ipython" if role == "tool" else role
            if role not in _ROLES:
                raise TokenizerError(f"message {k}: role {msg.get('role')!r} is not one of {list(_ROLES)} (or 'tool')")
            content = msg.get("content")
            if not isinstance(content, str):
                raise TokenizerError(f"message {k}: content must be a str (text only), got {type(content).__name__}")
            eom = msg.get("eom", False)
            if eom and role != "assistant":
                raise TokenizerError(
                    f"message {k}: 'eom' applies to assistant turns that stop at a tool call; "
                    f"{role} turns end with <|eot|> in Llama 4"
                )
            turns.append((role, content, "<|eom|>" if eom else "<|eot|>"))
        return turns

    # ---- persistence and identity ---------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the rank file at `path` and, when the special tokens are not the default Llama 4
        layout, the JSON sidecar `path.with_suffix('.json')`. Refuses to overwrite a JSON file
        there that is not a longctx sidecar (e.g. a Hugging Face tokenizer.json)."""
        path = Path(path)
        side = _sidecar_path(path)
        needs_sidecar = self.special_tokens != llama4_special_tokens(self.n_ranks, DEFAULT_NUM_RESERVED)
        if side.exists() and not _is_our_sidecar(side) and needs_sidecar:
            raise TokenizerError(f"{side} exists and is not a longctx tokenizer sidecar; save the tokenizer elsewhere")
        save_ranks(self._ranks, path)
        if needs_sidecar:
            meta = {
                "format": SIDECAR_FORMAT,
                "version": 1,
                "n_ranks": self.n_ranks,
                "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1])),
            }
            side.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        elif _is_our_sidecar(side):
            side.unlink()  # a stale sidecar would override the default layout on reload

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 hex over the regex, every rank's bytes (in rank order) and every special (name, id)."""
        h = hashlib.sha256(b"longctx-tokenizer/1\0")
        h.update(LLAMA4_PATTERN.encode() + b"\0")
        for tok in sorted(self._ranks, key=self._ranks.__getitem__):
            h.update(len(tok).to_bytes(4, "little") + tok)
        for name, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
            h.update(f"\0{i}:{name}".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, ranks={self.n_ranks}, specials={len(self.special_tokens)}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=1)
def load_default_tokenizer() -> Tokenizer:
    """The embedded model's tokenizer, shipped in longctx/assets/default/ (loaded once)."""
    from importlib.resources import as_file, files

    res = files("longctx").joinpath("assets", "default", "tokenizer.model")
    with as_file(res) as path:
        return Tokenizer.from_file(path)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


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
