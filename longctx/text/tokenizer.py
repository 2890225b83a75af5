"""Llama-4-style tiktoken tokenizer: encoding to lists or int32 arrays, decoding, chat template.

The tokenizer is tiktoken's byte-level BPE driven by the Llama 4 pre-tokenizer regex
(`LLAMA4_PATTERN`, the o200k-style pattern). Token ids are

    0 .. n_ranks-1                      mergeable BPE ranks (one per line of the rank file)
    n_ranks .. n_ranks+n_special-1      special tokens (Llama 4: 2048 ids, 200000..202047)

so `vocab_size = n_ranks + n_special` (202048 for Scout). Plain text never produces special ids;
they enter a sequence only through `bos`/`eos` flags and `chat`.

Inputs of any length are cut on boundaries that cannot change the ids (`split_for_encoding`)
and encoded on a thread pool; `Tokenizer.encode_arrays` yields int32 arrays, for callers that
tokenize whole corpora. The rank file and sidecar formats live in `longctx.text.vocab`, the
BPE trainer in `longctx.text.bpe`.
"""

from __future__ import annotations

import array
import functools
import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken

from .split import split_for_encoding
from .vocab import DEFAULT_NUM_RESERVED, TokenizerError, llama4_special_tokens, load_ranks, read_sidecar, save_files

__all__ = [
    "LLAMA4_PATTERN",
    "Tokenizer",
    "TokenizerError",
    "llama4_special_tokens",
    "load_default_tokenizer",
    "load_ranks",
    "split_for_encoding",
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

_ROLES = ("system", "user", "assistant", "ipython")
# Work per thread-pool job of `encode_arrays`: big enough that the pool's per-job cost is
# noise, small enough to balance the threads.
_JOB_CHARS = 1 << 16
# Texts up to this length are encoded once per `encode_arrays` call however often they occur.
_SHORT_TEXT = 256
_HAS_ENCODE_TO_NUMPY = hasattr(tiktoken.Encoding, "encode_to_numpy")  # tiktoken >= 0.8
_DEFAULT_THREADS = min(8, os.cpu_count() or 1)  # read once: os.cpu_count() is not free per call


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
    ) -> Tokenizer:
        """Load a tiktoken BPE file (a folder means `folder/tokenizer.model`).

        Special tokens, first match wins: `special_tokens` if given; else our JSON sidecar next to
        the file if present; else the Llama 4 layout of `num_reserved_special_tokens` ids.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        ranks = load_ranks(path)
        if special_tokens is None:
            special_tokens = read_sidecar(path)
        return cls.from_ranks(
            ranks,
            special_tokens=special_tokens,
            num_reserved_special_tokens=num_reserved_special_tokens,
            name=path.name,
        )

    @classmethod
    def from_ranks(
        cls,
        mergeable_ranks: dict[bytes, int],
        *,
        special_tokens: dict[str, int] | None = None,
        num_reserved_special_tokens: int = DEFAULT_NUM_RESERVED,
        name: str = "custom",
    ) -> Tokenizer:
        """Build from {token bytes: rank}; special tokens explicit or the Llama 4 layout after the ranks."""
        if special_tokens is None:
            special_tokens = llama4_special_tokens(len(mergeable_ranks), num_reserved_special_tokens)
        return cls(dict(mergeable_ranks), dict(special_tokens), name=name)

    @classmethod
    def default(cls) -> Tokenizer:
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
        (arr,) = self.encode_arrays([text])
        ids = arr.tolist()
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], *, num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts (same rules as `encode`, no bos/eos) on `num_threads` threads."""
        return [arr.tolist() for arr in self.encode_arrays(texts, num_threads=num_threads)]

    def encode_arrays(self, texts: Sequence[str], *, num_threads: int | None = None) -> Iterator[np.ndarray]:
        """Yield the ids of each of `texts` as an int32 array (n_tokens,), in order; each equals
        `encode(text)` (no bos/eos). The texts are checked now, encoded as the iterator is read.

        Why arrays: millions of ids as Python ints cost about as much to build and free as a
        third of the encoding itself, GIL-bound work that no thread can share; tiktoken's
        `encode_to_numpy` fills a buffer with the GIL released. The texts are cut by
        `split_for_encoding` into jobs of about `_JOB_CHARS` characters (short texts share a
        job) that run on `num_threads` threads (default: min(8, cores)), at most a few jobs per
        thread ahead of the reader, so the memory in flight stays small and closing the iterator
        early stops the work. A short text repeated (the same footer after every document) is
        encoded once.
        """
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode expects str texts, got an item of type {type(t).__name__}")
        return self._arrays(texts, max(1, num_threads or _DEFAULT_THREADS))

    def _arrays(self, texts: list[str], threads: int) -> Iterator[np.ndarray]:
        counts: list[int] = []  # parts of text k; 0: it repeats the short text texts[first[text]]
        first: dict[str, int] = {}
        jobs: deque[list[str | bytes]] = deque()
        job, size = [], 0
        for k, text in enumerate(texts):
            if len(text) <= _SHORT_TEXT and first.setdefault(text, k) != k:
                counts.append(0)
                continue
            parts = split_for_encoding(text)
            counts.append(len(parts))
            for p in parts:
                job.append(p)
                size += len(p)
                if size >= _JOB_CHARS:
                    jobs.append(job)
                    job, size = [], 0
        if job:
            jobs.append(job)

        def run(job: list[str | bytes]) -> list[np.ndarray]:
            return [self._encode_part(p) for p in job]

        pool = ThreadPoolExecutor(threads) if threads > 1 and len(jobs) > 1 else None

        def part_arrays() -> Iterator[np.ndarray]:
            window: deque = deque()
            while jobs or window:
                while pool is not None and jobs and len(window) < 4 * threads:
                    window.append(pool.submit(run, jobs.popleft()))
                yield from window.popleft().result() if window else run(jobs.popleft())

        stream = part_arrays()
        done: dict[int, np.ndarray] = {}  # ids of the short texts, by first occurrence
        try:
            for k, n in enumerate(counts):
                if n == 0:
                    yield done[first[texts[k]]]
                    continue
                got = [next(stream) for _ in range(n)]
                ids = got[0] if n == 1 else np.concatenate(got)
                if len(texts[k]) <= _SHORT_TEXT:
                    done[k] = ids
                yield ids
        finally:
            stream.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _encode_part(self, part: str | bytes) -> np.ndarray:
        """One part of `split_for_encoding` -> its ids as an int32 array."""
        if isinstance(part, bytes):  # a single regex piece: BPE only
            return _as_int32(self._enc._encode_single_piece(part))
        if _HAS_ENCODE_TO_NUMPY:
            # disallowed_special=(): special-token text is plain text, as in encode_ordinary.
            return self._enc.encode_to_numpy(part, disallowed_special=()).view(np.int32)
        return _as_int32(self._enc.encode_ordinary(part))

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
            raise TokenizerError(
                f"cannot decode token id {bad!r}: not in this vocabulary (size {self.vocab_size})"
            ) from None

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
            self._header_cache[role] = [
                self.header_start_id,
                *self.encode(role),
                self.header_end_id,
                *self.encode("\n\n"),
            ]
        return list(self._header_cache[role])

    @staticmethod
    def _turns(messages) -> list[tuple[str, str, str]]:
        """Validate messages -> [(role, content, end-token name)]."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
            raise TokenizerError("chat expects a list of {'role': ..., 'content': ...} dicts")
        turns = []
        for k, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise TokenizerError(
                    f"message {k}: expected a dict with 'role' and 'content', got {type(msg).__name__}"
                )
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
        save_files(Path(path), self._ranks, self.special_tokens)

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
        return (
            f"Tokenizer({self.name!r}, ranks={self.n_ranks}, specials={len(self.special_tokens)}, "
            f"vocab_size={self.vocab_size})"
        )


@functools.lru_cache(maxsize=1)
def load_default_tokenizer() -> Tokenizer:
    """The embedded model's tokenizer, shipped in longctx/assets/default/ (loaded once)."""
    from importlib.resources import as_file, files

    res = files("longctx").joinpath("assets", "default", "tokenizer.model")
    with as_file(res) as path:
        return Tokenizer.from_file(path)


def _as_int32(ids: list[int]) -> np.ndarray:
    """list of token ids -> int32 array (n,). NOTE: array("I", list) converts Python ints
    about 3x faster than np.array(list, np.int32); ids are < 2**31, so the unsigned 32-bit
    buffer reads the same as int32."""
    return np.frombuffer(array.array(_U32, ids), dtype=np.int32)


_U32 = next(code for code in "IL" if array.array(code).itemsize == 4)  # "I" on every common platform
