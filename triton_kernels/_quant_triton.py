"""Triton grouped-MoE matmul on int4 / int8 weights (storage: see ``quant.py``).

Imported lazily by ``quant.py`` (only when the Triton path is chosen); see
``_attention_triton.py`` for why ``INTERPRET`` records the mode the kernel was decorated in.

One launch covers all experts: the host cuts each expert's (sorted) token rows into blocks of
BLOCK_M rows and passes a block table (expert, first row, end row); program (b, n) computes
rows of block b times columns [n·BLOCK_N, ...) of its expert. Empty experts get no block, so
nothing is padded. The K loop loads packed words, extracts the nibble / byte, subtracts the
zero point, multiplies by the group's scale in fp32 and feeds ``tl.dot`` in the activation dtype
with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._env import interpret_requested

INTERPRET = interpret_requested()


@triton.jit
def _moe_mm(
    X,
    W,
    S,
    Z,
    O,
    blk_expert,
    blk_row0,
    blk_row1,
    N,
    K,
    group_size,
    sxm,
    sxk,
    swe,
    swn,
    swk,
    sse,
    ssn,
    ssg,
    som,
    son,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_expert + b).to(tl.int64)
    r0 = tl.load(blk_row0 + b)
    r1 = tl.load(blk_row1 + b)
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < r1
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(X + rows[:, None] * sxm + ks[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wmask = k_ok[:, None] & col_ok[None, :]
        if BITS == 4:
            word = tl.load(W + e * swe + cols[None, :] * swn + (ks[:, None] // 8) * swk, mask=wmask, other=0)
            q = ((word >> ((ks[:, None] % 8) * 4)) & 15) - 8
        else:
            q = tl.load(W + e * swe + cols[None, :] * swn + ks[:, None] * swk, mask=wmask, other=0).to(tl.int32)
        g = ks[:, None] // group_size
        if HAS_ZERO:
            q = q - tl.load(Z + e * sse + cols[None, :] * ssn + g * ssg, mask=wmask, other=0).to(tl.int32)
        s = tl.load(S + e * sse + cols[None, :] * ssn + g * ssg, mask=wmask, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) * s).to(X.dtype.element_ty)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    tl.store(
        O + rows[:, None] * som + cols[None, :] * son,
        acc.to(O.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _blocks(counts: list[int], block_m: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block table: expert, first row, end row of each BLOCK_M-row block (empty experts: none)."""
    expert, row0, row1 = [], [], []
    lo = 0
    for e, n in enumerate(counts):
        for r in range(lo, lo + n, block_m):
            expert.append(e)
            row0.append(r)
            row1.append(lo + n)
        lo += n
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(expert), as_t(row0), as_t(row1)


def launch(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, counts: list[int]
) -> torch.Tensor:
    """x (T, K) sorted by expert, T > 0; arguments checked by ``quant.moe_matmul``."""
    T, K = x.shape
    E, N, _ = w.shape
    bits = 4 if w.dtype == torch.int32 else 8
    most = max(counts)
    block_m = 16 if most <= 16 else 32 if most <= 32 else 64
    block_n, block_k = 64, 64
    be, r0, r1 = _blocks(counts, block_m, x.device)
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    scale = scale.contiguous()
    z = scale if zero is None else zero.contiguous()  # same shape, so the same strides; any pointer when off
    grid = (be.numel(), triton.cdiv(N, block_n))
    _moe_mm[grid](
        x,
        w,
        scale,
        z,
        out,
        be,
        r0,
        r1,
        N,
        K,
        K // scale.shape[-1],
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        scale.stride(0),
        scale.stride(1),
        scale.stride(2),
        out.stride(0),
        out.stride(1),
        BITS=bits,
        HAS_ZERO=zero is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out
