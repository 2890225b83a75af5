"""Query-aware sparse decode over the global layers' KV (Quest-style page summaries).

Keys of a global layer are cut into pages of ``page_tokens`` consecutive positions (page i
holds positions [i·P, (i+1)·P), whatever segment or tier they live in; a page may straddle two
segments). For each page and KV head, ``PageIndex`` keeps the element-wise min and max of its
keys, updated as keys are appended (prefill builds them from the keys it already has in hand:
no second pass over the KV), always on the device.

At a decode step (one query token) each KV head scores every page by the upper bound of q·k
over the page's keys, sum_d max(q_d·kmin_d, q_d·kmax_d) (Quest), taking the max over the query
heads of its GQA group; it keeps the ``top_pages`` best plus the first ``sink_pages`` and the
last ``recent_pages`` (the page of the current token always). Only the selected pages' rows are
read from their tiers (``gather``), and attention runs exactly over them. With ``top_pages`` at
least the number of pages every key is read, and the result equals exact attention to fp32
rounding (the keys are merged in another order).

Citations under sparse decode: the attention mass of the pages read, unread keys counted as
zero (``record``). ``read_share(cache)`` says how much of the global-layer KV the decode steps
read since ``reset_reads``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .kernels import decode_attention
from .kernels.sparse import page_scores
from .offload import TIERS, CacheError

if TYPE_CHECKING:
    from .cache import GlobalCache, KVCache
    from .storage import Manifest


@dataclass(frozen=True)
class SparseDecode:
    """Sparse decode settings. top_pages: pages chosen by score per KV head and step, besides
    sink_pages (the first pages) and recent_pages (the last; >= 1: the current token's page);
    page_tokens: positions per page (the unit of selection and of reads)."""

    top_pages: int
    page_tokens: int = 64
    sink_pages: int = 1
    recent_pages: int = 1

    def __post_init__(self) -> None:
        for name, low in (("top_pages", 0), ("page_tokens", 1), ("sink_pages", 0), ("recent_pages", 1)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"SparseDecode.{name} must be an int >= {low}, got {val!r}")


class PageIndex:
    """Per-page key bounds of one global layer: ``kmin``/``kmax`` (B, Hkv, capacity, D) in the
    keys' dtype on the device, valid for the first ``pages`` entries; and what decode read.
    Pages count from ``origin``, the first key's position: 0, or where a context-parallel
    rank's shard starts (``longctx.distributed``)."""

    def __init__(self, sparse: SparseDecode, device: torch.device | str):
        self.sparse, self.device = sparse, torch.device(device)
        self.kmin = self.kmax = None
        self.origin = self.length = 0  # keys summarised: positions origin..length-1
        self.reset_reads()

    @property
    def pages(self) -> int:
        return -(-(self.length - self.origin) // self.sparse.page_tokens)

    def reset_reads(self) -> None:
        self.keys_read = self.keys_total = 0  # summed over steps, batch rows and KV heads
        self.bytes_read = dict.fromkeys(TIERS, 0)

    def add(self, k: torch.Tensor, pos: int) -> None:
        """Fold keys k (B, Hkv, T, D) at positions pos..pos+T-1 (the next ones) into the bounds."""
        if self.kmin is None and self.length == 0:  # the first keys fix the origin
            self.origin = self.length = pos
        if pos != self.length:
            raise CacheError(f"page index holds keys up to {self.length}, got keys at {pos}")
        B, H, T, D = k.shape
        if T == 0:
            return
        P = self.sparse.page_tokens
        rel = pos - self.origin
        first, last = rel // P, (rel + T - 1) // P
        if self.kmin is None or self.kmin.shape[2] <= last:  # grow geometrically: O(1) per decode step
            cap = max(last + 1, 2 * (0 if self.kmin is None else self.kmin.shape[2]))
            # NOTE: normal tensors even under inference_mode (prefill), which decode under no_grad updates.
            with torch.inference_mode(False):
                lo, hi = (torch.empty(B, H, cap, D, dtype=k.dtype, device=self.device) for _ in range(2))
                if self.kmin is not None:
                    n = self.pages
                    lo[:, :, :n], hi[:, :, :n] = self.kmin[:, :, :n], self.kmax[:, :, :n]
            self.kmin, self.kmax = lo, hi
        k = k.to(self.device)
        off, n = rel - first * P, last - first + 1
        lo = k.new_full((B, H, n * P, D), float("inf"))
        lo[:, :, off : off + T] = k
        hi = k.new_full((B, H, n * P, D), float("-inf"))
        hi[:, :, off : off + T] = k
        lo, hi = lo.view(B, H, n, P, D).amin(3), hi.view(B, H, n, P, D).amax(3)  # (B, H, n, D)
        if off:  # the first page already holds keys
            lo[:, :, 0] = torch.minimum(lo[:, :, 0], self.kmin[:, :, first])
            hi[:, :, 0] = torch.maximum(hi[:, :, 0], self.kmax[:, :, first])
        self.kmin[:, :, first : last + 1], self.kmax[:, :, first : last + 1] = lo, hi
        self.length = pos + T

    def fork(self) -> PageIndex:
        """An independent copy (``add`` writes in place), read counters included."""
        p = PageIndex(self.sparse, self.device)
        if self.kmin is not None:
            with torch.inference_mode(False):  # see ``add``
                p.kmin, p.kmax = self.kmin[:, :, : self.pages].clone(), self.kmax[:, :, : self.pages].clone()
        p.origin, p.length, p.keys_read, p.keys_total = self.origin, self.length, self.keys_read, self.keys_total
        p.bytes_read = dict(self.bytes_read)
        return p

    def select(self, q: torch.Tensor) -> torch.Tensor:
        """Pages to read for the query q (B, Hq, 1, D) at position ``length - 1`` or later: (B, Hkv, K)
        int64 page ids, ascending per row, the last page (which may be partial) last. Ties in
        score go to the lower page id, so the choice is deterministic."""
        sp, n = self.sparse, self.pages
        B, H = self.kmin.shape[:2]
        forced = sorted(set(range(min(sp.sink_pages, n))) | set(range(max(0, n - sp.recent_pages), n)))
        if sp.top_pages >= n - len(forced):
            return torch.arange(n, device=self.device).expand(B, H, n)
        scores = page_scores(q[:, :, 0], self.kmin[:, :, :n], self.kmax[:, :, :n])  # (B, Hkv, n) fp32
        scores[:, :, forced] = float("inf")
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        return order[..., : len(forced) + sp.top_pages].sort(dim=-1).values


def page_rows(pages: torch.Tensor, page_tokens: int, length: int) -> torch.Tensor:
    """Positions of the keys of ``pages`` (B, H, K) (ascending, the last page last): (B, H, n)
    int64 on CPU, n = (K-1)·P + the last page's keys, so that no position reaches ``length``."""
    pages = pages.cpu()
    B, H, K = pages.shape
    full = (pages[..., :-1, None] * page_tokens + torch.arange(page_tokens)).reshape(B, H, -1)
    tail = torch.arange((length - 1) // page_tokens * page_tokens, length).expand(B, H, -1)
    return torch.cat([full, tail], -1)


def gather(cache: GlobalCache, pos: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v (B, H, n, D) on ``device`` at positions ``pos`` (B, H, n), counted from the
    cache's first key (its ``pages.origin``): only those
    rows are read from each segment's tier (a memory-mapped segment reads just those pages);
    bytes read per tier are added to ``cache.pages.bytes_read``. Work is per segment touched,
    at most a few per page read, never per segment held."""
    seg, sealed = cache.seg, cache.sealed
    src0 = sealed[0][0] if sealed else cache.tail
    B, H, n = pos.shape
    out = torch.empty((2, B, H, n, src0.shape[-1]), dtype=src0.dtype, device=device)
    sid = pos // seg
    for j in torch.unique(sid).tolist():
        src, tier = (sealed[j][0], sealed[j][2]) if j < len(sealed) else (cache.tail, "device")
        b, h, r = (sid == j).nonzero(as_tuple=True)
        rows = src[:, b, h, pos[b, h, r] - j * seg]  # (2, m, D), on the segment's tier
        out[:, b.to(device), h.to(device), r.to(device)] = rows.to(device, non_blocking=True)
        cache.pages.bytes_read[tier] += rows.numel() * rows.element_size()
    return out[0], out[1]


def attend(q: torch.Tensor, cache: GlobalCache, q_start: int, scale: float):
    """Sparse attention of one query token q (B, Hq, 1, D) at ``q_start`` over the keys of
    ``cache``, all at positions up to q_start: its own key included (length q_start + 1), or,
    on a context-parallel rank, the keys of its shard. Returns out (B, Hq, 1, D) in q's dtype,
    lse (B, Hq, 1) fp32 over the keys read, and what was read for citations: (k (B, Hkv, n, D),
    absolute positions (B, Hkv, n)), for ``AttentionMass.record_gathered``."""
    idx = cache.pages
    end = cache.tail_start + (0 if cache.tail is None else cache.tail.shape[3])
    if idx.length != end or end > q_start + 1:
        raise CacheError(f"page index holds keys up to {idx.length}, the cache {end}, the query is at {q_start}")
    n = idx.length - idx.origin
    pos = page_rows(idx.select(q), idx.sparse.page_tokens, n)
    k, v = gather(cache, pos, q.device)
    # Every gathered key precedes the query, so no mask: causal=False over keys in any order.
    out, lse = decode_attention(q, [(k, v, 0)], q_start=q_start, causal=False, scale=scale)
    idx.keys_read += pos.numel()
    idx.keys_total += pos.shape[0] * pos.shape[1] * n
    return out, lse, (k, pos + idx.origin)


def layers(cache: KVCache) -> list[GlobalCache]:
    """The global layers of ``cache`` that keep a page index."""
    return [layer for layer in cache.layers if getattr(layer, "pages", None) is not None]


def read_share(cache: KVCache) -> float:
    """Share of global-layer keys that decode steps read since ``reset_reads`` (1.0 when
    none ran or the cache decodes exactly)."""
    read = sum(layer.pages.keys_read for layer in layers(cache))
    total = sum(layer.pages.keys_total for layer in layers(cache))
    if cache.context_parallel is not None:  # each rank counts its own shard's keys
        read, total = cache.context_parallel.all_reduce(torch.tensor([read, total], dtype=torch.float64)).tolist()
    return read / total if total else 1.0


def bytes_read(cache: KVCache) -> dict[str, int]:
    """KV bytes that sparse decode steps read per tier since ``reset_reads``."""
    out = dict.fromkeys(TIERS, 0)
    for layer in layers(cache):
        for tier, b in layer.pages.bytes_read.items():
            out[tier] += b
    return out


def reset_reads(cache: KVCache) -> None:
    for layer in layers(cache):
        layer.pages.reset_reads()


# ---- persistence (called by KVCache.save / KVCache.load) -------------------------------------


def save(cache: KVCache, folder: Path) -> dict:
    """Write each global layer's bounds to ``pages{i:03d}.safetensors``; returns cache.json's
    ``sparse`` entry (the settings they were built with), {} without an index."""
    from safetensors.torch import save_file

    if cache.sparse is None:
        return {}
    for i, layer in enumerate(cache.layers):
        idx = getattr(layer, "pages", None)
        if idx is not None and idx.kmin is not None:
            n = idx.pages
            save_file(
                {"kmin": idx.kmin[:, :, :n].cpu().contiguous(), "kmax": idx.kmax[:, :, :n].cpu().contiguous()},
                str(folder / f"pages{i:03d}.safetensors"),
            )
    return {"sparse": asdict(cache.sparse)}


def load(cache: KVCache, folder: Path, manifest: Manifest, meta: dict) -> None:
    """Restore the bounds that ``save`` wrote into the empty indexes of ``cache`` (built with
    ``cache.sparse``). Raises ``CacheError`` naming cache.json when it was saved without an
    index or with another page size, and naming the pages file when that file is damaged or
    its bounds do not fit the cache (shape, dtype)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    saved = meta.get("sparse")
    if saved is None or saved.get("page_tokens") != cache.sparse.page_tokens:
        got = "no page summaries" if saved is None else f"page_tokens={saved.get('page_tokens')}"
        raise CacheError(
            f"{folder / 'cache.json'}: saved with {got}, sparse decode asks page_tokens={cache.sparse.page_tokens}"
        )
    length = meta["length"]
    for i, layer in enumerate(cache.layers):
        idx = getattr(layer, "pages", None)
        if idx is None or not length:
            continue
        path = manifest.check(f"pages{i:03d}.safetensors")
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CacheError(f"{path}: unreadable page summaries ({e})") from None
        ref = layer.tail  # (2, B, H, n, D): present, possibly empty, in any non-empty cache
        shape = [meta["batch"], ref.shape[2], -(-length // cache.sparse.page_tokens), ref.shape[4]]
        for name in ("kmin", "kmax"):
            if name not in t or list(t[name].shape) != shape or t[name].dtype != ref.dtype:
                got = "missing" if name not in t else f"{list(t[name].shape)} {t[name].dtype}"
                raise CacheError(f"{path}: page summary {name} is {got}, expected {shape} {ref.dtype}")
        idx.kmin, idx.kmax = t["kmin"].to(idx.device), t["kmax"].to(idx.device)
        idx.length = length
