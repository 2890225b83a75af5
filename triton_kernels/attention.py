"""Attention with absolute-position masks: dispatcher, checks, PyTorch reference, LSE merge.

Shapes: q (B, Hq, M, D); k, v (B, Hkv, N, D) with Hq % Hkv == 0. Query head h reads KV head
h // (Hq // Hkv) (GQA by head grouping). Query i sits at absolute position p = q_start + i,
key j at s = k_start + j. Key j is visible to query i iff

    (not causal or s <= p)  and  (chunk is None or s // chunk == p // chunk)

(fixed, non-overlapping chunks as in Llama 4's chunked layers, not a sliding window).
Every function returns (out, lse): out (B, Hq, M, D) in q's dtype, lse (B, Hq, M) float32,
the natural log of the sum of exp(scale * q.k) over visible keys. Rows that see no key get
out = 0 and lse = -inf, so they drop out of ``merge_attention``.

``impl``: "reference" (PyTorch, any device), "triton" (the kernel; an error if it cannot run),
"torch" (``flash_attention`` only: PyTorch's fused flash-attention kernel for CPU tensors, about
twice the reference's speed), "auto" (the kernel on CUDA tensors when triton imports, or on CPU
tensors when TRITON_INTERPRET=1 asks for triton's interpreter; else "torch" for
``flash_attention`` on CPU and the reference otherwise).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from ._env import KernelModule, device_blocker, use_triton

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_IMPLS = ("auto", "triton", "torch", "reference")
_TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)

# Reference blocking: query rows per block, and the budget (in fp32 elements) for one block of
# scores (B x Hq x rows x keys) or of fp32 K (B x Hkv x keys x D); 2**25 elements = 128 MiB.
# Key blocks never go below _REF_MIN_KEY_BLOCK keys (tiny matmuls would be all overhead).
_REF_BLOCK_M = 1024
_REF_SCORE_BUDGET = 1 << 25
_REF_MIN_KEY_BLOCK = 256
_INT32_MAX = 2**31 - 1  # the Triton kernel's in-slice key offsets are int32

_kernels = KernelModule(f"{__package__}._attention_triton")


# ----------------------------------------------------------------------------- checks


def _as_position(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int (an absolute token position), got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check(q, k, v, q_start, k_start, chunk, scale):
    """Validate arguments; return (q_start, k_start, chunk, scale) normalised."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    B, Hq, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"batch mismatch: q has {B}, k/v have {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"head dim mismatch: q has {D}, k/v have {k.shape[3]}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv}) for GQA")
    q_start = _as_position("q_start", q_start)
    k_start = _as_position("k_start", k_start)
    scale = D**-0.5 if scale is None else float(scale)
    return q_start, k_start, _as_chunk(chunk), scale


def _as_chunk(chunk) -> int | None:
    if chunk is None:
        return None
    chunk = _as_position("chunk", chunk)
    if chunk == 0:
        raise ValueError("chunk must be a positive int (or None for no chunking)")
    return chunk


def _key_band(lo: int, hi: int, k_start: int, n: int, causal: bool, chunk: int | None):
    """Key indices [n_lo, n_hi) that some query at absolute positions lo..hi may see."""
    n_lo, n_hi = 0, n
    if causal:
        n_hi = min(n_hi, hi - k_start + 1)
    if chunk is not None:
        n_lo = max(n_lo, (lo // chunk) * chunk - k_start)
        n_hi = min(n_hi, (hi // chunk + 1) * chunk - k_start)
    return n_lo, max(n_lo, n_hi)


def _row_blocks(M: int, N: int, q_start: int, k_start: int, causal: bool, chunk: int | None):
    """Blocks of up to ``_REF_BLOCK_M`` query rows that see some key: (m0, m1, n_lo, n_hi),
    rows [m0, m1) and the key band [n_lo, n_hi) they may see. Other rows keep out 0, lse -inf."""
    for m0 in range(0, M, _REF_BLOCK_M):
        m1 = min(M, m0 + _REF_BLOCK_M)
        n_lo, n_hi = _key_band(q_start + m0, q_start + m1 - 1, k_start, N, causal, chunk)
        if n_hi > n_lo:
            yield m0, m1, n_lo, n_hi


def visibility_mask(q_lo: int, q_hi: int, k_lo: int, k_hi: int, causal: bool, chunk: int | None, device=None):
    """Bool (queries q_lo..q_hi, keys k_lo..k_hi-1), absolute positions: which keys each sees."""
    pos_q = torch.arange(q_lo, q_hi + 1, device=device)[:, None]
    pos_k = torch.arange(k_lo, k_hi, device=device)[None, :]
    visible = torch.ones((q_hi - q_lo + 1, k_hi - k_lo), dtype=torch.bool, device=device)
    if causal:
        visible &= pos_k <= pos_q
    if chunk is not None:
        visible &= (pos_k // chunk) == (pos_q // chunk)
    return visible


def _empty_result(q, out_dtype=None):
    B, Hq, M, D = q.shape
    out = torch.zeros((B, Hq, M, D), dtype=out_dtype or q.dtype, device=q.device)
    return out, torch.full((B, Hq, M), float("-inf"), dtype=torch.float32, device=q.device)


# ----------------------------------------------------------------------------- dispatch


def _use_triton(impl: str, q: torch.Tensor) -> bool:
    """Decide the implementation; raise when "triton" is forced but cannot run."""
    why = device_blocker(q.device.type)
    if why is None and q.shape[-1] not in _TRITON_HEAD_DIMS:
        why = f"head dim {q.shape[-1]} is not one of {_TRITON_HEAD_DIMS}"
    return use_triton(impl, _IMPLS, why)


def _launch(q, k, v, **kw):
    """Launch the Triton kernel (``_attention_triton.launch``); returns what it returns, or
    fp32 (out, lse) when the keys had to be cut into pieces (see the int32 note).

    NOTE: triton's CPU interpreter computes tl.dot on bfloat16 as raw uint16 bit patterns
    (garbage, seen with triton 3.9). Under the interpreter, bf16 inputs are upcast to fp32
    (exact) and callers cast the result back; compiled GPU kernels take bf16 directly.
    NOTE: the kernel addresses keys with int32 offsets inside one (batch, head) slice; longer
    key ranges are cut into pieces below that limit and merged by LSE (exact)."""
    mod = _kernels.get()
    if mod.INTERPRET and q.dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    # The kernel takes any strides but needs a unit-stride head dim (contiguous rows).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    N, D = k.shape[2], k.shape[3]
    piece = (_INT32_MAX - D) // max(k.stride(2), v.stride(2), 1) - 256  # 256: tile overhang
    if N <= piece:
        return mod.launch(q, k, v, **kw)
    outs, lses = [], []
    for n0 in range(0, N, piece):
        o, lse = mod.launch(
            q,
            k[:, :, n0 : n0 + piece],
            v[:, :, n0 : n0 + piece],
            **dict(kw, k_start=kw["k_start"] + n0, out_dtype=torch.float32),
        )
        outs.append(o.reshape(-1, *q.shape))
        lses.append(lse.reshape(-1, *q.shape[:3]))
    return _merge_stacked(torch.cat(outs), torch.cat(lses))


# ----------------------------------------------------------------------------- public API


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int,
    k_start: int,
    causal: bool = True,
    chunk: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
):
    """Attention of q over k/v with the absolute-position mask (see the module docstring).

    Args: q (B, Hq, M, D); k, v (B, Hkv, N, D); q_start / k_start: absolute positions of the
    first query / key; chunk: Llama-4 attention chunk size or None; scale: default D**-0.5.
    Returns: out (B, Hq, M, D) in q.dtype, lse (B, Hq, M) float32 (natural log).
    """
    q_start, k_start, chunk, scale = _check(q, k, v, q_start, k_start, chunk, scale)
    use_triton = _use_triton(impl, q)
    M, N = q.shape[2], k.shape[2]
    if M == 0 or N == 0:
        return _empty_result(q)
    if use_triton:
        out, lse = _launch(
            q,
            k,
            v,
            q_start=q_start,
            k_start=k_start,
            causal=causal,
            chunk=chunk,
            scale=scale,
            pack_heads=M < 16,
            num_splits=1,
        )
        return out.to(q.dtype), lse
    fused = _FUSED_CPU is not None and q.device.type == "cpu"
    if impl == "torch" and not fused:
        why = (
            f"tensors are on {q.device.type}"
            if q.device.type != "cpu"
            else "this torch has no aten._scaled_dot_product_flash_attention_for_cpu"
        )
        raise RuntimeError(f"impl='torch' needs CPU tensors and torch's fused CPU attention op: {why}")
    if impl in ("auto", "torch") and fused:
        return _fused_cpu(q, k, v, q_start, k_start, causal, chunk, scale)
    return _reference(q, k, v, q_start, k_start, causal, chunk, scale)


def merge_attention(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """Combine (out, lse) pairs computed for the same queries over disjoint key sets.

    Exact (up to rounding) and order-independent: with w_i = exp(lse_i - max_j lse_j),
    out = sum_i w_i out_i / sum_i w_i and lse = max_j lse_j + log(sum_i w_i). Parts whose
    lse is -inf weigh nothing; rows where every part is -inf give out = 0, lse = -inf.
    Computes in fp32 on the first part's device; out takes the first part's out dtype.
    Shapes: out (..., D), lse (...) — usually (B, Hq, M, D) and (B, Hq, M).
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_attention needs at least one (out, lse) part")
    out0, lse0 = parts[0]
    device = out0.device
    for i, (o, lse) in enumerate(parts):
        if o.shape[:-1] != lse.shape or o.shape != out0.shape:
            raise ValueError(
                f"part {i}: out {tuple(o.shape)} / lse {tuple(lse.shape)} do not "
                f"match part 0: out {tuple(out0.shape)} / lse {tuple(lse0.shape)}"
            )
    out, lse = _merge_stacked(
        torch.stack([o.to(device=device, dtype=torch.float32) for o, _ in parts]),
        torch.stack([lse.to(device=device, dtype=torch.float32) for _, lse in parts]),
    )
    return out.to(out0.dtype), lse


def decode_attention(
    q: torch.Tensor,
    segments,
    *,
    q_start: int,
    causal: bool = True,
    chunk: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
):
    """Attention of a few queries over a long KV held as segments (flash-decoding).

    Args: q (B, Hq, M, D), M small (1..16 typical); segments: iterable of (k, v, k_start) with
    k, v (B, Hkv, N_i, D) on any device (moved to q.device only if some query can see them).
    Equals ``flash_attention`` over the concatenated keys. On the Triton path each segment's
    visible key range is cut into splits run by parallel programs, and all partial results
    are merged by LSE. Returns out (B, Hq, M, D) in q.dtype, lse (B, Hq, M) float32.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError("q must be a 4-D tensor (B, Hq, M, D)")
    if impl == "torch":  # a few queries over many segments: the fused op gains nothing there
        raise ValueError("impl='torch' is for flash_attention; decode_attention takes 'auto', 'triton' or 'reference'")
    use_triton = _use_triton(impl, q)
    M = q.shape[2]
    lo = _as_position("q_start", q_start)
    hi = lo + M - 1
    chunk = _as_chunk(chunk)
    parts = []
    for seg in segments:
        if len(seg) != 3:
            raise ValueError("each segment must be a (k, v, k_start) triple")
        k, v, k_start = seg
        ks = _as_position("k_start", k_start)
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError("segment k must be a 4-D tensor (B, Hkv, N, D)")
        # Skip segments no query can see before moving them (they may be on CPU or disk).
        n_lo, n_hi = _key_band(lo, hi, ks, k.shape[2], causal, chunk)
        if M == 0 or n_hi <= n_lo:
            continue
        k = k[:, :, n_lo:n_hi].to(q.device, non_blocking=True)
        v = v[:, :, n_lo:n_hi].to(q.device, non_blocking=True)
        _, ks, _, scale_c = _check(q, k, v, lo, ks + n_lo, chunk, scale)
        if use_triton:
            splits = _decode_splits(q, k.shape[1], n_hi - n_lo)
            out, lse = _launch(
                q,
                k,
                v,
                q_start=lo,
                k_start=ks,
                causal=causal,
                chunk=chunk,
                scale=scale_c,
                pack_heads=True,
                num_splits=splits,
                out_dtype=torch.float32,
            )
        else:
            out, lse = _reference(q, k, v, lo, ks, causal, chunk, scale_c, out_dtype=torch.float32)
        parts.append((out.reshape(-1, *q.shape), lse.reshape(-1, *q.shape[:3])))
    if not parts:
        return _empty_result(q)
    # One vectorised merge over all splits of all segments (a Python loop over hundreds of
    # small partials would cost more than the attention itself on a GPU).
    out, lse = _merge_stacked(torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts]))
    return out.to(q.dtype), lse


def _merge_stacked(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSE merge, the one implementation behind ``merge_attention`` and every internal
    merge: P partial results stacked on dim 0, outs (P, ..., D) and lses (P, ...), fp32, each
    normalised over its own keys. Returns (out (..., D), lse (...)) fp32; see ``merge_attention``."""
    m = lses.amax(dim=0)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # all -inf: shift by 0
    w = torch.exp(lses - m)  # (P, ...); exp(-inf) = 0 for partials that saw no key
    total = w.sum(dim=0)
    out = (outs * w.unsqueeze(-1)).sum(dim=0)
    out /= torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return out, m + torch.log(total)  # log(0) = -inf where no partial saw a key


def _decode_splits(q: torch.Tensor, hkv: int, n_keys: int) -> int:
    """How many key splits for one decode launch: enough programs to fill the device.

    A program owns (batch, KV head, split); splits shorter than ``min_len`` keys cost more in
    merging than they gain in parallelism."""
    B = q.shape[0]
    if q.device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
        min_len = 256
    else:  # interpreter: a few splits, so that tests exercise the split path
        target, min_len = 4, 64
    by_parallelism = max(1, target // max(1, B * hkv))
    return max(1, min(by_parallelism, n_keys // min_len))


# ----------------------------------------------------------------------------- fused CPU path

# aten's flash-attention kernel for CPU: blocked, vectorised, threaded, and it returns the LSE
# that segment merging needs (the public SDPA does not). Private but present since torch 2.2.
_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fused_cpu(q, k, v, q_start, k_start, causal, chunk, scale):
    """``flash_attention`` through ``_FUSED_CPU``, in fp32; arguments validated by ``_check``.

    Per block of query rows: keys that every row sees (a causal, unchunked layer's past) go
    in calls with no mask, in key blocks of bounded size; the rest of the band (the diagonal,
    or the chunks overlapping the block) in one call with an additive mask of at most
    rows x (rows + chunk) elements; the partial results are merged by LSE. GQA: the r query
    heads of a KV head are stacked as r * rows query rows of that head (K/V are never
    repeated), the mask tiled to match.
    """
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    r = Hq // Hkv
    out, lse_out = _empty_result(q)
    qg = q.reshape(B, Hkv, r, M, D)
    for m0, m1, n_lo, n_hi in _row_blocks(M, N, q_start, k_start, causal, chunk):
        mb = m1 - m0
        lo, hi = q_start + m0, q_start + m1 - 1
        qb = qg[:, :, :, m0:m1].reshape(B, Hkv, r * mb, D).float()
        # Keys [n_lo, n_open) are visible to every row of the block.
        n_open = n_lo if chunk is not None else max(n_lo, min(n_hi, lo - k_start + 1)) if causal else n_hi
        parts = []
        # The open keys go in blocks whose fp32 K/V copies (for fp16/bf16 inputs; fp32 is a
        # view) stay within the reference's budget: no transient O(context) copy.
        bn = max(_REF_MIN_KEY_BLOCK, _REF_SCORE_BUDGET // (B * Hkv * D))
        for n0 in range(n_lo, n_open, bn):
            n1 = min(n_open, n0 + bn)
            parts.append(_FUSED_CPU(qb, k[:, :, n0:n1].float(), v[:, :, n0:n1].float(), scale=scale)[:2])
        if n_hi > n_open:
            visible = visibility_mask(lo, hi, k_start + n_open, k_start + n_hi, causal, chunk)
            mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).repeat(r, 1)
            o, lse = _FUSED_CPU(
                qb, k[:, :, n_open:n_hi].float(), v[:, :, n_open:n_hi].float(), attn_mask=mask, scale=scale
            )[:2]
            seen = visible.any(dim=1).repeat(r)  # rows that see no key here: out 0, lse -inf
            parts.append((torch.where(seen[:, None], o, 0.0), torch.where(seen, lse, float("-inf"))))
        if len(parts) == 1:
            o, lse = parts[0]
        else:
            o, lse = _merge_stacked(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
        out[:, :, m0:m1] = o.reshape(B, Hq, mb, D).to(out.dtype)  # rows were (r, mb)
        lse_out[:, :, m0:m1] = lse.reshape(B, Hq, mb)
    return out, lse_out


# ----------------------------------------------------------------------------- reference


def _reference(q, k, v, q_start, k_start, causal, chunk, scale, out_dtype=None):
    """Blockwise PyTorch attention; arguments already validated by ``_check``.

    Memory stays O(block): queries go 1024 rows at a time; each query block reads only the key
    band it can see (for chunk-local layers: the chunks overlapping the block), in key blocks
    whose fp32 score matrix fits ``_REF_SCORE_BUDGET``, merged by LSE. GQA: the r query heads
    of a KV head are stacked as (B, Hkv, r * rows, D) so K/V are never repeated.
    """
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    r = Hq // Hkv
    out, lse_out = _empty_result(q, out_dtype)
    qg = q.reshape(B, Hkv, r, M, D)  # a view for contiguous q
    for m0, m1, n_lo, n_hi in _row_blocks(M, N, q_start, k_start, causal, chunk):
        mb = m1 - m0
        lo, hi = q_start + m0, q_start + m1 - 1
        qb = (qg[:, :, :, m0:m1].float() * scale).reshape(B, Hkv, r * mb, D)
        # Key block: bounded by the scores (B, Hq, mb, bn) and by the fp32 copies of the K/V
        # block (B, Hkv, bn, D), whichever is larger (decode: one query, many keys).
        bn = _REF_SCORE_BUDGET // max(B * Hq * mb, B * Hkv * D)
        bn = max(_REF_MIN_KEY_BLOCK, bn)
        acc = run_lse = None
        for n0 in range(n_lo, n_hi, bn):
            n1 = min(n_hi, n0 + bn)
            kb = k[:, :, n0:n1].float()
            s = qb @ kb.transpose(-1, -2)  # (B, Hkv, r * mb, nb)
            visible = visibility_mask(lo, hi, k_start + n0, k_start + n1, causal, chunk, q.device)
            if not bool(visible.all()):  # interior blocks skip the masking pass
                s = s.view(B, Hkv, r, mb, n1 - n0).masked_fill_(~visible, float("-inf"))
                s = s.view(B, Hkv, r * mb, n1 - n0)
            # Softmax in place on s (it is not needed again): every pass over the scores
            # costs as much as the matmul on CPU, so avoid logsumexp's extra passes.
            m = s.amax(dim=-1)  # -inf for rows with no visible key in this block
            m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
            p = s.sub_(m.unsqueeze(-1)).exp_()
            total = p.sum(dim=-1)  # 0 for rows with no visible key
            o = p @ v[:, :, n0:n1].float()  # (B, Hkv, r * mb, D)
            o /= torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)  # normalised here
            lse = m + torch.log(total)
            if acc is None:
                acc, run_lse = o, lse
            else:  # fold into the running result: memory stays one block, whatever the key count
                acc, run_lse = _merge_stacked(torch.stack((acc, o)), torch.stack((run_lse, lse)))
        out[:, :, m0:m1] = acc.reshape(B, Hq, mb, D).to(out.dtype)  # rows were (r, mb)
        lse_out[:, :, m0:m1] = run_lse.reshape(B, Hq, mb)
    return out, lse_out
