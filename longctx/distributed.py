"""Context parallelism: one context's KV spread over the ranks of a torch.distributed group.

    torch.distributed.init_process_group("gloo")          # or "nccl"; under torchrun
    cache = model.new_cache(context_parallel=True)        # or a process group
    logits = prefill(model, tokens, cache)                # every rank passes the same tokens

Layout. The first forward into an empty cache (the context) is cut into contiguous shards, one
per rank, whose boundaries fall on multiples of the attention chunk (``shard_bounds``; the last
shard ends where the context ends, mid-chunk or not). Chunked-local layers then never need
another rank's keys; only global layers talk. Each rank keeps its shard's global-layer KV in its
own cache, tiered by its own ``OffloadPolicy``. Every rank runs its whole shard in one forward
(the ring below needs every rank in the same layer at once), so a rank holds its shard's
activations, not just a prefill chunk's.

Prefill (pass-KV). In a global layer rank r's queries see their own keys causally and every key
of ranks < r, none of ranks > r. So KV blocks travel one way, along 0 → 1 → … → N-1: a rank
sends its own block to the next rank, then forwards each block it receives, while it attends to
the block in hand (the next receive is already posted). Partial results merge by LSE
(``merge_attention``), exactly. Afterwards the last rank's chunked-layer caches (its open
attention chunk) are broadcast, so all ranks hold the same local state.

Contiguous shards, not zig-zag: the last rank does the most global-attention work in prefill
(it attends over the whole context), but every rank holds 1/N of the KV, the decode tail lives
on one rank, and a shard is one span. ``benchmarks/context_parallel.py`` records the per-rank
times.

Later forwards (a question, decode steps) are replicated: every rank runs the same tokens; in a
global layer each rank attends over its own keys, the (out, LSE) pairs of all ranks are
gathered and merged in rank order (the same bits on every rank, so every rank samples the same
token), and the new keys go to the last rank. With sparse decode each rank reads the pages that
its own shard's bounds select (``top_pages`` per rank) and the merge is the same.

A context of fewer attention chunks than ranks is not sharded: it goes whole to the last rank.

Checks and faults. Every forward first gathers (position, token digest) from every rank, the
first one also the model fingerprint: a mismatch raises ``ContextParallelError`` on every rank
before any work, as does a prefill that some rank has no room for. Under gloo every wait runs
under the process group's timeout (``init_process_group(..., timeout=)``, 30 minutes by
default): a peer that died or hangs becomes a ``ContextParallelError`` naming the operation, at
the latest after that timeout (at once when the peer's connection closes). Under NCCL waits are
asynchronous on the GPU: a dead or hung peer is caught by NCCL's watchdog, which aborts the
process after the same timeout (``TORCH_NCCL_ASYNC_ERROR_HANDLING``), and ``comm_s`` counts
only host time. After a failed forward the cache is unusable on every rank.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from . import sparse
from .attention import attend
from .cache import ChunkedCache
from .kernels import merge_attention
from .offload import CacheError

if TYPE_CHECKING:
    from .cache import GlobalCache, KVCache
    from .model import Model


class ContextParallelError(RuntimeError):
    """Ranks that can't work together: different tokens or model, or a peer that died or hung."""


def join(device: torch.device, timeout: datetime.timedelta) -> tuple[int, int, bool]:
    """(world, rank, created): join torch.distributed when launched by torchrun (WORLD_SIZE > 1),
    NCCL for a model on ``device`` cuda, gloo otherwise, every collective bounded by ``timeout``;
    (1, 0, False) without torchrun. ``created``: this call made the group (the caller destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0, False
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), False
    cuda = device.type == "cuda"
    if cuda:
        local = os.environ.get("LOCAL_RANK")
        if local is not None and device.index != int(local):
            warnings.warn(
                f"the model is on {device} but LOCAL_RANK is {local}: under torchrun load it on "
                f"cuda:LOCAL_RANK (NCCL refuses two ranks on one GPU)",
                stacklevel=3,
            )
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return dist.get_world_size(), dist.get_rank(), True


def writer(context_parallel) -> bool:
    """Whether this process writes shared outputs for a ``context_parallel`` argument (False,
    True for the default group, or a group): rank 0 of the group does, or anyone without one."""
    if context_parallel is False or context_parallel is None:
        return True
    return dist.get_rank(None if context_parallel is True else context_parallel) == 0


def shard_bounds(tokens: int, world: int, chunk: int) -> list[tuple[int, int]] | None:
    """Contiguous shards [a, b) of ``tokens`` positions for ``world`` ranks, boundaries on
    multiples of ``chunk``, as even as whole chunks allow; None when there are fewer chunks than
    ranks (the context then goes whole to the last rank)."""
    chunks = -(-tokens // chunk)
    if chunks < world:
        return None
    cuts = [i * chunks // world * chunk for i in range(world)] + [tokens]
    return list(zip(cuts[:-1], cuts[1:]))


def _digest(*parts: bytes) -> int:
    """A 62-bit int of the SHA-256 of ``parts`` (fits an int64 tensor)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return int.from_bytes(h.digest()[:8], "little") >> 2


class ContextParallel:
    """One context over the ranks of ``group`` (None: the default group). Made by
    ``model.new_cache(context_parallel=...)`` and shared by the cache's forks.

    ``comm_s``: seconds this rank spent waiting on other ranks (transfers included)."""

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"):
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"context_parallel must be True, False or a torch.distributed ProcessGroup, got {group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ContextParallelError(
                "context parallelism needs torch.distributed: call torch.distributed.init_process_group first "
                "(torchrun sets the rank and world size)"
            )
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.peers = [dist.get_global_rank(group, r) if group is not None else r for r in range(self.world)]
        # gloo moves CPU tensors, NCCL those on the model's GPU (``device``).
        self.device = torch.device(device) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.shards: list[tuple[int, int]] | None = None  # set while a sharded forward runs
        self.comm_s = 0.0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    def __repr__(self) -> str:
        return f"ContextParallel(rank {self.rank} of {self.world}, {dist.get_backend(self.group)})"

    # ---- forward bracket (``Model.hidden``) -----------------------------------------------
    def begin(self, model: Model, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, int]:
        """Check that every rank feeds the same tokens at the same position (and, into an empty
        cache, the same model), then pick what this rank runs: (tokens (B, t), first position).
        Into an empty cache that is this rank's shard; otherwise all of ``tokens``."""
        first = cache.length == 0
        ids = np.asarray(tokens.detach().cpu(), dtype="<i8")
        mine = [cache.length, tokens.shape[0], tokens.shape[1], _digest(ids.tobytes())]
        mine.append(_digest(model.fingerprint.encode()) if first else 0)
        rows = self._all_gather(torch.tensor(mine, dtype=torch.int64), "check tokens").tolist()
        what = ("position", "batch", "token count", "token ids", "model fingerprint")
        for r, row in enumerate(rows):
            bad = [w for w, a, b in zip(what, row, rows[0]) if a != b]
            if bad:
                raise ContextParallelError(
                    f"rank {r} differs from rank 0 in {', '.join(bad)}: every rank must run the same model "
                    "on the same token ids; refused before any work"
                )
        self.shards = shard_bounds(tokens.shape[1], self.world, cache.chunk) if first else None
        if self.shards is None:
            return tokens, cache.length
        a, b = self.shards[self.rank]
        return tokens[:, a:b], a

    def check_room(self, cache: KVCache, tokens: int, bytes_per_token: int) -> None:
        """``cache.check_room`` for this rank's part of a prefill of ``tokens`` (its shard, or all
        of them on the last rank), decided together: if any rank has no room, every rank raises
        ``CacheError`` (the failing rank its own reason) before any work."""
        shards = shard_bounds(tokens, self.world, cache.chunk) if cache.length == 0 else None
        mine = shards[self.rank][1] - shards[self.rank][0] if shards else (tokens if self.last else 0)
        try:
            cache.check_room(mine, bytes_per_token)
            error = None
        except CacheError as e:
            error = e
        flags = self._all_gather(torch.tensor([error is not None], dtype=torch.int64), "check room").flatten()
        if error is not None:
            raise error
        if flags.any():
            ranks = ", ".join(str(r) for r in flags.nonzero().flatten().tolist())
            raise CacheError(f"rank {ranks} of {self.world} has no room for its part of the {tokens}-token prefill")

    def end(self, x: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor:
        """After the layers: hidden states of the whole forward on every rank, (B, T, d) or the
        last position's (B, 1, d) if ``last_only``. After a sharded forward the last rank's
        chunked-layer caches are copied to every rank."""
        if self.shards is None:
            return x[:, -1:] if last_only else x
        shards, self.shards = self.shards, None
        for layer in cache.layers:
            if isinstance(layer, ChunkedCache):  # the open attention chunk, from the last rank
                self._sync_chunked(layer)
        if last_only:
            return self._broadcast(x[:, -1:].contiguous(), "broadcast hidden")
        most = max(b - a for a, b in shards)
        padded = torch.nn.functional.pad(x, (0, 0, 0, most - x.shape[1])).contiguous()
        parts = self._all_gather(padded, "gather hidden")
        return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, shards)], 1)

    # ---- global-layer attention (``Attention.forward``) -----------------------------------
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, kv: GlobalCache, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention of q (B, Hq, M, D) at ``start`` over the whole context's keys, this
        rank's new keys k, v (B, Hkv, M, D) included; appends them where they belong (sharded:
        here; replicated: on the last rank). Returns out (B, Hq, M, D) and lse (B, Hq, M) fp32."""
        read = own = None  # sparse decode: each rank reads the pages its shard's bounds select
        if self.shards is None and q.shape[2] == 1 and kv.pages is not None:
            if self.last:
                kv.append(k, v, start)
            held = kv.pages.length > kv.pages.origin
            if held:
                out, lse, read = sparse.attend(q, kv, start, scale)
            parts = [(out, lse) if held else _empty(q)]
        else:
            own = kv.segments()
            if self.shards is not None or self.last:
                own.append((k, v, start))
                kv.append(k, v, start)
            held = any(seg[0].shape[2] for seg in own)
            parts = [attend(q, own, start, None, scale) if held else _empty(q)]
        seen = own
        if self.shards is not None:  # pass-KV pipeline: blocks of earlier ranks, nearest first
            for block in self._earlier_blocks(torch.stack([k, v])):
                seen.append(block)
                parts.append(attend(q, [block], start, None, scale))
            out, lse = merge_attention(parts) if len(parts) > 1 else parts[0]
        else:  # replicated: one partial per rank, merged in rank order everywhere
            out, lse = parts[0]
            flat = torch.cat([out.float().flatten(), lse.flatten()])
            stacked = self._all_gather(flat, "gather attention")
            n = out.numel()
            merged, lse = merge_attention([(s[:n].view(out.shape), s[n:].view(lse.shape)) for s in stacked])
            out = merged.to(out.dtype)  # the parts stay fp32 until merged
        if kv.stats is not None and read is not None:
            kv.stats.record_gathered(q, *read, lse, scale)
        elif kv.stats is not None and held:
            kv.stats.record(q, start, seen, lse, scale)
        return out, lse

    def _earlier_blocks(self, mine: torch.Tensor):
        """Yield (k, v, k_start) of every rank before this one (rank r-1 first): receives each
        from the previous rank and forwards it to the next, overlapping the next transfer with
        the caller's attention on the block in hand. ``mine``: this rank's (2, B, Hkv, n, D)."""
        r, shards = self.rank, self.shards
        sends = [self._isend(mine, r + 1, r)] if not self.last else []
        pending = self._irecv(mine, r - 1) if r > 0 else None
        for origin in range(r - 1, -1, -1):
            block = self._wait(pending, f"receive layer KV of rank {origin}")
            if origin > 0:
                pending = self._irecv(mine, origin - 1)
            if not self.last:
                # One block in flight at a time: a forwarding rank holds two, not all earlier ranks'.
                self._wait(sends.pop(), f"send layer KV to rank {r + 1}")
                sends.append(self._isend(block, r + 1, origin))
            yield block[0], block[1], shards[origin][0]
        for pending_send in sends:
            self._wait(pending_send, f"send layer KV to rank {r + 1}")

    def _irecv(self, like: torch.Tensor, origin: int):
        """Post the receive of ``origin``'s block (shaped as ``like`` but for its length) from
        the previous rank: (work, buffer)."""
        a, b = self.shards[origin]
        buf = like.new_empty((*like.shape[:3], b - a, like.shape[4]), device=self.device)
        return dist.irecv(buf, self.peers[self.rank - 1], group=self.group, tag=origin), buf

    def _isend(self, block: torch.Tensor, to: int, origin: int):
        """Post the send of ``origin``'s block to rank ``to``: (work, the tensor being sent)."""
        block = block.to(self.device).contiguous()
        return dist.isend(block, self.peers[to], group=self.group, tag=origin), block

    # ---- collectives, each a ContextParallelError on failure or timeout --------------------
    def _run(self, what: str, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except RuntimeError as e:  # gloo's errors and timeouts (DistBackendError, ...) are RuntimeErrors
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ContextParallelError(
                f"rank {self.rank} of {self.world}: {what} failed after {time.perf_counter() - t0:.1f} s "
                f"(a peer died, hung past the group's timeout, or left): {first[:300]}"
            ) from e
        finally:
            self.comm_s += time.perf_counter() - t0

    def _wait(self, pending, what: str) -> torch.Tensor:
        work, buf = pending
        self._run(what, work.wait)
        return buf

    def _all_gather(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """(world, *t.shape) on t's device: every rank's ``t``, in rank order."""
        dev = t.device
        t = t.to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._run(what, lambda: dist.all_gather(out, t, group=self.group))
        return torch.stack(out).to(dev)

    def _broadcast(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """The last rank's ``t`` (same shape and dtype on every rank)."""
        dev = t.device
        t = t.to(self.device).contiguous()
        self._run(what, lambda: dist.broadcast(t, self.peers[-1], group=self.group))
        return t.to(dev)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks (attention mass: each rank holds its own positions')."""
        dev = t.device
        t = t.to(self.device).contiguous()
        self._run("sum attention mass", lambda: dist.all_reduce(t, group=self.group))
        return t.to(dev)

    def _sync_chunked(self, layer) -> None:
        """Make ``layer`` (a ``ChunkedCache``) equal the last rank's: its start and open chunk."""
        n = 0 if layer.k is None else layer.k.shape[2]
        meta = self._broadcast(torch.tensor([layer.start, n], dtype=torch.int64), "broadcast chunked cache")
        start, n = meta.tolist()
        assert layer.k is not None, "a rank holds at least one chunk of its shard"
        shape = (2, *layer.k.shape[:2], n, layer.k.shape[3])
        kv = torch.stack([layer.k, layer.v]) if self.last else layer.k.new_empty(shape)
        if n:  # a context that ends on a chunk boundary leaves it empty
            kv = self._broadcast(kv, "broadcast chunked cache")
        layer.k, layer.v, layer.start = kv[0].clone(), kv[1].clone(), start


def _empty(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out, lse) of attending to no key, (zeros, -inf): a rank whose cache is empty still
    joins the merge."""
    return torch.zeros_like(q), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
