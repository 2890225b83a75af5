"""Weight-only int4 / int8 matmuls: packing, dequantization, grouped-MoE matmul, dispatcher.

Storage (one convention for every quantized weight, ``[out, in]`` orientation as nn.Linear):

* int4: ``w`` int32 ``[..., N, ceil(K/8)]`` in compressed-tensors' ``pack-quantized`` layout:
  element k of a row sits in word ``k // 8`` at bits ``4 * (k % 8)``, stored as ``q + 8``
  (q in [-8, 7]); missing tail elements are 0 bits.
* int8: ``w`` int8 ``[..., N, K]``, q itself (the byte layout torch's packed op reads).
* ``scale`` ``[..., N, n_groups]`` in the model dtype; group g covers inputs
  ``[g * K / n_groups, (g + 1) * K / n_groups)`` (one group = per output channel).
* ``zero`` (optional, asymmetric checkpoints) int8 ``[..., N, n_groups]``.

Dequantized weight: ``(q - zero) * scale``, computed in fp32 (exact: a 4/8-bit integer times a
bf16/fp16 scale fits fp32's mantissa) and cast to the activation dtype. Every path is tested
against ``dequantize`` + matmul in the activation dtype.

``moe_matmul(x, w, scale, zero, counts=...)``: x ``(T, K)`` holds tokens sorted by expert,
``counts[e]`` of them for expert e (zero allowed); row block of expert e gets
``x_e @ dequantize(w[e]).T`` -> ``(T, N)`` in x's dtype. ``quant_matmul`` is its one-expert case.

``impl``: "reference" (dequantize each expert, matmul), "triton" (one launch for all experts,
dequantization fused into the K loop; an error if it cannot run), "auto" (triton on CUDA tensors,
or on CPU when TRITON_INTERPRET=1 asks for the interpreter; otherwise the CPU path: torch's
packed-weight ops for 1-16 bf16 rows, where they are the fastest CPU path, else the reference).
The CPU path's int4 packed layout is a second copy of the weights (``cpu_packed``): memory for
decode speed; "reference" avoids it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._env import KernelModule, device_blocker, use_triton

_IMPLS = ("auto", "triton", "reference")
_PACKED_MAX_ROWS = 16  # beyond this, dequantize + bf16 matmul beats torch's packed CPU ops
_kernels = KernelModule(f"{__package__}._quant_triton")


# ----------------------------------------------------------------------------- packing


def bits_of(w: torch.Tensor) -> int:
    """4 for int32-packed weights, 8 for int8 ones; TypeError otherwise."""
    if w.dtype == torch.int32:
        return 4
    if w.dtype == torch.int8:
        return 8
    raise TypeError(f"quantized weight must be int32 (packed int4) or int8, got {w.dtype}")


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed q ``[..., K]`` (values in the ``bits``-bit range) -> int32 ``[..., ceil(K·bits/32)]``,
    ``32 // bits`` per word, element k at bits ``bits * (k % per_word)`` stored as ``q + 2**(bits-1)``."""
    per = 32 // bits
    K = q.shape[-1]
    # In place on one int64 temporary: streaming loads quantize expert by expert, and each extra
    # full-size temporary here is 8 bytes per weight of the host's peak.
    u = q.to(torch.int64).add_(1 << (bits - 1)).bitwise_and_((1 << bits) - 1)
    pad = (-K) % per
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*q.shape[:-1], -1, per).bitwise_left_shift_(bits * torch.arange(per, device=q.device))
    word = u.sum(-1)  # disjoint bit fields: the sum is the bitwise or
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int32(w: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: int32 ``[..., words]`` -> int8 ``[..., K]`` signed values."""
    per = 32 // bits
    shifts = bits * torch.arange(per, device=w.device, dtype=torch.int32)
    u = (w[..., None] >> shifts) & ((1 << bits) - 1)
    return (u.reshape(*w.shape[:-1], -1)[..., :K] - (1 << (bits - 1))).to(torch.int8)


def int_values(w: torch.Tensor, K: int) -> torch.Tensor:
    """The signed integer weights ``[..., N, K]`` int8 of either storage."""
    return unpack_int32(w, 4, K) if bits_of(w) == 4 else w


def dequantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, *, K: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(q - zero) * scale`` ``[..., N, K]`` in ``dtype`` (default: the scale's), computed in fp32."""
    q = int_values(w, K).to(torch.int32)
    G = _group(K, scale)
    if zero is not None:
        q = q - zero.to(torch.int32).repeat_interleave(G, dim=-1)
    out = q.float() * scale.float().repeat_interleave(G, dim=-1)
    return out.to(dtype or scale.dtype)


def quantize(weight: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization of ``weight [..., N, K]`` along K.

    ``group_size=None`` is one scale per output channel. Returns (w, scale) in the storage above;
    scale = absmax / qmax in the weight's dtype (the quantization uses that rounded scale, so
    ``dequantize`` reproduces exactly what was rounded to). Raises ValueError naming the group
    size if it does not divide K."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    K = weight.shape[-1]
    G = K if group_size is None else int(group_size)
    if G <= 0 or K % G:
        raise ValueError(f"group_size={group_size} must be a positive divisor of the input dim {K}")
    qmax = (1 << (bits - 1)) - 1
    # The one fp32 temporary, contiguous even for a transposed view (so the grouping is a view).
    wf = torch.empty(weight.shape, dtype=torch.float32, device=weight.device).copy_(weight)
    wf = wf.view(*weight.shape[:-1], K // G, G)
    scale = (torch.maximum(wf.amax(-1), wf.amin(-1).neg_()) / qmax).to(weight.dtype)  # absmax / qmax, [..., N, K/G]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()[..., None]
    q = wf.div_(safe).round_().clamp_(-qmax - 1, qmax).to(torch.int8).reshape(weight.shape)
    return (pack_int32(q, 4) if bits == 4 else q), scale


def _group(K: int, scale: torch.Tensor) -> int:
    n_groups = scale.shape[-1]
    if n_groups == 0 or K % n_groups:
        raise ValueError(f"scale has {n_groups} groups, which does not divide the input dim {K}")
    return K // n_groups


# ----------------------------------------------------------------------------- checks


def _check(x, w, scale, zero, counts) -> list[int]:
    if x.dim() != 2:
        raise ValueError(f"x must be (T, K), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x has dtype {x.dtype}; supported: float16, bfloat16, float32")
    bits = bits_of(w)
    if w.dim() != 3 or scale.dim() != 3:
        raise ValueError(f"w and scale must be (E, N, ·), got {tuple(w.shape)} and {tuple(scale.shape)}")
    E, N, Kw = w.shape
    K = x.shape[1]
    want = -(-K // 8) if bits == 4 else K
    if Kw != want:
        raise ValueError(f"w has {Kw} columns; input dim {K} needs {want} for int{bits}")
    if scale.shape[:2] != (E, N):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match w {tuple(w.shape)}")
    _group(K, scale)
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"zero shape {tuple(zero.shape)} must equal scale shape {tuple(scale.shape)}")
    counts = [int(c) for c in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
    if len(counts) != E or min(counts, default=0) < 0 or sum(counts) != x.shape[0]:
        raise ValueError(f"counts must be {E} non-negative ints summing to {x.shape[0]} tokens, got {counts}")
    return counts


# ----------------------------------------------------------------------------- paths


def _reference(x, w, scale, zero, counts):
    out = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    lo = 0
    for e, n in enumerate(counts):
        if n:
            W = dequantize(w[e], scale[e], None if zero is None else zero[e], K=x.shape[1], dtype=x.dtype)
            out[lo : lo + n] = x[lo : lo + n] @ W.T
        lo += n
    return out


def cpu_packed(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, K: int):
    """Weights of one expert ``[N, ·]`` in the layout of torch's packed CPU op, or None where the op
    does not apply (int4: N % 16 == 0 and group 32-256; int8: per channel, no zero point).

    int8: the weight itself (no copy; the scales as a bf16 vector). int4: torch's own nibble
    order, a second copy of the weight (as many bytes, plus scales-and-zeros at twice the scale
    bytes); callers cache it, so a model decoding on CPU holds its int4 weights about twice.
    That is the price of the fast decode path: the packed op is tens of times faster at 1-16
    rows than unpacking + matmul, on AVX2 CPUs too, so it is not limited to CPUs with native
    bf16. ``impl="reference"`` (``longctx.quant.set_impl``) never builds it, and drops it."""
    N = w.shape[0]
    G = _group(K, scale)
    if bits_of(w) == 8:
        if G != K or zero is not None:
            return None
        return ("int8", w.contiguous(), scale[:, 0].to(torch.bfloat16).contiguous())
    if N % 16 or G not in (32, 64, 128, 256) or K % G:
        return None
    u = unpack_int32(w, 4, K).to(torch.int32) + 8  # the op's nibble convention: (u - 8) * s + z
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    s = scale.float().T  # [K/G, N]
    z = torch.zeros_like(s) if zero is None else -zero.float().T * s
    return ("int4", packed, torch.stack([s, z], -1).to(torch.bfloat16).contiguous(), G)


def _cpu_packed_mm(x: torch.Tensor, packed) -> torch.Tensor:
    if packed[0] == "int8":
        return torch.ops.aten._weight_int8pack_mm(x, packed[1], packed[2])
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[1], packed[3], packed[2])


def _cpu(x, w, scale, zero, counts, cache):
    """Per expert: torch's packed op for 1-16 bf16 rows, else dequantize + matmul. ``cache``
    (a dict the caller owns) keeps the packed layouts between calls; None disables the packed ops."""
    if cache is None or x.dtype != torch.bfloat16 or max(counts, default=0) > _PACKED_MAX_ROWS:
        return _reference(x, w, scale, zero, counts)
    out = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    lo = 0
    for e, n in enumerate(counts):
        if n:
            z = None if zero is None else zero[e]
            if e not in cache:
                cache[e] = cpu_packed(w[e], scale[e], z, x.shape[1])
            xe = x[lo : lo + n]
            if cache[e] is None:
                out[lo : lo + n] = xe @ dequantize(w[e], scale[e], z, K=x.shape[1], dtype=x.dtype).T
            else:
                out[lo : lo + n] = _cpu_packed_mm(xe.contiguous(), cache[e])
        lo += n
    return out


def _triton(x, w, scale, zero, counts):
    mod = _kernels.get()
    out_dtype = x.dtype
    if mod.INTERPRET and x.dtype == torch.bfloat16:
        x = x.float()  # the interpreter's tl.dot is wrong on bfloat16
    return mod.launch(x, w, scale, zero, counts).to(out_dtype)


# ----------------------------------------------------------------------------- public API


def moe_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    *,
    counts: Sequence[int] | torch.Tensor,
    impl: str = "auto",
    cpu_cache: dict | None = None,
) -> torch.Tensor:
    """Grouped matmul of expert-sorted tokens with quantized expert weights (module docstring).

    x (T, K) float; w (E, N, ceil(K/8)) int32 or (E, N, K) int8; scale (E, N, n_groups);
    zero None or int8 like scale; counts (E,) tokens per expert in x's order. Returns (T, N) in
    x's dtype. ``cpu_cache``: a dict owned by the caller (one per weight) in which the CPU path
    keeps torch's packed layouts; without it the CPU path always dequantizes."""
    counts = _check(x, w, scale, zero, counts)
    if x.shape[0] == 0:
        return x.new_empty(0, w.shape[1])
    if use_triton(impl, _IMPLS, device_blocker(x.device.type)):
        return _triton(x, w, scale, zero, counts)
    if impl == "auto" and x.device.type == "cpu":
        return _cpu(x, w, scale, zero, counts, cpu_cache)
    return _reference(x, w, scale, zero, counts)


def quant_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    cpu_cache: dict | None = None,
) -> torch.Tensor:
    """``x (..., K) @ dequantize(w).T`` -> (..., N): w (N, ·), scale (N, n_groups) (one expert)."""
    flat = x.reshape(-1, x.shape[-1])
    out = moe_matmul(
        flat,
        w[None],
        scale[None],
        None if zero is None else zero[None],
        counts=[flat.shape[0]],
        impl=impl,
        cpu_cache=cpu_cache,
    )
    return out.view(*x.shape[:-1], w.shape[0])


__all__ = [
    "bits_of",
    "dequantize",
    "int_values",
    "moe_matmul",
    "pack_int32",
    "quant_matmul",
    "quantize",
    "unpack_int32",
]
