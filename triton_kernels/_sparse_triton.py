"""Triton kernel for Quest page scores (see ``sparse.py``); imported lazily, only when chosen.
``INTERPRET`` records the mode the kernel was decorated in (see ``_attention_triton.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._env import interpret_requested

INTERPRET = interpret_requested()


@triton.jit
def _page_scores(Q, LO, HI, OUT, N, G, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (batch x KV head, block of pages): loads each page bound once, for all G query heads.
    bh = tl.program_id(0).to(tl.int64)
    pages = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    ok = pages < N
    dim_ok = dims < HEAD_D
    offs = bh * N * HEAD_D + pages[:, None] * HEAD_D + dims[None, :]
    lo = tl.load(LO + offs, mask=ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    hi = tl.load(HI + offs, mask=ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for g in range(G):
        q = tl.load(Q + (bh * G + g) * HEAD_D + dims, mask=dim_ok, other=0.0).to(tl.float32)
        bound = tl.sum(tl.maximum(q[None, :] * lo, q[None, :] * hi), axis=1)
        best = tl.maximum(best, bound)
    tl.store(OUT + bh * N + pages, best, mask=ok)


def launch(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q (B, Hq, D), kmin/kmax (B, Hkv, N, D), contiguous -> (B, Hkv, N) float32."""
    B, Hkv, N, D = kmin.shape
    out = torch.empty((B, Hkv, N), dtype=torch.float32, device=q.device)
    block_n = 64
    grid = (B * Hkv, triton.cdiv(N, block_n))
    _page_scores[grid](
        q, kmin, kmax, out, N, q.shape[1] // Hkv, HEAD_D=D, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D)
    )
    return out
