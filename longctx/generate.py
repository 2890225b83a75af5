"""Prefill in chunks, decode one token at a time, sample, stop.

``decode`` is the one decode loop: ``generate`` and ``Session.ask`` both run it.

``prefill`` runs the prompt through the model ``chunk_size`` tokens at a time; because masks
come from absolute positions, the cache and the last logits equal those of one full forward,
while activations stay O(chunk_size) instead of O(prompt).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .cache import KVCache

if TYPE_CHECKING:
    from .model import Model


@torch.inference_mode()
def prefill(model: Model, tokens: torch.Tensor, cache: KVCache, chunk_size: int | None = 2048,
            progress: bool | None = None) -> torch.Tensor:
    """Feed tokens (B, T) into ``cache`` in pieces of ``chunk_size`` (None: all at once).

    Returns the last position's logits (B, V) in fp32. ``progress``: a tqdm bar in tokens
    (None: shown only for prompts longer than 8 chunks).
    """
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prefill needs tokens of shape (B, T) with T >= 1, got {tuple(tokens.shape)}")
    T = tokens.shape[1]
    step = T if chunk_size is None else int(chunk_size)
    if step < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    show = (T > 8 * step) if progress is None else progress
    logits = None
    with tqdm(total=T, unit="tok", desc="prefill", disable=not show, leave=False) as bar:
        for lo in range(0, T, step):
            piece = tokens[:, lo : lo + step].to(model.device)
            logits = model(piece, cache, last_only=True)
            bar.update(piece.shape[1])
    return logits[:, -1].float()


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
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
def decode(model: Model, cache: KVCache, logits: torch.Tensor, *, max_new_tokens: int, stop_ids,
           temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
           on_token: Callable[[int, list[int | None]], None] | None = None) -> Generation:
    """Decode from ``logits`` (B, V), the prediction after the last token in ``cache``.

    Each step samples one token per row (``sample``) and feeds the tokens back through the
    model. A row stops at its first token in ``stop_ids`` (not kept) or after
    ``max_new_tokens``; the loop ends when every row has stopped. ``on_token(step, new)`` runs
    after each step with, per row, the token kept at this step or None (the row has stopped).
    Returns the kept ids and ``decode_s`` (``prefill_s`` is 0: the caller's prefill is not
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
        if on_token is not None:
            on_token(step, new)
        if all(done) or step == max_new_tokens - 1:
            break  # no forward for a token nobody will read
        # NOTE: rows that have stopped still feed their (ignored) samples: a batch forward
        # needs one token per row, and their outputs are never read again.
        logits = model(nxt[:, None].to(model.device), cache)[:, -1].float()
    return Generation(out, stopped, 0.0, time.perf_counter() - t0)


@torch.inference_mode()
def generate(model: Model, prompt: torch.Tensor, *, max_new_tokens: int = 64, cache: KVCache | None = None,
             chunk_size: int | None = 2048, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids=None, generator: torch.Generator | None = None, progress: bool | None = None,
             on_token: Callable[[int, list[int | None]], None] | None = None) -> Generation:
    """Prefill ``prompt`` (B, T) into ``cache`` (a new one if None), then ``decode``.

    Rows stop at the first token in ``stop_ids`` (default: the config's eos ids) or after
    ``max_new_tokens``. Sampling uses ``generator`` so runs are reproducible; ``on_token`` as
    in ``decode``.
    """
    if cache is None:
        cache = model.new_cache(batch=prompt.shape[0])
    t0 = time.perf_counter()
    logits = prefill(model, prompt, cache, chunk_size, progress)
    prefill_s = time.perf_counter() - t0
    gen = decode(model, cache, logits, max_new_tokens=max_new_tokens,
                 stop_ids=model.config.stop_ids if stop_ids is None else stop_ids, temperature=temperature,
                 top_p=top_p, generator=generator, on_token=on_token)
    gen.prefill_s = prefill_s
    return gen
