"""Prefill in chunks, decode one token at a time, sample, stop.

``decode_steps`` is the one decode loop (a generator, one step per ``next``); ``decode`` runs
it to the end with a per-step callback, and ``generate`` and ``Session.ask`` build on those.
``TextStream`` turns the decoded ids into text pieces as they come (streamed answers).

``prefill`` runs the prompt through the model ``chunk_size`` tokens at a time; because masks
come from absolute positions, the cache and the last logits equal those of one full forward,
while activations stay O(chunk_size) instead of O(prompt).
"""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .cache import KVCache

if TYPE_CHECKING:
    from .model import Model

# ``default_threads``: models with fewer parameters than this decode on one CPU thread.
SMALL_MODEL_PARAMETERS = 50_000_000


def default_threads(model: Model | None) -> int | None:
    """CPU threads for torch when the user names none (``--threads auto``): 1 for a model on
    the CPU with fewer than ``SMALL_MODEL_PARAMETERS`` parameters (the embedded default has
    2.8 M), None (leave torch's default, one thread per core) otherwise, on a GPU, or when
    ``OMP_NUM_THREADS`` is set (the user chose).

    Why: a small model's matmuls are a few hundred KB each, shorter than the cost of waking
    and joining a thread team; on a machine whose cores are shared with other work, every
    parallel region also waits for its slowest, descheduled thread, which makes decoding
    several times slower with more threads, never faster. A big model's matmuls do divide
    over cores, so it keeps torch's default.
    """
    if model is None or "OMP_NUM_THREADS" in os.environ or model.device.type != "cpu":
        return None
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS else None


def check_int(name: str, value, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``; else TypeError (not an int; bools refused)
    or ValueError, naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_sampling(temperature, top_p) -> None:
    """TypeError / ValueError naming ``temperature`` (a number >= 0) or ``top_p`` (in (0, 1])."""
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def as_prompt(prompt) -> torch.Tensor:
    """Token ids as a (B, T) int64 tensor: a (B, T) or (T,) tensor or array, a list of ints
    (one row) or a list of equal-length lists. TypeError / ValueError naming ``prompt``."""
    if isinstance(prompt, (list, tuple)):
        rows = [prompt] if all(isinstance(t, int) for t in prompt) else prompt
        if not all(
            isinstance(r, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in r)
            for r in rows
        ):
            raise TypeError("prompt must be token ids: a list of ints, a list of lists of ints or a tensor")
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"prompt rows must have one length, got {sorted({len(r) for r in rows})}")
        prompt = torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)
    elif not isinstance(prompt, torch.Tensor):
        if not hasattr(prompt, "__array__"):
            raise TypeError(f"prompt must be token ids (a tensor or a list of ints), got {type(prompt).__name__}")
        prompt = torch.as_tensor(prompt)
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must have shape (B, T) or (T,) with T >= 1, got {tuple(prompt.shape)}")
    if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
        raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    return prompt.long()


@torch.inference_mode()
def prefill(
    model: Model, tokens: torch.Tensor, cache: KVCache, chunk_size: int | None = 2048, progress: bool | None = None
) -> torch.Tensor:
    """Feed tokens (B, T) into ``cache`` in pieces of ``chunk_size`` (None: all at once).

    Returns the last position's logits (B, V) in fp32. Into an empty context-parallel cache
    the whole prompt is one forward, one shard per rank. ``progress``: a tqdm bar in tokens
    (None: shown only for prompts longer than 8 chunks). Before any work, ``cache.check_room``
    refuses (``CacheError``) a prompt whose global-layer KV (at the model's dtype) would not fit
    the cache's budgets and its disk tier's free space.
    """
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prefill needs tokens of shape (B, T) with T >= 1, got {tuple(tokens.shape)}")
    T = tokens.shape[1]
    step = T if chunk_size is None else int(chunk_size)
    if step < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if cache.context_parallel is not None and cache.length == 0:
        step = T  # one forward, cut into one shard per rank (``longctx.distributed``)
    per_token = model.config.kv_bytes_per_token(torch.empty(0, dtype=model.dtype).element_size())["global"]
    if cache.context_parallel is None:
        cache.check_room(T, per_token)
    else:  # each rank stores its part; every rank learns if one has no room
        cache.context_parallel.check_room(cache, T, per_token)
    show = (T > 8 * step) if progress is None else progress
    logits = None
    with tqdm(total=T, unit="tok", desc="prefill", disable=not show, leave=False) as bar:
        for lo in range(0, T, step):
            piece = tokens[:, lo : lo + step].to(model.device)
            logits = model(piece, cache, last_only=True)
            bar.update(piece.shape[1])
    return logits[:, -1].float()


def sample(
    logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token per row from logits (B, V): greedy at temperature 0, else softmax(logits/T)
    restricted to the smallest set of tokens whose probability reaches ``top_p``."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    """Generated ids per row (stop token excluded), why each row stopped, and timings (s)."""

    tokens: list[list[int]]
    stopped: list[str] = field(default_factory=list)  # "stop" | "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0


@torch.inference_mode()
def decode_steps(
    model: Model,
    cache: KVCache,
    logits: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Generator[list[int | None], None, Generation]:
    """The decode loop, one step per ``next``: from ``logits`` (B, V), the prediction after the
    last token in ``cache``, each step samples one token per row (``sample``), yields per row
    the token kept at this step or None (the row has stopped), and feeds the tokens back
    through the model. A row stops at its first token in ``stop_ids`` (not kept) or after
    ``max_new_tokens``; the loop ends when every row has stopped. Returns (as the generator's
    value) the kept ids and ``decode_s`` (``prefill_s`` is 0: the caller's prefill is not
    counted here). ``cache`` ends up holding every fed token, i.e. all kept tokens but the last.
    """
    t0 = time.perf_counter()
    stops = set(stop_ids)
    B = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stopped = ["length"] * B
    for step in range(max_new_tokens):
        nxt = sample(logits, temperature=temperature, top_p=top_p, generator=generator)
        new: list[int | None] = [None] * B
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if t in stops:
                done[b], stopped[b] = True, "stop"
            else:
                out[b].append(t)
                new[b] = t
        yield new
        if all(done) or step == max_new_tokens - 1:
            break  # no forward for a token nobody will read
        # NOTE: rows that have stopped still feed their (ignored) samples: a batch forward
        # needs one token per row, and their outputs are never read again.
        logits = model(nxt[:, None].to(model.device), cache)[:, -1].float()
    return Generation(out, stopped, 0.0, time.perf_counter() - t0)


def decode(
    model: Model,
    cache: KVCache,
    logits: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, list[int | None]], None] | None = None,
) -> Generation:
    """``decode_steps`` run to the end; ``on_token(step, new)`` runs after each step with, per
    row, the token kept at this step or None (the row has stopped)."""
    steps = decode_steps(
        model,
        cache,
        logits,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
    )
    step = 0
    while True:
        try:
            new = next(steps)
        except StopIteration as end:
            return end.value
        if on_token is not None:
            on_token(step, new)
        step += 1


class TextStream:
    """Token ids in, text out, piece by piece, for showing an answer as it is decoded.

    ``push(id)`` returns the text that id completes and ``close()`` the rest; joined, the pieces
    equal ``text.strip()`` for ``text = bytes(token_bytes of every id).decode("utf-8",
    errors="replace")`` (what ``Tokenizer.decode(ids).strip()`` gives). UTF-8 is decoded
    incrementally, so a character whose bytes span two tokens comes out whole, once its last
    byte arrives; leading whitespace is dropped, trailing whitespace held back until text
    follows it.
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self.token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # a non-space character has been emitted
        self._held = ""  # trailing whitespace not emitted yet

    def push(self, token_id: int) -> str:
        return self._emit(self._utf8.decode(self.token_bytes(token_id)))

    def close(self) -> str:
        """The rest: an unfinished character becomes U+FFFD, as a one-shot decode gives it."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]
        return body


@torch.inference_mode()
def generate(
    model: Model,
    prompt,
    *,
    max_new_tokens: int = 64,
    cache: KVCache | None = None,
    chunk_size: int | None = 2048,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids=None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    on_token: Callable[[int, list[int | None]], None] | None = None,
) -> Generation:
    """Prefill ``prompt`` into ``cache`` (a new one if None), then ``decode``.

    prompt: token ids (B, T) or one row (T,): a tensor, an array, a list of ints or a list of
    lists (``as_prompt``). Rows stop at the first token in ``stop_ids`` (default: the config's
    eos ids) or after ``max_new_tokens``. Sampling uses ``generator`` so runs are
    reproducible; ``on_token`` as in ``decode``. Arguments are checked before any prefill:
    ValueError if cache + prompt + ``max_new_tokens`` pass ``config.max_position_embeddings``.
    """
    prompt = as_prompt(prompt)
    check_int("max_new_tokens", max_new_tokens, 0)
    check_sampling(temperature, top_p)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    start = 0 if cache is None else cache.length
    limit = model.config.max_position_embeddings
    if start + prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt.shape[1]} tokens + max_new_tokens {max_new_tokens}"
            + (f" after {start} cached tokens" if start else "")
            + f" need {start + prompt.shape[1] + max_new_tokens} positions; the model's "
            f"max_position_embeddings is {limit}"
        )
    if cache is None:
        cache = model.new_cache(batch=prompt.shape[0])
    t0 = time.perf_counter()
    logits = prefill(model, prompt, cache, chunk_size, progress)
    prefill_s = time.perf_counter() - t0
    gen = decode(
        model,
        cache,
        logits,
        max_new_tokens=max_new_tokens,
        stop_ids=model.config.stop_ids if stop_ids is None else stop_ids,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
        on_token=on_token,
    )
    gen.prefill_s = prefill_s
    return gen
