"""Tests for longctx.kernels: flash_attention, merge_attention, decode_attention.

The oracle is a naive full-matrix softmax written here (independent of the production
reference) and evaluated in float64. The error bar is flash-attention's: an implementation may
be at most 2x as far from the oracle as the same naive softmax computed in the input precision
("plain PyTorch"), with a small absolute floor.

The Triton kernel runs on CUDA when there is a GPU, otherwise on CPU through triton's
interpreter. NOTE: triton decides interpreter-or-compiled when @triton.jit decorates a kernel
(read from TRITON_INTERPRET); longctx.kernels re-imports its Triton module whenever the
variable's value changed, so the ``triton_device`` fixture can switch the interpreter on for
one test only (monkeypatch) without leaking it into the rest of the suite.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx.kernels import attention as attn_mod
from longctx.kernels import decode_attention, flash_attention, merge_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# Absolute error floors: below these, "2x plain PyTorch" is just rounding noise.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


# ----------------------------------------------------------------------------- oracle


def naive_attention(q, k, v, *, q_start, k_start, causal, chunk, scale=None, dtype=torch.float64):
    """Full-matrix masked softmax attention computed in ``dtype``; K/V repeated for GQA."""
    B, Hq, M, D = q.shape
    N = k.shape[2]
    r = Hq // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    s = (q @ k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    p = torch.arange(q_start, q_start + M, device=q.device)[:, None]
    j = torch.arange(k_start, k_start + N, device=q.device)[None, :]
    mask = torch.ones(M, N, dtype=torch.bool, device=q.device)
    if causal:
        mask &= j <= p
    if chunk is not None:
        mask &= torch.div(j, chunk, rounding_mode="floor") == torch.div(p, chunk, rounding_mode="floor")
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s.float(), dim=-1)
    out = torch.softmax(s, dim=-1).nan_to_num(0.0) @ v  # rows with no key: softmax is nan -> 0
    return out, lse


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def lse_err(a, b):
    """Max |a - b| over finite entries; -inf entries must coincide exactly."""
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), "rows with no visible key differ"
    fin = torch.isfinite(b)
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


def assert_within_bar(out, lse, q, k, v, **mask):
    """out/lse at most 2x as far from the fp64 oracle as plain PyTorch in q's precision."""
    ref_o, ref_l = naive_attention(q.cpu(), k.cpu(), v.cpu(), **mask)
    pt_o, pt_l = naive_attention(q, k, v, dtype=q.dtype, **mask)
    floor = FLOOR[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    err, pt_err = max_err(out.cpu(), ref_o), max_err(pt_o.cpu(), ref_o)
    assert err <= max(2 * pt_err, floor), f"out error {err:.3g} vs plain PyTorch {pt_err:.3g}"
    err, pt_err = lse_err(lse, ref_l), lse_err(pt_l, ref_l)
    assert err <= max(2 * pt_err, floor), f"lse error {err:.3g} vs plain PyTorch {pt_err:.3g}"


def make_qkv(B, Hq, Hkv, M, N, D, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


# Awkward cases: (B, Hq, Hkv, M, N, D, q_start, k_start, causal, chunk)
CASES = [
    pytest.param(1, 1, 1, 1, 1, 64, 0, 0, True, None, id="one-token"),
    pytest.param(2, 4, 4, 97, 97, 64, 0, 0, True, None, id="causal-97-gqa1"),
    pytest.param(1, 8, 2, 97, 130, 128, 33, 0, True, None, id="offset-prefill-gqa4-d128"),
    pytest.param(1, 5, 1, 97, 97, 64, 50, 20, True, 24, id="chunk24-gqa5-offsets"),
    pytest.param(1, 10, 2, 1, 97, 64, 96, 0, True, 40, id="decode-1-gqa5-chunk"),
    pytest.param(1, 4, 1, 17, 40, 32, 25, 30, True, None, id="some-rows-masked"),
    pytest.param(1, 2, 2, 40, 33, 64, 0, 100, True, None, id="all-rows-masked"),
    pytest.param(2, 10, 2, 97, 61, 16, 7, 3, False, None, id="noncausal-gqa5"),
    pytest.param(1, 4, 1, 97, 97, 64, 10, 0, False, 32, id="noncausal-chunk32"),
    pytest.param(1, 2, 1, 20, 20, 64, 3, 3, True, 1, id="chunk1"),
    pytest.param(1, 3, 3, 5, 200, 256, 150, 0, True, 64, id="d256"),
    # few queries: GQA heads packed into rows, with row blocks straddling two heads
    pytest.param(1, 10, 2, 7, 60, 64, 50, 0, True, None, id="packed-heads-straddle"),
    # non-causal chunks spanning whole key tiles (exercises the unmasked-tile bound)
    pytest.param(1, 2, 1, 70, 150, 64, 0, 0, False, 64, id="noncausal-chunk64-full-tiles"),
]
BIG_CASES = [  # 1025 tokens: a few seconds each in the interpreter
    pytest.param(1, 1, 1, 1025, 1025, 64, 0, 0, True, None, id="causal-1025"),
    pytest.param(1, 1, 1, 1025, 1025, 64, 1000, 1000, True, 300, id="chunk300-1025-offset"),
]


# ----------------------------------------------------------------------------- flash_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,M,N,D,q_start,k_start,causal,chunk", CASES + BIG_CASES)
def test_reference_within_bar(B, Hq, Hkv, M, N, D, q_start, k_start, causal, chunk, dtype):
    q, k, v = make_qkv(B, Hq, Hkv, M, N, D, dtype)
    mask = dict(q_start=q_start, k_start=k_start, causal=causal, chunk=chunk)
    out, lse = flash_attention(q, k, v, impl="reference", **mask)
    assert_within_bar(out, lse, q, k, v, **mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,M,N,D,q_start,k_start,causal,chunk", CASES + BIG_CASES)
def test_fused_cpu_within_bar(B, Hq, Hkv, M, N, D, q_start, k_start, causal, chunk, dtype):
    """impl="torch" (aten's fused CPU kernel, auto's choice on CPU) against the bar, and equal
    to the reference up to fp32 rounding; fully masked rows give out 0, lse -inf there too."""
    q, k, v = make_qkv(B, Hq, Hkv, M, N, D, dtype)
    mask = dict(q_start=q_start, k_start=k_start, causal=causal, chunk=chunk)
    out, lse = flash_attention(q, k, v, impl="torch", **mask)
    assert_within_bar(out, lse, q, k, v, **mask)
    ref_out, ref_lse = flash_attention(q, k, v, impl="reference", **mask)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert max_err(out, ref_out) <= {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert lse_err(lse, ref_lse) <= 1e-5


def test_fused_cpu_key_blocks(monkeypatch):
    """With a small budget the fused path splits the open keys into several blocks (as it does
    at long contexts) and still equals the reference."""
    monkeypatch.setattr(attn_mod, "_REF_SCORE_BUDGET", 1)  # blocks of _REF_MIN_KEY_BLOCK keys
    q, k, v = make_qkv(1, 5, 1, 97, 1100, 64, torch.bfloat16)
    mask = dict(q_start=1003, k_start=0, causal=True, chunk=None)
    out, lse = flash_attention(q, k, v, impl="torch", **mask)
    assert_within_bar(out, lse, q, k, v, **mask)
    ref_out, ref_lse = flash_attention(q, k, v, impl="reference", **mask)
    assert max_err(out, ref_out) <= 1.6e-2 and lse_err(lse, ref_lse) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,M,N,D,q_start,k_start,causal,chunk", CASES + BIG_CASES)
def test_triton_within_bar(triton_device, B, Hq, Hkv, M, N, D, q_start, k_start, causal, chunk, dtype):
    # NOTE: fp16/fp32 only here: the interpreter's tl.dot is wrong on bfloat16 (see below).
    q, k, v = make_qkv(B, Hq, Hkv, M, N, D, dtype, triton_device)
    mask = dict(q_start=q_start, k_start=k_start, causal=causal, chunk=chunk)
    out, lse = flash_attention(q, k, v, impl="triton", **mask)
    assert_within_bar(out, lse, q, k, v, **mask)
    # The dispatcher's two implementations agree to output rounding (fp16: about one ulp).
    ref_out, ref_lse = flash_attention(q, k, v, impl="reference", **mask)
    assert max_err(out, ref_out) <= (4e-3 if dtype == torch.float16 else 1e-5)
    assert lse_err(lse, ref_lse) <= 1e-5


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 tl.dot needs a GPU (interpreter is wrong on bf16)")
@pytest.mark.parametrize("B,Hq,Hkv,M,N,D,q_start,k_start,causal,chunk", CASES + BIG_CASES)
def test_triton_bf16_cuda(B, Hq, Hkv, M, N, D, q_start, k_start, causal, chunk):
    q, k, v = make_qkv(B, Hq, Hkv, M, N, D, torch.bfloat16, "cuda")
    mask = dict(q_start=q_start, k_start=k_start, causal=causal, chunk=chunk)
    out, lse = flash_attention(q, k, v, impl="triton", **mask)
    assert_within_bar(out, lse, q, k, v, **mask)


# Run in a fresh interpreter: this process imported triton in interpreter mode (conftest), and
# triton's compiler cannot work on language objects created in that mode.
_AOT_SCRIPT = """
import sys, torch
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton
except ImportError:
    sys.exit(3)  # this triton has no ahead-of-time compile API
from longctx.kernels import attention as attn_mod
mod = attn_mod._kernels.get()
assert not mod.INTERPRET
dtype, D, rows, G = getattr(torch, sys.argv[1]), *map(int, sys.argv[2:])
class Dev:
    type = "cuda"
bm, bn, warps, stages = mod._blocks(D, rows, dtype, Dev)
consts = dict(GQA=5, G=G, CAUSAL=True, CHUNKED=True, BLOCK_M=bm, BLOCK_N=bn, HEAD_D=D, PRECISION="tf32")
ty = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
names = mod._attn_fwd.arg_names
sig = {n: "*" + ty if n in ("Q", "K", "V", "O") else "*fp32" if n == "L"
       else "constexpr" if n in consts else "fp32" if n == "scale_log2" else "i32" for n in names}
src = ASTSource(fn=mod._attn_fwd, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
try:
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
except RuntimeError as e:
    if "ptxas" in str(e).lower():
        sys.exit(3)  # cannot assemble for sm_90 in this install
    raise
print("shared bytes", kernel.metadata.shared)
assert kernel.metadata.shared <= 227 * 1024  # H100 shared memory per block
"""


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the kernel tests compile and run it for real")
@pytest.mark.parametrize("dtype,D,rows,G", [("bfloat16", 128, 8192, 1), ("float16", 64, 5, 5)])
def test_kernel_compiles_for_hopper(dtype, D, rows, G):
    """Ahead-of-time compile for sm_90 (no GPU needed): catches what the interpreter cannot,
    e.g. code that only fails in the compiled frontend or tiles that overflow shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset
    res = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT, dtype, str(D), str(rows), str(G)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode == 3:
        pytest.skip("no ahead-of-time compile for sm_90 in this triton install")
    assert res.returncode == 0, res.stderr[-3000:]


@needs_triton
@pytest.mark.skipif(
    HAS_CUDA, reason="triton was imported in compiled mode here; a GPU-less run tests the interpreter path"
)
def test_interpreter_bf16_workaround(monkeypatch):
    """Under the interpreter bf16 inputs are upcast before the kernel (tl.dot on bf16 is
    garbage there); the dispatcher must still return bf16 within the bar."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = make_qkv(1, 5, 1, 40, 70, 64, torch.bfloat16)
    mask = dict(q_start=30, k_start=0, causal=True, chunk=32)
    out, lse = flash_attention(q, k, v, impl="triton", **mask)
    assert_within_bar(out, lse, q, k, v, **mask)


def test_scale_and_noncontiguous_inputs(triton_device):
    """Custom scale; q/k/v as transposed (B, T, H, D) views, as the attention module makes."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 37, 6, 64, generator=g).to(triton_device).transpose(1, 2)
    k = torch.randn(2, 50, 2, 64, generator=g).to(triton_device).transpose(1, 2)
    v = torch.randn(2, 50, 2, 64, generator=g).to(triton_device).transpose(1, 2)
    mask = dict(q_start=13, k_start=0, causal=True, chunk=None, scale=0.3)
    for impl in ("reference", "triton"):
        out, lse = flash_attention(q, k, v, impl=impl, **mask)
        assert_within_bar(out, lse, q, k, v, **mask)


def test_triton_cuts_keys_beyond_int32_offsets(triton_device, monkeypatch):
    """Key ranges whose int32 offsets would overflow are run in pieces and merged."""
    monkeypatch.setattr(attn_mod, "_INT32_MAX", 64 * 300)  # pieces of 300 - 256 = 44 keys
    q, k, v = make_qkv(1, 4, 2, 9, 150, 64, torch.float32, triton_device)
    mask = dict(q_start=120, k_start=0, causal=True, chunk=None)
    out, lse = flash_attention(q, k, v, impl="triton", **mask)
    assert_within_bar(out, lse, q, k, v, **mask)
    out, lse = decode_attention(q, [(k, v, 0)], q_start=120, impl="triton")
    assert_within_bar(out, lse, q, k, v, **mask)


# ----------------------------------------------------------------------------- reference blocking


@settings(deadline=None, max_examples=40)
@given(
    M=st.integers(1, 70),
    N=st.integers(1, 90),
    r=st.sampled_from([1, 2, 5]),
    q_start=st.integers(0, 80),
    k_start=st.integers(0, 80),
    causal=st.booleans(),
    chunk=st.one_of(st.none(), st.integers(1, 40)),
)
def test_reference_blockwise_equals_naive(M, N, r, q_start, k_start, causal, chunk):
    """Tiny query and key blocks force many blocks, band edges and LSE folds."""
    q, k, v = make_qkv(1, 2 * r, 2, M, N, 16, torch.float32, seed=M * 100 + N)
    mask = dict(q_start=q_start, k_start=k_start, causal=causal, chunk=chunk)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attn_mod, "_REF_BLOCK_M", 7)
        mp.setattr(attn_mod, "_REF_MIN_KEY_BLOCK", 5)
        mp.setattr(attn_mod, "_REF_SCORE_BUDGET", 1)
        out, lse = flash_attention(q, k, v, impl="reference", **mask)
    ref_o, ref_l = naive_attention(q, k, v, **mask)
    assert max_err(out, ref_o) < 1e-5
    assert lse_err(lse, ref_l) < 1e-5


# ----------------------------------------------------------------------------- merge_attention


def split_points(draw_cuts, n):
    cuts = sorted(set(c for c in draw_cuts if 0 < c < n))
    return list(zip([0] + cuts, cuts + [n]))


@settings(deadline=None, max_examples=40)
@given(
    N=st.integers(1, 120),
    cuts=st.lists(st.integers(0, 120), max_size=6),
    M=st.integers(1, 30),
    q_start=st.integers(0, 150),
    causal=st.booleans(),
    chunk=st.one_of(st.none(), st.integers(1, 50)),
    order=st.randoms(use_true_random=False),
)
def test_merge_of_segments_equals_unsplit(N, cuts, M, q_start, causal, chunk, order):
    k_start = 10
    q, k, v = make_qkv(1, 4, 2, M, N, 16, torch.float32, seed=N)
    mask = dict(q_start=q_start, causal=causal, chunk=chunk)
    whole = flash_attention(q, k, v, k_start=k_start, impl="reference", **mask)
    parts = [
        flash_attention(q, k[:, :, a:b], v[:, :, a:b], k_start=k_start + a, impl="reference", **mask)
        for a, b in split_points(cuts, N)
    ]
    order.shuffle(parts)  # order-independent
    out, lse = merge_attention(parts)
    assert max_err(out, whole[0]) < 1e-5
    assert lse_err(lse, whole[1]) < 1e-5


def test_merge_of_triton_segments(triton_device):
    q, k, v = make_qkv(1, 5, 1, 20, 150, 64, torch.float16, triton_device)
    mask = dict(q_start=140, causal=True, chunk=64)
    whole = flash_attention(q, k, v, k_start=0, impl="triton", **mask)
    parts = [
        flash_attention(q, k[:, :, a:b], v[:, :, a:b], k_start=a, impl="triton", **mask)
        for a, b in [(0, 45), (45, 46), (46, 129), (129, 150)]
    ]
    out, lse = merge_attention(parts[::-1])
    assert out.dtype == torch.float16
    assert max_err(out, whole[0]) < 2e-3
    assert lse_err(lse, whole[1]) < 1e-4


def test_merge_at_once_equals_merge_in_steps():
    """The one LSE merge is associative: folding parts in one at a time (as the reference does
    over key blocks) equals merging them all at once, including parts that saw no key."""
    g = torch.Generator().manual_seed(11)
    parts = [(torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, generator=g) * 3) for _ in range(4)]
    parts[2] = (parts[2][0], torch.full((2, 3, 4), -math.inf))
    at_once = merge_attention(parts)
    running = parts[0]
    for part in parts[1:]:
        running = merge_attention([running, part])
    assert max_err(running[0], at_once[0]) < 1e-6 and lse_err(running[1], at_once[1]) < 1e-6


def test_merge_edge_cases():
    out = torch.randn(2, 3, 4, 8)
    lse = torch.randn(2, 3, 4)
    ninf = torch.full_like(lse, -math.inf)
    # A part that saw nothing changes nothing.
    o, o_lse = merge_attention([(out, lse), (torch.randn_like(out), ninf)])
    assert max_err(o, out) < 1e-6 and lse_err(o_lse, lse) < 1e-6
    # Nothing anywhere: out 0, lse -inf, no nan.
    o, o_lse = merge_attention([(out, ninf), (out, ninf)])
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(o_lse).all()
    # Output dtype follows the first part; the math is fp32.
    o, _ = merge_attention([(out.half(), lse), (out.float(), lse)])
    assert o.dtype == torch.float16
    with pytest.raises(ValueError, match="at least one"):
        merge_attention([])
    with pytest.raises(ValueError, match="do not match"):
        merge_attention([(out, lse), (out[:1], lse[:1])])


# ----------------------------------------------------------------------------- decode_attention


def _segments(k, v, bounds, k_start):
    return [(k[:, :, a:b], v[:, :, a:b], k_start + a) for a, b in bounds]


@pytest.mark.parametrize("chunk", [None, 100])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_decode_equals_flash_over_concatenation(request, impl, chunk):
    device = request.getfixturevalue("triton_device") if impl == "triton" else "cpu"
    dtype = torch.float32
    # GQA 5, 3 query tokens, 420 keys in uneven segments (one of 300 keys: several splits).
    q, k, v = make_qkv(1, 10, 2, 3, 420, 64, dtype, device)
    q_start, k_start = 417, 0
    segs = _segments(k, v, [(0, 7), (7, 307), (307, 420)], k_start)[::-1]  # any order
    out, lse = decode_attention(q, segs, q_start=q_start, chunk=chunk, impl=impl)
    mask = dict(q_start=q_start, k_start=k_start, causal=True, chunk=chunk)
    ref_out, ref_lse = flash_attention(q, k, v, impl="reference", **mask)
    assert out.dtype == q.dtype
    assert max_err(out, ref_out) < 1e-5
    assert lse_err(lse, ref_lse) < 1e-5
    assert_within_bar(out, lse, q, k, v, **mask)


def test_decode_splits_fp16_and_masked_rows(triton_device):
    """One long segment cut into splits; a query before all keys sees nothing."""
    q, k, v = make_qkv(1, 4, 1, 2, 260, 128, torch.float16, triton_device)
    assert attn_mod._decode_splits(q, 1, 260) > 1 or HAS_CUDA
    out, lse = decode_attention(q, [(k, v, 5)], q_start=4, impl="triton")
    assert torch.isneginf(lse[:, :, 0]).all() and (out[:, :, 0] == 0).all()
    assert_within_bar(out, lse, q, k, v, q_start=4, k_start=5, causal=True, chunk=None)


def test_decode_empty_and_invisible_segments():
    q, k, v = make_qkv(1, 2, 1, 1, 50, 16, torch.float32)
    out, lse = decode_attention(q, [], q_start=0)
    assert (out == 0).all() and torch.isneginf(lse).all()
    # Keys after the query (causal) contribute nothing.
    out, lse = decode_attention(q, [(k, v, 100)], q_start=60)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_decode_bad_arguments():
    q, k, v = make_qkv(1, 2, 1, 1, 10, 16, torch.float32)
    with pytest.raises(ValueError, match="triple"):
        decode_attention(q, [(k, v)], q_start=20)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        decode_attention(q, [(k, v, 0)], q_start=20, chunk=0)
    with pytest.raises(TypeError, match="share a dtype"):
        decode_attention(q, [(k.half(), v.half(), 0)], q_start=20)
    with pytest.raises(ValueError, match="4-D"):
        decode_attention(q[0], [(k, v, 0)], q_start=20)


# ----------------------------------------------------------------------------- dispatcher


def test_dispatch_auto(monkeypatch):
    q = torch.zeros(1, 2, 3, 64)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not attn_mod._use_triton("auto", q)  # CPU without the interpreter: reference
    with pytest.raises(RuntimeError, match="cannot run"):
        attn_mod._use_triton("triton", q)
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert attn_mod._use_triton("auto", q)
        assert not attn_mod._use_triton("auto", torch.zeros(1, 2, 3, 80))  # head dim 80
        with pytest.raises(RuntimeError, match="head dim 80"):
            attn_mod._use_triton("triton", torch.zeros(1, 2, 3, 80))
    with pytest.raises(ValueError, match="impl must be"):
        attn_mod._use_triton("cuda", q)


def test_torch_impl_refusals(monkeypatch):
    """impl="torch" is flash_attention's fused CPU path: decode_attention refuses it, and
    without the fused op it is a clear error rather than a silent fallback."""
    q, k, v = make_qkv(1, 2, 1, 5, 9, 16, torch.float32)
    with pytest.raises(ValueError, match="impl='torch' is for flash_attention"):
        decode_attention(q, [(k, v, 0)], q_start=4, impl="torch")
    monkeypatch.setattr(attn_mod, "_FUSED_CPU", None)
    with pytest.raises(RuntimeError, match="fused CPU attention op"):
        flash_attention(q, k, v, q_start=4, k_start=0, impl="torch")
    out, lse = flash_attention(q, k, v, q_start=4, k_start=0)  # auto: the reference then
    assert_within_bar(out, lse, q, k, v, q_start=4, k_start=0, causal=True, chunk=None)


def test_reference_runs_without_triton(monkeypatch):
    """With triton unimportable, auto falls back to PyTorch (fused CPU kernel) and forcing
    triton fails."""
    from longctx.kernels import _env

    monkeypatch.setattr(_env, "triton_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = make_qkv(1, 2, 1, 5, 9, 16, torch.float32)
    out, lse = flash_attention(q, k, v, q_start=4, k_start=0)
    assert_within_bar(out, lse, q, k, v, q_start=4, k_start=0, causal=True, chunk=None)
    with pytest.raises(RuntimeError, match="not installed"):
        flash_attention(q, k, v, q_start=4, k_start=0, impl="triton")


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda q, k, v: (q[0], k, v, {}), ValueError, "4-D"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8], {}), ValueError, "head dim mismatch"),
        (lambda q, k, v: (q[:, :3], k[:, :2], v[:, :2], {}), ValueError, "multiple of KV heads"),
        (lambda q, k, v: (q, k, v[:, :, :5], {}), ValueError, "shapes differ"),
        (lambda q, k, v: (q, k[:1], v[:1], {}), ValueError, "batch mismatch"),
        (lambda q, k, v: (q.half(), k, v, {}), TypeError, "share a dtype"),
        (lambda q, k, v: (q.double(), k.double(), v.double(), {}), TypeError, "dtype"),
        (lambda q, k, v: (q.numpy(), k, v, {}), TypeError, "torch.Tensor"),
        (lambda q, k, v: (q, k, v, {"q_start": -1}), ValueError, "q_start must be >= 0"),
        (lambda q, k, v: (q, k, v, {"k_start": 1.5}), TypeError, "k_start must be an int"),
        (lambda q, k, v: (q, k, v, {"q_start": True}), TypeError, "bool"),
        (lambda q, k, v: (q, k, v, {"chunk": 0}), ValueError, "chunk must be a positive"),
        (lambda q, k, v: (q, k, v, {"impl": "fast"}), ValueError, "impl must be"),
    ],
)
def test_bad_arguments(make, exc, match):
    q, k, v = make_qkv(2, 4, 2, 5, 6, 16, torch.float32)
    q, k, v, kw = make(q, k, v)
    kw = {"q_start": 0, "k_start": 0, **kw}
    with pytest.raises(exc, match=match):
        flash_attention(q, k, v, **kw)


def test_empty_lengths():
    q, k, v = make_qkv(1, 2, 1, 4, 0, 16, torch.float32)
    out, lse = flash_attention(q, k, v, q_start=0, k_start=0)
    assert (out == 0).all() and torch.isneginf(lse).all()
    q, k, v = make_qkv(1, 2, 1, 0, 5, 16, torch.float32)
    out, lse = flash_attention(q, k, v, q_start=0, k_start=0)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
