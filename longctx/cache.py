"""KV caches: a bounded cache for chunked-local layers, a tiered segment store for global ones.

A ``KVCache`` is passed explicitly to ``model(tokens, cache)``; it holds one layer cache per
decoder layer and the number of tokens seen (``length``), which advances once per forward.

* ``ChunkedCache`` (RoPE layers): a query at position p only sees keys in its own attention
  chunk [⌊p/C⌋·C, p], so after L tokens only positions [⌊L/C⌋·C, L) are kept — never more than
  C-1 tokens, whatever the context length (asserted on every append).
* ``GlobalCache`` (NoPE layers): every key is kept, in fixed segments of ``segment_tokens``.
  Sealed segments are immutable and live on one tier each, placed by ``longctx.offload``
  (device, CPU or memory-mapped files, within ``OffloadPolicy`` budgets). The open tail
  segment stays on the device. Attention streams lower-tier segments up (``offload.stage``)
  and merges per-segment results by LSE.

Statistics: a layer cache's ``stats`` is ``None`` or a recorder that the attention calls after
each call over the cache (``AttentionMass.record``); ``KVCache.record_attention`` installs one
in every global layer and ``KVCache.attention_mass`` sums them (citations).

Because sealed segments never change, ``fork()`` is cheap: a fork shares them and copies only
the small open parts, so a QA session can append a question to a fork and drop it.

Saved caches (``save`` / ``KVCache.load``) record the model fingerprint and a SHA-256 of each
row's token ids; loading refuses another model or another text. Writes are atomic: the folder
is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

# CacheError and OffloadPolicy are also imported from here by callers (the public API).
from .offload import TIERS, CacheError, OffloadPolicy, Placer, Segment, stage

if TYPE_CHECKING:
    from .model import Model

FORMAT = "longctx-kvcache-1"


class AttentionMass:
    """The citation statistic of one global layer while recording: per key position, the
    causal-softmax probability that the queries of later forwards put on it, summed over heads
    and queries. ``mass`` (B, capacity) fp32 on CPU; capacity may run past the last key (those
    entries stay zero). Each (head, query) row adds exactly 1 in total."""

    def __init__(self, mass: torch.Tensor):
        self.mass = mass

    def copy(self) -> AttentionMass:
        return AttentionMass(self.mass.clone())

    def record(self, q: torch.Tensor, q_start: int, segments: list[Segment], lse: torch.Tensor,
               scale: float) -> None:
        """Add the mass that queries q (B, Hq, M, D) at positions q_start.. put on the keys of
        ``segments`` (every key they attended to, their own included), given the softmax's
        log-normaliser lse (B, Hq, M) fp32 from the attention and its score scale."""
        B, Hq, M, D = q.shape
        end = q_start + M
        if self.mass.shape[1] < end:  # grow geometrically: a decode step adds one key, not one O(L) copy
            grow = max(end, 2 * self.mass.shape[1]) - self.mass.shape[1]
            self.mass = torch.cat([self.mass, self.mass.new_zeros(B, grow)], 1)
        G = Hq // segments[0][0].shape[1]  # query heads per KV head
        qf = q.float().unflatten(1, (-1, G))  # (B, Hkv, G, M, D)
        lse = lse.unflatten(1, (-1, G))[..., None]  # (B, Hkv, G, M, 1)
        qpos = torch.arange(q_start, end, device=q.device)
        for group in stage(segments, q.device):
            for k, _, ks in group:
                n = k.shape[2]
                s = torch.einsum("bhgmd,bhnd->bhgmn", qf, k.float()) * scale
                p = torch.exp(s - lse)
                p = p.masked_fill(torch.arange(ks, ks + n, device=q.device)[None, :] > qpos[:, None], 0.0)
                self.mass[:, ks : ks + n] += p.sum((1, 2, 3)).cpu()


class ChunkedCache:
    """Keys/values of the current attention chunk only: positions [⌊L/C⌋·C, L)."""

    # Chunked layers keep no statistics: citations use the global layers, which see every key.
    stats: AttentionMass | None = None

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.k = self.v = None  # (B, Hkv, n, D)
        self.start = 0

    def segments(self) -> list[Segment]:
        return [] if self.k is None else [(self.k, self.v, self.start)]

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        """Add k, v (B, Hkv, T, D) at positions pos..pos+T-1, then drop keys of finished chunks."""
        if self.k is not None:
            if pos != self.start + self.k.shape[2]:
                raise CacheError(f"chunked cache holds positions up to {self.start + self.k.shape[2]}, got {pos}")
            k, v, pos = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2), self.start
        drop = ((pos + k.shape[2]) // self.chunk) * self.chunk - pos  # keys before the current chunk
        if drop > 0:  # clone: a view would keep the whole appended block alive
            k, v, pos = k[:, :, drop:].clone(), v[:, :, drop:].clone(), pos + drop
        self.k, self.v, self.start = k, v, pos
        assert self.k.shape[2] <= self.chunk, "chunked cache exceeded one attention chunk"

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def fork(self) -> ChunkedCache:
        c = ChunkedCache(self.chunk)
        c.k, c.v, c.start = self.k, self.v, self.start  # append never mutates in place
        return c

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.k is None else {"k": self.k, "v": self.v}

    def restore(self, tensors: dict, meta: dict, placer: Placer) -> None:
        if "k" in tensors:
            self.k, self.v = tensors["k"].to(placer.device), tensors["v"].to(placer.device)
        self.start = meta["start"]

    def meta(self) -> dict:
        return {"kind": "chunked", "start": self.start}


class GlobalCache:
    """Every key of a global layer, as sealed segments on tiers plus an open tail on device."""

    def __init__(self, placer: Placer):
        self.placer = placer
        self.sealed: list[tuple[torch.Tensor, int, str]] = []  # (kv (2,B,H,n,D), start, tier)
        self.tail: torch.Tensor | None = None  # (2, B, H, n, D) on the device
        self.tail_start = 0
        self.stats: AttentionMass | None = None  # set while recording attention

    @property
    def seg(self) -> int:
        return self.placer.policy.segment_tokens

    def segments(self) -> list[Segment]:
        segs = [(kv[0], kv[1], start) for kv, start, _ in self.sealed]
        if self.tail is not None and self.tail.shape[3]:
            segs.append((self.tail[0], self.tail[1], self.tail_start))
        return segs

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        kv = torch.stack([k, v])  # (2, B, H, T, D)
        if self.tail is None:
            self.tail, self.tail_start = kv, pos
        else:
            if pos != self.tail_start + self.tail.shape[3]:
                end = self.tail_start + self.tail.shape[3]
                raise CacheError(f"global cache holds positions up to {end}, got {pos}")
            self.tail = torch.cat([self.tail, kv], 3)
        while self.tail.shape[3] >= self.seg:
            stored, tier = self.placer.place(self.tail[:, :, :, : self.seg])
            self.sealed.append((stored, self.tail_start, tier))
            self.tail, self.tail_start = self.tail[:, :, :, self.seg :].clone(), self.tail_start + self.seg

    @property
    def nbytes(self) -> int:
        return sum(b for b in self.tier_bytes().values())

    def tier_bytes(self) -> dict[str, int]:
        out = dict.fromkeys(TIERS, 0)
        for kv, _, tier in self.sealed:
            out[tier] += kv.numel() * kv.element_size()
        if self.tail is not None:
            out["device"] += self.tail.numel() * self.tail.element_size()
        return out

    def fork(self, placer: Placer) -> GlobalCache:
        g = GlobalCache(placer)
        g.sealed, g.tail, g.tail_start = list(self.sealed), self.tail, self.tail_start
        g.stats = None if self.stats is None else self.stats.copy()
        return g

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"seg{i}": kv for i, (kv, _, _) in enumerate(self.sealed)}
        if self.tail is not None:
            out["tail"] = self.tail
        return out

    def restore(self, tensors: dict, meta: dict, placer: Placer) -> None:
        for i, start in enumerate(meta["starts"]):
            stored, tier = placer.place(tensors[f"seg{i}"])
            self.sealed.append((stored, start, tier))
        if "tail" in tensors:
            self.tail = tensors["tail"].to(placer.device)
        self.tail_start = meta["tail_start"]

    def meta(self) -> dict:
        return {"kind": "global", "starts": [s for _, s, _ in self.sealed], "tail_start": self.tail_start}


@contextlib.contextmanager
def atomic_folder(folder: Path):
    """Yield an empty folder beside ``folder``; when the block finishes, put it at ``folder``.

    An existing ``folder`` is moved aside first and removed only after the rename, so a reader
    sees the old or the new folder, never half of one; if the block raises, the new folder is
    removed and the old one stays as it was."""
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    old = None
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            old.rename(folder)  # the final rename failed: put the old folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def token_hash(tokens) -> list[str]:
    """SHA-256 (hex) of each row's token ids as little-endian int64: (B, T) -> B digests."""
    rows = np.asarray(torch.as_tensor(tokens).cpu(), dtype="<i8").reshape(-1, np.shape(tokens)[-1])
    return [hashlib.sha256(r.tobytes()).hexdigest() for r in rows]


class KVCache:
    """Per-layer caches of one model for a batch of B sequences; see the module docstring."""

    def __init__(self, layer_kinds: list[str], chunk: int, batch: int, device: torch.device | str,
                 fingerprint: str, offload: OffloadPolicy | None = None):
        self.offload = offload or OffloadPolicy()
        self.placer = Placer(self.offload, device)
        self.layer_kinds, self.chunk, self.batch, self.fingerprint = list(layer_kinds), chunk, batch, fingerprint
        self.layers = [ChunkedCache(chunk) if kind == "chunked" else GlobalCache(self.placer) for kind in layer_kinds]
        self.length = 0
        self._hash = [hashlib.sha256() for _ in range(batch)]

    def advance(self, tokens: torch.Tensor) -> None:
        """Called once per forward after all layers appended: positions move on by T."""
        if tokens.shape[0] != self.batch:
            raise CacheError(f"cache was made for batch {self.batch}, got tokens of batch {tokens.shape[0]}")
        rows = np.asarray(tokens.detach().cpu(), dtype="<i8")
        for h, r in zip(self._hash, rows):
            h.update(r.tobytes())
        self.length += tokens.shape[1]

    def token_hash(self) -> list[str]:
        """Per row, the SHA-256 of all token ids seen so far (equals ``token_hash(tokens)``)."""
        return [h.hexdigest() for h in self._hash]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def tier_bytes(self) -> dict[str, int]:
        """Bytes of global-layer KV per tier (chunked layers are on the device, bounded)."""
        out = dict.fromkeys(TIERS, 0)
        for layer in self.layers:
            if isinstance(layer, GlobalCache):
                for t, b in layer.tier_bytes().items():
                    out[t] += b
            else:
                out["device"] += layer.nbytes
        return out

    def fork(self) -> KVCache:
        """A cache that shares this one's sealed segments; appending to it leaves this one as is."""
        new = KVCache(self.layer_kinds, self.chunk, self.batch, self.placer.device, self.fingerprint, self.offload)
        new.placer = self.placer.copy()
        new.layers = [layer.fork(new.placer) if isinstance(layer, GlobalCache) else layer.fork()
                      for layer in self.layers]
        new.length = self.length
        new._hash = [h.copy() for h in self._hash]
        return new

    def record_attention(self, on: bool = True) -> None:
        """Start (or stop) recording, in every global layer, how much attention the queries of
        later forwards put on each key position (restarting from zero)."""
        for layer in self.layers:
            if isinstance(layer, GlobalCache):
                layer.stats = AttentionMass(torch.zeros(self.batch, self.length)) if on else None

    def attention_mass(self) -> torch.Tensor:
        """(B, length) fp32: attention probability mass per key position, summed over global
        layers, heads and the queries run since ``record_attention()``."""
        out = torch.zeros(self.batch, self.length)
        for layer in self.layers:
            if layer.stats is not None:
                n = min(layer.stats.mass.shape[1], self.length)  # its capacity may exceed the length
                out[:, :n] += layer.stats.mass[:, :n]
        return out

    # ---- persistence ------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the cache to ``folder`` atomically (built beside it, then renamed into place)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            metas = []
            for i, layer in enumerate(self.layers):
                tensors = {n: t.detach().cpu().contiguous() for n, t in layer.tensors().items()}
                save_file(tensors, str(tmp / f"layer{i:03d}.safetensors"))
                metas.append(layer.meta())
            meta = {"format": FORMAT, "fingerprint": self.fingerprint, "token_sha256": self.token_hash(),
                    "length": self.length, "batch": self.batch, "chunk": self.chunk,
                    "layer_kinds": self.layer_kinds, "segment_tokens": self.offload.segment_tokens,
                    "layers": metas}
            (tmp / "cache.json").write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, model: Model, *, tokens=None,
             offload: OffloadPolicy | None = None) -> KVCache:
        """Load a saved cache for ``model``. Refuses a cache of another model, and, when the
        token ids it was built from are given (``tokens`` (B, T)), a cache of another text.

        Segments are placed by ``offload`` (default: all on the model's device) and read one
        tensor at a time."""
        from safetensors import safe_open

        folder = Path(folder)
        try:
            meta = json.loads((folder / "cache.json").read_text())
        except FileNotFoundError:
            raise CacheError(f"{folder}: not a saved cache (no cache.json)") from None
        except json.JSONDecodeError as e:
            raise CacheError(f"{folder}/cache.json: corrupt ({e})") from None
        if meta.get("format") != FORMAT:
            raise CacheError(f"{folder}: unknown cache format {meta.get('format')!r}")
        if meta["fingerprint"] != model.fingerprint:
            raise CacheError(f"{folder}: saved for another model (fingerprint {meta['fingerprint'][:12]}…, "
                             f"this model {model.fingerprint[:12]}…)")
        if tokens is not None:
            if token_hash(tokens) != meta["token_sha256"]:
                raise CacheError(f"{folder}: saved for another text (token hash differs)")
        policy = offload or OffloadPolicy(segment_tokens=meta["segment_tokens"])
        if policy.segment_tokens != meta["segment_tokens"]:
            raise CacheError(f"{folder}: saved with segment_tokens={meta['segment_tokens']}, "
                             f"policy asks {policy.segment_tokens}")
        cache = model.new_cache(batch=meta["batch"], offload=policy)
        for i, (layer, lmeta) in enumerate(zip(cache.layers, meta["layers"])):
            path = folder / f"layer{i:03d}.safetensors"
            if not path.exists():
                raise CacheError(f"{path}: missing (cache incomplete)")
            with safe_open(str(path), framework="pt") as f:
                layer.restore(_LazyTensors(f), lmeta, cache.placer)
        cache.length = meta["length"]
        cache._hash = [_FrozenHash(h) for h in meta["token_sha256"]]
        return cache


class _LazyTensors:
    """Mapping view of an open safetensors file: tensors are read one at a time."""

    def __init__(self, f):
        self.f, self.keys = f, set(f.keys())

    def __contains__(self, name: str) -> bool:
        return name in self.keys

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.f.get_tensor(name)


class _FrozenHash:
    """Token digest of a loaded cache. hashlib's running state can't be saved, so tokens
    appended after loading are hashed separately and combined: the digest then identifies
    (saved text, appended tokens) but no longer equals ``token_hash`` of the whole text."""

    def __init__(self, hexdigest: str):
        self._hex, self._tail = hexdigest, None

    def hexdigest(self) -> str:
        if self._tail is None:
            return self._hex
        return hashlib.sha256(f"{self._hex}+{self._tail.hexdigest()}".encode()).hexdigest()

    def copy(self) -> _FrozenHash:
        c = _FrozenHash(self._hex)
        c._tail = None if self._tail is None else self._tail.copy()
        return c

    def update(self, data: bytes) -> None:
        if self._tail is None:
            self._tail = hashlib.sha256()
        self._tail.update(data)
