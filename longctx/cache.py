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

Context parallelism (``longctx.distributed``): with ``context_parallel`` each rank's cache holds
its shard of the context; global layers hand attention to the shared ``ContextParallel`` (``cp``).

Sparse decode (``longctx.sparse``): with ``sparse=SparseDecode(...)`` each global layer keeps a
``PageIndex`` (key bounds per page, on the device), saved, loaded and forked with the cache.

Because sealed segments never change, ``fork()`` is cheap: a fork shares them and copies only
the small open parts, so a QA session can append a question to a fork and drop it.

Saved caches (``save`` / ``KVCache.load``) record the model fingerprint and a SHA-256 of each
row's token ids; loading refuses another model or another text. Every saved file is listed in
``manifest.json`` with its size and SHA-256 (the manifest carries a digest of itself), and is
verified before it is first read, so damage is a ``CacheError`` naming the file, never a
wrong answer. Writes are atomic even against a kill at any instant (``atomic_folder``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import storage

# CacheError and OffloadPolicy are also imported from here by callers (the public API).
from .offload import TIERS, CacheError, OffloadPolicy, Placer, Segment
from .sparse import PageIndex, SparseDecode
from .sparse import load as load_pages
from .sparse import save as save_pages
from .stats import AttentionMass
from .storage import Manifest, atomic_folder, recover, write_manifest

if TYPE_CHECKING:
    from .distributed import ContextParallel
    from .model import Model

# 2: files checksummed in manifest.json, tensor names listed per layer (format 1 had neither).
FORMAT = "longctx-kvcache-2"


class ChunkedCache:
    """Keys/values of the current attention chunk only: positions [⌊L/C⌋·C, L)."""

    # Chunked layers keep no statistics: citations use the global layers, which see every key.
    stats: AttentionMass | None = None
    pages: PageIndex | None = None  # and decode them exactly (sparse decode reads global layers only)
    cp: ContextParallel | None = None  # and never talk to other ranks (shards are chunk-aligned)

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

    def expected(self, meta: dict, length: int, seg: int) -> dict[str, int]:
        """{tensor name: tokens} that a saved layer with ``meta`` holds (k, v (B, H, n, D)), after
        ``length`` tokens: k and v exist, possibly empty, once anything was appended."""
        n = length - meta["start"]
        if not 0 <= n < self.chunk or meta["start"] % self.chunk:
            raise CacheError(f"chunked layer start {meta['start']} does not fit length {length}, chunk {self.chunk}")
        return {"k": n, "v": n} if length else {}


class GlobalCache:
    """Every key of a global layer, as sealed segments on tiers plus an open tail on device."""

    def __init__(self, placer: Placer, cp: ContextParallel | None = None):
        self.placer, self.cp = placer, cp
        self.sealed: list[tuple[torch.Tensor, int, str]] = []  # (kv (2,B,H,n,D), start, tier)
        self.tail: torch.Tensor | None = None  # (2, B, H, n, D) on the device
        self.tail_start = 0
        self.stats: AttentionMass | None = None  # set while recording attention
        self.pages: PageIndex | None = None  # key bounds per page, for sparse decode (``longctx.sparse``)

    @property
    def seg(self) -> int:
        return self.placer.policy.segment_tokens

    def segments(self) -> list[Segment]:
        segs = [(kv[0], kv[1], start) for kv, start, _ in self.sealed]
        if self.tail is not None and self.tail.shape[3]:
            segs.append((self.tail[0], self.tail[1], self.tail_start))
        return segs

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        if self.pages is not None:  # first: it checks pos, and the keys are at hand (no second pass)
            self.pages.add(k, pos)
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
        g = GlobalCache(placer, self.cp)
        g.sealed, g.tail, g.tail_start = list(self.sealed), self.tail, self.tail_start
        g.stats = None if self.stats is None else self.stats.copy()
        g.pages = None if self.pages is None else self.pages.fork()
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

    def expected(self, meta: dict, length: int, seg: int) -> dict[str, int]:
        """{tensor name: tokens} that a saved layer with ``meta`` holds (segments and the open tail,
        (2, B, H, n, D)), after ``length`` tokens: the tail exists, possibly empty, once anything
        was appended."""
        starts, tail_start = list(meta["starts"]), meta["tail_start"]
        if (
            starts != [i * seg for i in range(len(starts))]
            or tail_start != len(starts) * seg
            or not 0 <= length - tail_start < seg
        ):
            raise CacheError(f"global layer segments {starts[:4]} and tail at {tail_start} do not tile length {length}")
        out = {f"seg{i}": seg for i in range(len(starts))}
        if length:
            out["tail"] = length - tail_start
        return out


def token_hash(tokens) -> list[str]:
    """SHA-256 (hex) of each row's token ids as little-endian int64: (B, T) -> B digests."""
    rows = np.asarray(torch.as_tensor(tokens).cpu(), dtype="<i8").reshape(-1, np.shape(tokens)[-1])
    return [hashlib.sha256(r.tobytes()).hexdigest() for r in rows]


class KVCache:
    """Per-layer caches of one model for a batch of B sequences; see the module docstring."""

    def __init__(
        self,
        layer_kinds: list[str],
        chunk: int,
        batch: int,
        device: torch.device | str,
        fingerprint: str,
        offload: OffloadPolicy | None = None,
        sparse: SparseDecode | None = None,
        context_parallel: ContextParallel | None = None,
    ):
        self.offload, self.sparse, self.context_parallel = offload or OffloadPolicy(), sparse, context_parallel
        self.placer = Placer(self.offload, device)
        self.layer_kinds, self.chunk, self.batch, self.fingerprint = list(layer_kinds), chunk, batch, fingerprint
        self.layers = [
            ChunkedCache(chunk) if kind == "chunked" else GlobalCache(self.placer, context_parallel)
            for kind in layer_kinds
        ]
        for layer in self.layers:
            if sparse is not None and isinstance(layer, GlobalCache):
                layer.pages = PageIndex(sparse, device)
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

    def check_room(self, new_tokens: int, bytes_per_token: int) -> None:
        """Refuse, before a prefill starts, ``new_tokens`` more tokens whose global-layer KV
        (``bytes_per_token`` per sequence, e.g. ``config.kv_bytes_per_token(2)["global"]``)
        would not fit the device/CPU budgets plus the free space of the disk tier's folder.
        Raises ``CacheError`` naming the folder, the bytes needed and the bytes free."""
        self.placer.check_room(new_tokens * self.batch * bytes_per_token)

    def fork(self) -> KVCache:
        """A cache that shares this one's sealed segments; appending to it leaves this one as is."""
        args = self.layer_kinds, self.chunk, self.batch, self.placer.device, self.fingerprint, self.offload
        new = KVCache(*args, self.sparse, self.context_parallel)
        new.placer = self.placer.copy()
        new.layers = [
            layer.fork(new.placer) if isinstance(layer, GlobalCache) else layer.fork() for layer in self.layers
        ]
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
        cp = self.context_parallel  # each rank holds the mass of its own key positions
        return out if cp is None else cp.all_reduce(out)

    # ---- persistence ------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the cache to ``folder`` atomically (``atomic_folder``): one safetensors file per
        layer, ``cache.json``, then ``manifest.json`` with the SHA-256 of each (one extra read
        of what was just written, usually from the page cache).

        Raises ``CacheError`` naming the folder, the bytes the save needs and the bytes free when
        the disk is too full (checked first) or a write fails (ENOSPC, EFBIG, ...); the old copy
        at ``folder``, if any, is then intact and no temporary file is left."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        folder = Path(folder)
        if self.context_parallel is not None:
            raise CacheError(f"{folder}: a context-parallel cache can't be saved (each rank holds a shard)")
        layers = [{n: t.detach().cpu().contiguous() for n, t in layer.tensors().items()} for layer in self.layers]
        # Tensor bytes plus each file's header (names, shapes, offsets): a bound, not the exact size.
        needed = sum(t.numel() * t.element_size() + 256 for ts in layers for t in ts.values())
        needed += 4096 * (len(layers) + 2)

        def refuse(why: str) -> CacheError:
            try:
                free = f"{shutil.disk_usage(storage.existing(folder)).free} B free"
            except OSError:
                free = "free space unknown"
            return CacheError(f"{folder}: cannot save the KV cache ({why}); it needs about {needed} B, {free}")

        try:
            if shutil.disk_usage(storage.existing(folder)).free < needed:
                raise refuse("not enough free space")
            with atomic_folder(folder) as tmp:
                for i, tensors in enumerate(layers):
                    save_file(tensors, str(tmp / f"layer{i:03d}.safetensors"))
                    storage.step(f"wrote layer{i:03d}")
                meta = {
                    "format": FORMAT,
                    "fingerprint": self.fingerprint,
                    "token_sha256": self.token_hash(),
                    "length": self.length,
                    "batch": self.batch,
                    "chunk": self.chunk,
                    "layer_kinds": self.layer_kinds,
                    "segment_tokens": self.offload.segment_tokens,
                    "layers": [layer.meta() for layer in self.layers],
                    **save_pages(self, tmp),
                }
                (tmp / "cache.json").write_text(json.dumps(meta, indent=1))
                storage.step("wrote cache.json")
                write_manifest(tmp)
                storage.step("wrote manifest")
        except (OSError, SafetensorError) as e:
            raise refuse(f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}") from None
        return folder

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        model: Model,
        *,
        tokens=None,
        offload: OffloadPolicy | None = None,
        sparse: SparseDecode | None = None,
    ) -> KVCache:
        """Load a saved cache for ``model`` (with ``sparse``: and its page summaries, which must
        have been saved with the same ``page_tokens``). Refuses a cache of another model, and, when the
        token ids it was built from are given (``tokens`` (B, T)), a cache of another text.

        First recovers a save of ``folder`` that was killed part way (``recover``). Each file is
        verified against ``manifest.json`` just before it is first read: one extra sequential
        read of the file, at SHA-256 speed (about 1 GB/s per core), i.e. about a second per GB
        of saved cache, usually served from the page cache by the read that follows. Segments
        are then placed by ``offload`` (default: all on the model's device), one tensor at a
        time; segments placed on the disk tier are copied from verified files.

        Raises only ``CacheError``, naming the file: missing, damaged (any changed byte),
        a tensor missing or of the wrong shape, or metadata that does not fit the model."""
        folder = Path(folder)
        try:
            recover(folder)
        except OSError as e:
            raise CacheError(f"{folder}: cannot recover an interrupted save ({e.strerror or e})") from None
        if not (folder / "cache.json").exists():
            raise CacheError(f"{folder}: not a saved cache (no cache.json)")
        manifest = Manifest(folder)
        meta_path = manifest.check("cache.json")
        try:
            meta = json.loads(meta_path.read_bytes())
            return cls._load(folder, manifest, meta, model, tokens, offload, sparse)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            # Only a file written to match its checksum gets here (a forgery or a bug): name it.
            raise CacheError(f"{meta_path}: malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def _load(
        cls,
        folder: Path,
        manifest: Manifest,
        meta: dict,
        model: Model,
        tokens,
        offload: OffloadPolicy | None,
        sparse: SparseDecode | None,
    ) -> KVCache:
        from safetensors import SafetensorError, safe_open

        if meta.get("format") != FORMAT:
            raise CacheError(f"{folder}: unknown cache format {meta.get('format')!r}")
        if meta["fingerprint"] != model.fingerprint:
            raise CacheError(
                f"{folder}: saved for another model (fingerprint {meta['fingerprint'][:12]}…, "
                f"this model {model.fingerprint[:12]}…)"
            )
        if tokens is not None:
            if token_hash(tokens) != meta["token_sha256"]:
                raise CacheError(f"{folder}: saved for another text (token hash differs)")
        policy = offload or OffloadPolicy(segment_tokens=meta["segment_tokens"])
        if policy.segment_tokens != meta["segment_tokens"]:
            raise CacheError(
                f"{folder}: saved with segment_tokens={meta['segment_tokens']}, policy asks {policy.segment_tokens}"
            )
        cache = model.new_cache(batch=meta["batch"], offload=policy, sparse=sparse)
        length, batch, cfg = meta["length"], meta["batch"], model.config
        if (
            cache.layer_kinds != meta["layer_kinds"]
            or len(meta["layers"]) != len(cache.layers)
            or len(meta["token_sha256"]) != batch
        ):
            raise CacheError(f"{folder}/cache.json: layers or batch do not fit the model")
        for i, (layer, lmeta) in enumerate(zip(cache.layers, meta["layers"])):
            path = manifest.check(f"layer{i:03d}.safetensors")
            want = layer.expected(lmeta, length, policy.segment_tokens)
            try:
                with safe_open(str(path), framework="pt") as f:
                    names = set(f.keys())
                    if names != set(want):
                        raise CacheError(f"{path}: holds tensors {sorted(names)}, cache.json needs {sorted(want)}")
                    for name, n in want.items():
                        shape = [batch, cfg.num_key_value_heads, n, cfg.head_dim]
                        shape = shape if isinstance(layer, ChunkedCache) else [2, *shape]
                        if list(f.get_slice(name).get_shape()) != shape:
                            raise CacheError(
                                f"{path}: tensor {name} has shape {f.get_slice(name).get_shape()}, expected {shape}"
                            )
                    layer.restore(_LazyTensors(f), lmeta, cache.placer)
            except SafetensorError as e:
                raise CacheError(f"{path}: unreadable safetensors file ({e})") from None
        if sparse is not None:
            load_pages(cache, folder, manifest, meta)
        cache.length = length
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
