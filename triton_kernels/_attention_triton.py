"""Triton flash-attention forward (prefill and split-KV decode) with absolute-position masks.

This module imports triton at the top and is itself imported lazily by ``attention.py`` (only
when the Triton path is chosen), so ``longctx.kernels`` works without triton installed.

NOTE (TRITON_INTERPRET): triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` *decorates* a
function (3.4+: through ``triton.knobs.runtime.interpret``; earlier: ``os.environ``), not when
the kernel is launched. A kernel decorated in compiled mode cannot run on CPU tensors and vice
versa. ``INTERPRET`` below records the mode this module was built in; the dispatcher re-imports
the module when the environment asks for the other mode (see ``_env.KernelModule``).

One kernel serves both uses:

* prefill (``flash_attention``): one program per (query block, batch x query head); one split.
* decode (``decode_attention``): the ``r = Hq // Hkv`` query heads that share a KV head are
  packed into the row dimension (rows = r * M), so a single token with GQA 5 fills 5 rows of
  one tile instead of 5 nearly empty tiles; and the key range is cut into ``num_splits``
  splits run by separate programs (flash-decoding). Each split writes an fp32 partial
  (out, lse) that the host merges with the LSE identity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._env import interpret_requested

# The mode the @triton.jit decorators below were applied in (see the module docstring).
INTERPRET = interpret_requested()

_LOG2E = 1.4426950408889634


@triton.jit
def _tile(
    acc,
    m_i,
    l_i,
    q,
    K,
    V,
    start_n,
    n_hi,
    pos_q,
    q_chunk_lo,
    k_start,
    chunk,
    scale_log2,
    stride_kn,
    stride_vn,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    CHUNKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key tile [start_n, start_n + BLOCK_N) of the online softmax.

    K, V point at this (batch, KV head)'s first key. Works in base 2: scores are
    pre-multiplied by log2(e) so exp2 replaces exp; m_i is the running row max, l_i the
    running row sum, acc the unnormalised fp32 output."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    # NOTE: int32 offsets inside one (batch, head) slice: int64 ones cost registers in the loop
    # (measured: more ptxas spills at D=128). The host keeps N * stride below 2**31.
    k_ptrs = K + (start_n + offs_n)[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + (start_n + offs_n)[:, None] * stride_vn + offs_d[None, :]
    if MASKED:
        in_range = (start_n + offs_n) < n_hi
        k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N) fp32
    if MASKED:
        pos_k = (k_start + start_n + offs_n)[None, :]
        visible = in_range[None, :]
        if CAUSAL:
            visible = visible & (pos_k <= pos_q[:, None])
        if CHUNKED:  # same chunk as the query: [q_chunk_lo, q_chunk_lo + chunk)
            visible = visible & (pos_k >= q_chunk_lo[:, None])
            if not CAUSAL:  # (causal already implies pos_k < the query's chunk end)
                visible = visible & (pos_k < q_chunk_lo[:, None] + chunk)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # NOTE: a row whose keys are all masked so far has m_new = -inf; subtracting it would give
    # nan (-inf - -inf). Shift by 0 instead: exp2(-inf - 0) = 0 keeps such rows at zero.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["q_start", "k_start"])
def _attn_fwd(
    Q,
    K,
    V,
    O,
    L,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_os,
    stride_ob,
    stride_oh,
    stride_om,
    stride_ls,
    stride_lb,
    stride_lh,
    n_groups,
    M,
    N,
    q_start,
    k_start,
    chunk,
    scale_log2,
    split_len,
    GQA: tl.constexpr,
    G: tl.constexpr,
    CAUSAL: tl.constexpr,
    CHUNKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid: (row blocks, B * n_groups, splits). A program owns BLOCK_M rows of one row group:
    the G query heads [grp*G, grp*G + G) laid end to end (row = h_local * M + query index).
    G = 1 for prefill; G = GQA (all heads of one KV head) for decode."""
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bg // n_groups
    grp = pid_bg % n_groups
    kv_head = (grp * G) // GQA

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * M
    head = grp * G + rows // M  # query head of each row
    qi = rows % M  # query index inside its head
    pos_q = q_start + qi  # absolute query positions

    # Absolute position range [lo, hi] of this block's valid rows. With packed heads a block
    # may wrap from one head into the next; then the positions cover the whole query range.
    first = pid_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, G * M) - 1
    one_head = (first // M) == (last // M)
    lo = q_start + tl.where(one_head, first % M, 0)
    hi = q_start + tl.where(one_head, last % M, M - 1)

    # Key index band [n_lo, n_hi) any row may see, and the prefix [n_lo, full_hi) every row
    # sees (no mask needed there). Everything outside the band is skipped, which is what makes
    # chunk-local attention cost O(M * chunk) instead of O(M * N).
    n_lo = pid_s * split_len
    n_hi = tl.minimum(N, n_lo + split_len)
    full_hi = n_hi
    if CAUSAL:
        n_hi = tl.minimum(n_hi, hi - k_start + 1)
        full_hi = tl.minimum(full_hi, lo - k_start + 1)
    if CHUNKED:
        c_lo = lo // chunk  # positions are >= 0, so // is a floor
        c_hi = hi // chunk
        n_lo = tl.maximum(n_lo, c_lo * chunk - k_start)
        n_hi = tl.minimum(n_hi, (c_hi + 1) * chunk - k_start)
        # Rows in two different chunks share no key: then no tile is fully visible. (Within one
        # chunk the chunk's end is already in n_hi.)
        full_hi = tl.where(c_lo == c_hi, full_hi, n_lo)
    full_hi = tl.minimum(tl.maximum(full_hi, n_lo), n_hi)  # n_lo <= full_hi <= n_hi
    # Unmasked tiles are whole BLOCK_N tiles of [n_lo, full_hi); the rest are boundary tiles.
    full_end = n_lo + ((full_hi - n_lo) // BLOCK_N) * BLOCK_N

    offs_d = tl.arange(0, HEAD_D)
    q_off = b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + qi.to(tl.int64) * stride_qm
    q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    K += b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    # Start of each query's chunk (the chunk mask becomes two compares, no division per key).
    q_chunk_lo = pos_q
    if CHUNKED:
        q_chunk_lo = (pos_q // chunk) * chunk

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    for start_n in range(n_lo, full_end, BLOCK_N):
        acc, m_i, l_i = _tile(
            acc,
            m_i,
            l_i,
            q,
            K,
            V,
            start_n,
            n_hi,
            pos_q,
            q_chunk_lo,
            k_start,
            chunk,
            scale_log2,
            stride_kn,
            stride_vn,
            False,
            CAUSAL,
            CHUNKED,
            BLOCK_N,
            HEAD_D,
            PRECISION,
        )
    for start_n in range(full_end, n_hi, BLOCK_N):
        acc, m_i, l_i = _tile(
            acc,
            m_i,
            l_i,
            q,
            K,
            V,
            start_n,
            n_hi,
            pos_q,
            q_chunk_lo,
            k_start,
            chunk,
            scale_log2,
            stride_kn,
            stride_vn,
            True,
            CAUSAL,
            CHUNKED,
            BLOCK_N,
            HEAD_D,
            PRECISION,
        )

    # Rows with no visible key: out = 0, lse = -inf (they vanish in an LSE merge).
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(
        has_key,
        (m_i + tl.math.log2(l_safe)) * 0.6931471805599453,  # * ln 2
        float("-inf"),
    )
    o_off = (
        pid_s.to(tl.int64) * stride_os
        + b.to(tl.int64) * stride_ob
        + head.to(tl.int64) * stride_oh
        + qi.to(tl.int64) * stride_om
    )
    tl.store(O + o_off[:, None] + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    l_off = pid_s.to(tl.int64) * stride_ls + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + qi
    tl.store(L + l_off, lse, mask=row_ok)


def _blocks(head_dim: int, m_rows: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch.

    NOTE: the GPU values are a plain FA2-style starting point sized to fit shared memory
    (fp32 tiles are twice as large, hence smaller blocks and fewer stages); they were not
    autotuned. The interpreter prefers small tiles (less wasted work on ragged edges)."""
    if device.type != "cuda":
        return 32, 32, 4, 1
    block_m = 128 if m_rows >= 128 else max(16, triton.next_power_of_2(m_rows))
    block_n, stages = (64, 3) if head_dim <= 128 else (32, 2)
    if head_dim > 128:
        block_m = min(block_m, 64)
    if dtype == torch.float32:
        block_m, block_n, stages = min(block_m, 64 if head_dim <= 128 else 32), 32, 2
    return block_m, block_n, (8 if block_m >= 128 else 4), stages


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int,
    k_start: int,
    causal: bool,
    chunk: int | None,
    scale: float,
    pack_heads: bool,
    num_splits: int,
    out_dtype: torch.dtype | None = None,
):
    """Launch the kernel on already-validated tensors (see ``attention._check``).

    q (B, Hq, M, D), k/v (B, Hkv, N, D), last dim unit-stride, same device and dtype.
    With ``num_splits == 1`` returns (out (B, Hq, M, D) in ``out_dtype`` (default q.dtype),
    lse fp32 (B, Hq, M)).
    With ``num_splits > 1`` returns fp32 partials (S, B, Hq, M, D) and (S, B, Hq, M), one per
    contiguous key split, to be combined with ``merge_attention``.
    """
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    gqa = Hq // Hkv
    G = gqa if pack_heads else 1
    n_groups = Hq // G
    rows = G * M
    block_m, block_n, num_warps, num_stages = _blocks(D, rows, q.dtype, q.device)
    # Split length: a multiple of BLOCK_N so that split edges fall on tile edges.
    split_len = triton.cdiv(triton.cdiv(N, num_splits), block_n) * block_n if N else block_n
    num_splits = max(1, triton.cdiv(N, split_len)) if N else 1
    S = num_splits
    if S == 1:
        out = torch.empty((B, Hq, M, D), device=q.device, dtype=out_dtype or q.dtype)
        lse = torch.empty((B, Hq, M), device=q.device, dtype=torch.float32)
        so, sl = (0,) + tuple(out.stride()[:3]), (0,) + tuple(lse.stride()[:2])
    else:
        out = torch.empty((S, B, Hq, M, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((S, B, Hq, M), device=q.device, dtype=torch.float32)
        so, sl = tuple(out.stride()[:4]), tuple(lse.stride()[:3])
    # NOTE: fp32 inputs must not silently use TF32 on the tensor cores (1e-3 relative error,
    # far above the fp32 bar); fp16/bf16 ignore the setting.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(rows, block_m), B * n_groups, S)
    _attn_fwd[grid](
        q,
        k,
        v,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        *so,
        *sl,
        n_groups,
        M,
        N,
        q_start,
        k_start,
        chunk if chunk else 1,
        scale * _LOG2E,
        split_len,
        GQA=gqa,
        G=G,
        CAUSAL=bool(causal),
        CHUNKED=chunk is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_D=D,
        PRECISION=precision,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse
