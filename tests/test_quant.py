"""Weight-only int4 / int8: packing, the grouped-MoE kernel and quantized modules against their
dequantize-then-matmul references (longctx.kernels.quant, longctx.quant)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import random_model, tiny_config
from longctx import quant
from longctx.kernels import moe_matmul, quant_matmul
from longctx.kernels import quant as kq

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def loop_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent packer (plain loops): q (N, K) signed -> int32 (N, ceil(K·bits/32)); element j
    of a row in word j // per at bits bits·(j % per), stored as q + 2**(bits-1)."""
    per = 32 // bits
    rows = []
    for row in q.tolist():
        words = []
        for w0 in range(0, len(row), per):
            word = 0
            for j, v in enumerate(row[w0 : w0 + per]):
                word |= (v + (1 << (bits - 1))) << (bits * j)
            words.append(word - (1 << 32) if word >= 1 << 31 else word)
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits,K", [(4, 16), (4, 13), (8, 12), (8, 7)])
def test_pack_matches_loop_packer_and_round_trips(bits, K):
    g = torch.Generator().manual_seed(bits * K)
    lo = -(1 << (bits - 1))
    q = torch.randint(lo, -lo, (5, K), generator=g, dtype=torch.int8)
    packed = kq.pack_int32(q, bits)
    assert torch.equal(packed, loop_pack(q, bits))
    assert torch.equal(kq.unpack_int32(packed, bits, K), q)


@pytest.mark.parametrize("bits,group", [(4, 16), (4, None), (8, None), (8, 8)])
def test_quantize_error_is_half_a_step(bits, group):
    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(0))
    q, s = kq.quantize(w, bits, group)
    deq = kq.dequantize(q, s, K=48)
    G = 48 if group is None else group
    step = s.repeat_interleave(G, dim=-1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert (kq.int_values(q, 48).abs() <= (1 << (bits - 1)) - 1).all()  # symmetric: -2**(b-1) unused


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="group_size=48"):
        kq.quantize(torch.randn(4, 64), 4, 48)
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.experts.*group_size=24"):
        quant.quantize(model, "int4", group_size=24)
    with pytest.raises(ValueError, match="int3"):
        quant.quantize(model, "int3")


# ----------------------------------------------------------------------------- grouped MoE matmul


def make_weights(E, N, K, bits, group, dtype, zero=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, s = kq.quantize(torch.randn(E, N, K, generator=g), bits, group)
    s = s.to(dtype)
    z = torch.randint(-3, 4, s.shape, generator=g).to(torch.int8) if zero else None
    return w, s, z


KERNEL_CASES = [  # E, N, K, bits, group, counts: empty experts, 1 and odd tokens, K not a tile multiple
    (4, 40, 96, 4, 32, [0, 1, 7, 0]),
    (3, 24, 100, 4, None, [5, 0, 18]),
    (3, 72, 200, 8, None, [33, 1, 0]),
    (2, 16, 64, 8, 16, [0, 0]),
    (1, 8, 48, 4, 16, [3]),
]


@pytest.mark.parametrize("E,N,K,bits,group,counts", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("zero", [False, True])
def test_triton_equals_reference(triton_device, E, N, K, bits, group, counts, dtype, zero):
    w, s, z = make_weights(E, N, K, bits, group, dtype, zero)
    x = torch.randn(sum(counts), K, generator=torch.Generator().manual_seed(1)).to(dtype)
    dev = lambda t: None if t is None else t.to(triton_device)  # noqa: E731
    ref = moe_matmul(x, w, s, z, counts=counts, impl="reference")
    out = moe_matmul(dev(x), dev(w), dev(s), dev(z), counts=counts, impl="triton").cpu()
    assert out.shape == (sum(counts), N) and out.dtype == dtype
    # fp32 accumulation in the kernel vs the reference's matmul in the input dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    size = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * size)
    # and the reference itself: dequantize then matmul, per expert
    lo = 0
    for e, n in enumerate(counts):
        W = kq.dequantize(w[e], s[e], None if z is None else z[e], K=K, dtype=dtype)
        torch.testing.assert_close(ref[lo : lo + n], x[lo : lo + n] @ W.T, rtol=0, atol=0)
        lo += n


@pytest.mark.skipif(HAS_CUDA, reason="tests the interpreter's bf16 upcast")
def test_triton_bf16_under_interpreter(triton_device):
    w, s, _ = make_weights(2, 32, 64, 4, 32, torch.bfloat16)
    x = torch.randn(9, 64).bfloat16()
    out = moe_matmul(x, w, s, counts=[4, 5], impl="triton")
    ref = moe_matmul(x.float(), w, s.float(), counts=[4, 5], impl="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_no_tokens_and_bad_arguments():
    w, s, _ = make_weights(2, 16, 32, 4, 16, torch.float32)
    assert moe_matmul(torch.empty(0, 32), w, s, counts=[0, 0]).shape == (0, 16)
    with pytest.raises(ValueError, match="counts"):
        moe_matmul(torch.randn(3, 32), w, s, counts=[1, 1])
    with pytest.raises(ValueError, match="columns"):
        moe_matmul(torch.randn(3, 40), w, s, counts=[1, 2])
    with pytest.raises(ValueError, match="impl"):
        moe_matmul(torch.randn(3, 32), w, s, counts=[1, 2], impl="fast")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            moe_matmul(torch.randn(3, 32), w, s, counts=[1, 2], impl="triton")


@pytest.mark.parametrize("bits,group,N", [(4, 32, 48), (4, 128, 32), (8, None, 40), (4, 16, 40)])
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_cpu_auto_equals_reference_bf16(bits, group, N, rows):
    """'auto' on CPU (torch's packed ops for 1-16 bf16 rows where they apply: int4 needs N % 16 == 0
    and a group of 32-256) against dequantize + bf16 matmul: both round to bf16 once."""
    K = 256
    w, s, _ = make_weights(3, N, K, bits, group, torch.bfloat16)
    counts = [rows, 0, 2]
    x = torch.randn(sum(counts), K).bfloat16()
    cache: dict = {}
    out = moe_matmul(x, w, s, counts=counts, impl="auto", cpu_cache=cache)
    ref = moe_matmul(x, w, s, counts=counts, impl="reference")
    exact = moe_matmul(x.float(), w, s.float(), counts=counts, impl="reference")
    assert out.dtype == torch.bfloat16
    bar = 2 * (ref.float() - exact).abs().max().item() + 1e-3  # twice the reference's own rounding
    assert (out.float() - exact).abs().max().item() <= bar
    if rows <= 16:
        assert cache, "the packed CPU layouts were not built for a decode-sized call"


def test_cpu_packed_layouts_int8_in_place_int4_a_copy_dropped_by_reference(one_thread):
    """The CPU decode path's memory: int8's packed layout is the weight itself, int4's a second
    copy of its bytes; set_impl("reference") drops it and the decode output stays the reference's."""
    cfg = tiny_config(hidden_size=64, intermediate_size=64)
    base = random_model(cfg).to(torch.bfloat16)
    tok = torch.randint(0, cfg.vocab_size, (1, 1), generator=torch.Generator().manual_seed(5))
    for scheme in ("int8", "int4"):
        model = quant.quantize(copy.deepcopy(base), scheme, group_size=32)
        assert quant.cpu_packed_bytes(model) == 0
        with torch.no_grad():
            fast = model(tok)  # one row: the packed ops
        experts = [m for m in quant.quantized_modules(model).values() if isinstance(m, quant.QuantizedExperts)]
        built = {e: p for m in experts for e, p in m._cpu["gate_up"].data.items() if p is not None}
        assert built, "a one-row bf16 call built no packed layout"
        m = experts[0]
        for e, packed in m._cpu["gate_up"].data.items():
            if packed is not None and scheme == "int8":
                assert packed[1].data_ptr() == m.gate_up_q[e].data_ptr()  # a view, not a copy
            elif packed is not None:
                assert packed[1].numel() * packed[1].element_size() == m.gate_up_q[e].numel() * 4
                assert packed[1].data_ptr() != m.gate_up_q[e].data_ptr()
        held = quant.cpu_packed_bytes(model)
        weights = sum(m.gate_up_q.numel() * m.gate_up_q.element_size() for m in experts)
        assert (held < weights / 8) if scheme == "int8" else (held > weights / 4)
        quant.set_impl(model, "reference")
        assert quant.cpu_packed_bytes(model) == 0
        with torch.no_grad():
            slow = model(tok)
        assert quant.cpu_packed_bytes(model) == 0
        # bf16 end to end: the two paths round differently, so compare against the logits' scale
        assert (fast.float() - slow.float()).abs().max() <= 0.02 * slow.float().abs().max()


# ----------------------------------------------------------------------------- modules


def test_quantized_linear_equals_dequantize_then_matmul():
    lin = torch.nn.Linear(64, 24, bias=False)
    x = torch.randn(3, 5, 64)
    for bits, group in ((4, 32), (8, None)):
        q = quant.QuantizedLinear.from_linear(lin, bits, group)
        for impl in ("auto", "reference"):
            q.impl = impl
            torch.testing.assert_close(q(x), x @ q.dequantize().T, rtol=1e-6, atol=1e-6)
        assert (q.dequantize() - lin.weight).abs().max() <= q.weight_scale.max() / 2 + 1e-6


@pytest.mark.parametrize("scheme,attn", [("int8", False), ("int4", True)])
def test_quantized_moe_forward_equals_reference_and_dequantized_model(scheme, attn, one_thread):
    cfg = tiny_config()
    model = quant.quantize(random_model(cfg), scheme, group_size=32, quantize_attention=attn)
    mods = quant.quantized_modules(model)
    assert any(isinstance(m, quant.QuantizedExperts) for m in mods.values())
    assert all(isinstance(b.feed_forward.router, torch.nn.Linear) for b in model.layers)  # router stays
    x = torch.randn(2, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for block in model.layers:
            ff = block.feed_forward
            torch.testing.assert_close(ff(x), ff.forward_reference(x), rtol=1e-5, atol=1e-5)
        # the quantized model == the plain model carrying the dequantized weights
        plain = random_model(cfg)
        for name, m in mods.items():
            if isinstance(m, quant.QuantizedExperts):
                gu, down = m.dequantize()
                plain.get_submodule(name).gate_up_proj.copy_(gu)
                plain.get_submodule(name).down_proj.copy_(down)
            else:
                plain.get_submodule(name).weight.copy_(m.dequantize())
        tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(model(tokens), plain(tokens), rtol=1e-5, atol=1e-4)


def test_state_dict_bytes():
    """int4 (group 64) and int8 bytes of the quantized parts against the same parts in bf16."""
    cfg = tiny_config()
    base = random_model(cfg).to(torch.bfloat16)
    names = [n for _, _, _, n in quant.targets(base, quantize_attention=True)]
    bf16 = sum(t.numel() * 2 for k, t in base.state_dict().items() if k.startswith(tuple(names)))
    for scheme, bar in (("int4", 0.30), ("int8", 0.55)):
        model = quant.quantize(random_model(cfg).to(torch.bfloat16), scheme, group_size=64, quantize_attention=True)
        q = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k.startswith(tuple(names)))
        assert q <= bar * bf16, (scheme, q / bf16)


def test_quant_matmul_shapes():
    w, s, _ = make_weights(1, 24, 64, 4, 32, torch.float32)
    x = torch.randn(2, 3, 64)
    out = quant_matmul(x, w[0], s[0])
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, x @ kq.dequantize(w[0], s[0], K=64).T, rtol=1e-6, atol=1e-6)
