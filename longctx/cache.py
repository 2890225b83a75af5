"""KV caches: a bounded cache for chunked-local layers, a tiered segment store for global ones.

A ``KVCache`` is passed explicitly to ``model(tokens, cache)``; it holds one layer cache per
decoder layer and the number of tokens seen (``length``), which advances once per forward.

* ``ChunkedCache`` (RoPE layers): a query at position p only sees keys in its own attention
  chunk [⌊p/C⌋·C, p], so after L tokens only positions [⌊L/C⌋·C, L) are kept — never more than
  C-1 tokens, whatever the context length (asserted on every append).
* ``GlobalCache`` (NoPE layers): every key is kept, in fixed segments of ``segment_tokens``.
  Sealed segments are immutable and live on one tier each: the model's device (up to
  ``OffloadPolicy.device_bytes``), CPU memory (up to ``cpu_bytes``; pinned when CUDA is
  present), or memory-mapped files in ``disk_dir``. The open tail segment stays on the device.
  Attention streams lower-tier segments up and merges per-segment results by LSE.

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
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT = "longctx-kvcache-1"
TIERS = ("device", "cpu", "disk")


class CacheError(RuntimeError):
    """A cache that can't be used: wrong model or text, missing files, no room on any tier."""


@dataclass
class OffloadPolicy:
    """Where global-layer KV segments go, filled in tier order device → cpu → disk.

    device_bytes / cpu_bytes: budgets in bytes for sealed segments of the whole cache
    (None = unlimited). disk_dir: folder for memory-mapped segment files (needed only when the
    budgets above run out). segment_tokens: tokens per segment (the unit of offloading).

    Attention costs some host work per segment, so larger segments decode faster: at 16,384
    tokens rather than 4,096, decode steps took 10.2 instead of 27.5 ms over 256K tokens of
    device-resident KV on an H200, and 6.9-7.1 instead of 9.9-10.5 ms over 64K tokens on 2 CPU
    cores (``benchmarks/results/gpu_2026-11-30.md``, ``decode_cpu_2026-11-30.md``, ``_2.md``). The open tail,
    up to one segment per global layer, stays on the device.
    """

    device_bytes: int | None = None
    cpu_bytes: int | None = None
    disk_dir: str | os.PathLike | None = None
    segment_tokens: int = 16384

    def __post_init__(self) -> None:
        if self.segment_tokens < 1:
            raise ValueError(f"OffloadPolicy.segment_tokens must be >= 1, got {self.segment_tokens}")
        for name in ("device_bytes", "cpu_bytes"):
            val = getattr(self, name)
            if val is not None and val < 0:
                raise ValueError(f"OffloadPolicy.{name} must be >= 0 or None, got {val}")


class _Placer:
    """Byte accounting per tier for one cache; decides where the next sealed segment goes."""

    def __init__(self, policy: OffloadPolicy, device: torch.device):
        self.policy, self.device = policy, torch.device(device)
        self.used = dict.fromkeys(TIERS, 0)

    def copy(self) -> "_Placer":
        p = _Placer(self.policy, self.device)
        p.used = dict(self.used)
        return p

    def tier_for(self, nbytes: int) -> str:
        pol = self.policy
        for tier, budget in (("device", pol.device_bytes), ("cpu", pol.cpu_bytes)):
            if budget is None or self.used[tier] + nbytes <= budget:
                return tier
        if pol.disk_dir is None:
            raise CacheError(
                f"KV cache is over its memory budgets (device {pol.device_bytes} B, cpu {pol.cpu_bytes} B) "
                "and OffloadPolicy.disk_dir is not set; give a folder for the disk tier or raise a budget")
        return "disk"

    def place(self, kv: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Store kv (2, B, H, n, D) on the next tier with room; returns (stored, tier)."""
        nbytes = kv.numel() * kv.element_size()
        tier = self.tier_for(nbytes)
        if tier == "device":
            out = kv.to(self.device, copy=True)
        elif tier == "cpu":
            out = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=torch.cuda.is_available())
            out.copy_(kv)
        else:
            out = _disk_tensor(Path(self.policy.disk_dir), kv)
        self.used[tier] += nbytes
        return out, tier


def _disk_tensor(folder: Path, kv: torch.Tensor) -> torch.Tensor:
    """Copy kv into a new memory-mapped file in folder; the file is deleted with the tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"kv-{uuid.uuid4().hex}.bin"
    nbytes = kv.numel() * kv.element_size()
    with open(path, "wb") as f:
        f.truncate(nbytes)
    out = torch.from_file(str(path), shared=True, size=kv.numel(), dtype=kv.dtype).view(kv.shape)
    out.copy_(kv)
    weakref.finalize(out.untyped_storage(), _unlink, str(path))
    return out


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class ChunkedCache:
    """Keys/values of the current attention chunk only: positions [⌊L/C⌋·C, L)."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.k = self.v = None  # (B, Hkv, n, D)
        self.start = 0

    def segments(self) -> list:
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

    def fork(self) -> "ChunkedCache":
        c = ChunkedCache(self.chunk)
        c.k, c.v, c.start = self.k, self.v, self.start  # append never mutates in place
        return c

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.k is None else {"k": self.k, "v": self.v}

    def restore(self, tensors: dict, meta: dict, placer: _Placer) -> None:
        if "k" in tensors:
            self.k, self.v = tensors["k"].to(placer.device), tensors["v"].to(placer.device)
        self.start = meta["start"]

    def meta(self) -> dict:
        return {"kind": "chunked", "start": self.start}


class GlobalCache:
    """Every key of a global layer, as sealed segments on tiers plus an open tail on device."""

    def __init__(self, placer: _Placer):
        self.placer = placer
        self.sealed: list[tuple[torch.Tensor, int, str]] = []  # (kv (2,B,H,n,D), start, tier)
        self.tail: torch.Tensor | None = None  # (2, B, H, n, D) on the device
        self.tail_start = 0
        self.mass: torch.Tensor | None = None  # (B, L) attention mass per key while recording

    @property
    def seg(self) -> int:
        return self.placer.policy.segment_tokens

    def segments(self) -> list:
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
                raise CacheError(f"global cache holds positions up to {self.tail_start + self.tail.shape[3]}, got {pos}")
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

    def fork(self, placer: _Placer) -> "GlobalCache":
        g = GlobalCache(placer)
        g.sealed, g.tail, g.tail_start = list(self.sealed), self.tail, self.tail_start
        g.mass = None if self.mass is None else self.mass.clone()
        return g

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"seg{i}": kv for i, (kv, _, _) in enumerate(self.sealed)}
        if self.tail is not None:
            out["tail"] = self.tail
        return out

    def restore(self, tensors: dict, meta: dict, placer: _Placer) -> None:
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

    def __init__(self, layer_kinds: list[str], chunk: int, batch: int, device, fingerprint: str,
                 offload: OffloadPolicy | None = None):
        self.offload = offload or OffloadPolicy()
        self.placer = _Placer(self.offload, device)
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

    def fork(self) -> "KVCache":
        """A cache that shares this one's sealed segments; appending to it leaves this one as is."""
        new = object.__new__(KVCache)
        new.__dict__.update(self.__dict__)
        new.placer = self.placer.copy()
        new.layers = [l.fork(new.placer) if isinstance(l, GlobalCache) else l.fork() for l in self.layers]
        new._hash = [h.copy() for h in self._hash]
        return new

    def record_attention(self, on: bool = True) -> None:
        """Start (or stop) recording, in every global layer, how much attention the queries of
        later forwards put on each key position (restarting from zero)."""
        for layer in self.layers:
            if isinstance(layer, GlobalCache):
                layer.mass = torch.zeros(self.batch, self.length) if on else None

    def attention_mass(self) -> torch.Tensor:
        """(B, length) fp32: attention probability mass per key position, summed over global
        layers, heads and the queries run since ``record_attention()``."""
        out = torch.zeros(self.batch, self.length)
        for layer in self.layers:
            if isinstance(layer, GlobalCache) and layer.mass is not None:
                n = min(layer.mass.shape[1], self.length)  # its capacity may exceed the length
                out[:, :n] += layer.mass[:, :n]
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
    def load(cls, folder: str | os.PathLike, model, *, tokens=None, offload: OffloadPolicy | None = None) -> "KVCache":
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

    def copy(self) -> "_FrozenHash":
        c = _FrozenHash(self._hex)
        c._tail = None if self._tail is None else self._tail.copy()
        return c

    def update(self, data: bytes) -> None:
        if self._tail is None:
            self._tail = hashlib.sha256()
        self._tail.update(data)
