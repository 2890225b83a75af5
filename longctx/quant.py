"""Weight-only int8 / int4 quantization of a ``Model`` (activations stay in the model dtype).

Schemes:

* ``"int8"``: symmetric, one scale per output channel, q in [-127, 127].
* ``"int4"``: symmetric, one scale per group of ``group_size`` consecutive *input* elements
  (default 128; it must divide every quantized layer's input dim), q in [-7, 7].

Scales are in the model dtype; storage and the matmul paths are ``longctx.kernels.quant``'s.

What is quantized: the routed experts (``Experts`` -> ``QuantizedExperts``, along the contraction
dims d and I), the shared expert and dense MLPs, and, with ``quantize_attention=True``, the
attention q/k/v/o projections (``nn.Linear`` -> ``QuantizedLinear``). What is not, and why:

* the router: top-1 routing takes an argmax over a handful of logits, and a small weight error
  that flips it swaps a whole expert's output for another's; its weights are tiny (E x d);
* norms: vectors, negligible bytes, and they multiply every activation;
* embeddings: a row gather, not a matmul, so no compute is saved, and tied models share it with
  the head;
* the LM head: its logits pick the answer tokens directly (exact-match answers, top-1
  agreement), so its error is not averaged away by later layers.

``quantize(model, scheme)`` converts a model in memory; ``checkpoint.load_model(quantize=...)``
converts while streaming (``prepare`` then ``set_weight`` per tensor). ``memory_plan(cfg, scheme,
context=...)`` sizes the stored weights per part from a config and places a context's KV on the
GPU, in a CPU budget and on disk (``longctx info``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.quant import dequantize, moe_matmul, quant_matmul
from .kernels.quant import quantize as quantize_weight
from .moe import MLP, Experts, MoE

SCHEMES = {"int8": 8, "int4": 4}


def scheme_bits(scheme: str) -> int:
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    return SCHEMES[scheme]


def packed_words(K: int, bits: int) -> int:
    return -(-K // 8) if bits == 4 else K


def _empty_q(shape_nk: tuple[int, ...], bits: int, n_groups: int, dtype, device, zero: bool):
    """Uninitialised (w, scale, zero) for weights of shape (..., N, K)."""
    *lead, K = shape_nk
    w = torch.empty(*lead, packed_words(K, bits), dtype=torch.int32 if bits == 4 else torch.int8, device=device)
    scale = torch.empty(*lead, n_groups, dtype=dtype, device=device)
    return w, scale, (torch.empty(*lead, n_groups, dtype=torch.int8, device=device) if zero else None)


class _CpuCache:
    """The packed CPU layouts of a module's weights (a second copy, built on first decode-sized
    call, dropped when the weights are replaced or moved)."""

    def __init__(self):
        self.key, self.data = None, {}

    def get(self, *tensors: torch.Tensor) -> dict:
        key = tuple((t.data_ptr(), t.device) for t in tensors)
        if key != self.key:
            self.key, self.data = key, {}
        return self.data

    def clear(self) -> None:
        self.key, self.data = None, {}

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held here that are not views of the module's own weights."""
        return sum(
            t.numel() * t.element_size()
            for packed in self.data.values()
            if packed is not None
            for t in (packed[2:3] if packed[0] == "int8" else packed[1:3])
        )


class QuantizedLinear(nn.Module):
    """``y = x @ dequantize(W).T`` for W (out, in) stored quantized; a drop-in for bias-free nn.Linear.

    Buffers: ``weight_q`` (int32 (out, ceil(in/8)) for int4, int8 (out, in) for int8),
    ``weight_scale`` (out, n_groups) in the model dtype, ``weight_zero`` None or int8 like the
    scale (asymmetric checkpoints only). ``group_size`` None means one group per output channel.
    ``impl`` is passed to ``longctx.kernels.quant_matmul``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        *,
        zero: bool = False,
        dtype=torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        G = in_features if group_size is None else group_size
        if G <= 0 or in_features % G:
            raise ValueError(f"group_size={group_size} must divide the input dim {in_features}")
        w, s, z = _empty_q((out_features, in_features), bits, in_features // G, dtype, device, zero)
        self.register_buffer("weight_q", w)
        self.register_buffer("weight_scale", s)
        self.register_buffer("weight_zero", z)
        self.impl = "auto"
        self._cpu = _CpuCache()

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None) -> QuantizedLinear:
        if linear.bias is not None:
            raise ValueError("QuantizedLinear has no bias; got an nn.Linear with one")
        w = linear.weight
        mod = cls(w.shape[1], w.shape[0], bits, group_size, dtype=w.dtype, device="meta")
        mod.set_weight(w.detach())
        return mod

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (out, in) (its dtype is the scales') into this module's buffers."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        self.weight_q, self.weight_scale = quantize_weight(weight, self.bits, self.group_size)
        self.weight_zero = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reference weight (out, in) in ``dtype`` (default: the scales')."""
        return dequantize(self.weight_q, self.weight_scale, self.weight_zero, K=self.in_features, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self._cpu.get(self.weight_q, self.weight_scale)
        return quant_matmul(x, self.weight_q, self.weight_scale, self.weight_zero, impl=self.impl, cpu_cache=cache)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={self.group_size}"


class QuantizedExperts(nn.Module):
    """Routed experts with quantized weights, stored per expert in (out, in) orientation:
    ``gate_up_q`` (E, 2I, ·) for the checkpoint's gate_up_proj (E, d, 2I) transposed (gate rows
    first), ``down_q`` (E, d, ·) for down_proj (E, I, d) transposed; scales/zeros alike
    (``gate_up_scale``, ``down_scale``, ``gate_up_zero``, ``down_zero``)."""

    def __init__(
        self,
        n: int,
        d: int,
        hidden: int,
        bits: int,
        group_size: int | None,
        *,
        zero: bool = False,
        dtype=torch.float32,
        device=None,
    ):
        super().__init__()
        self.n, self.d, self.hidden, self.bits, self.group_size = n, d, hidden, bits, group_size
        for name, out, k in (("gate_up", 2 * hidden, d), ("down", d, hidden)):
            G = k if group_size is None else group_size
            if G <= 0 or k % G:
                raise ValueError(f"group_size={group_size} must divide the expert {name} input dim {k}")
            w, s, z = _empty_q((n, out, k), bits, k // G, dtype, device, zero)
            self.register_buffer(f"{name}_q", w)
            self.register_buffer(f"{name}_scale", s)
            self.register_buffer(f"{name}_zero", z)
        self.impl = "auto"
        self._cpu = {"gate_up": _CpuCache(), "down": _CpuCache()}

    @classmethod
    def from_experts(cls, experts: Experts, bits: int, group_size: int | None) -> QuantizedExperts:
        n, d, two_i = experts.gate_up_proj.shape
        mod = cls(n, d, two_i // 2, bits, group_size, dtype=experts.gate_up_proj.dtype, device="meta")
        mod.set_weight("gate_up_proj", experts.gate_up_proj.detach())
        mod.set_weight("down_proj", experts.down_proj.detach())
        return mod

    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        """Quantize the checkpoint tensor ``gate_up_proj`` (E, d, 2I) or ``down_proj`` (E, I, d)."""
        part = {"gate_up_proj": "gate_up", "down_proj": "down"}[name]
        want = (self.n, self.d, 2 * self.hidden) if part == "gate_up" else (self.n, self.hidden, self.d)
        if tuple(weight.shape) != want:
            raise ValueError(f"{name} shape {tuple(weight.shape)} != {want}")
        # One expert at a time into buffers allocated once: the temporaries of quantization stay
        # one expert's size, and no list of pieces is stacked (which would hold the result twice).
        K = weight.shape[1]
        G = K if self.group_size is None else self.group_size
        q, scale, _ = _empty_q((self.n, weight.shape[2], K), self.bits, K // G, weight.dtype, weight.device, False)
        for e in range(self.n):
            q[e], scale[e] = quantize_weight(weight[e].T, self.bits, self.group_size)
        setattr(self, f"{part}_q", q)
        setattr(self, f"{part}_scale", scale)
        setattr(self, f"{part}_zero", None)

    def _deq(self, part: str, e, dtype=None) -> torch.Tensor:
        K = self.d if part == "gate_up" else self.hidden
        z = getattr(self, f"{part}_zero")
        return dequantize(
            getattr(self, f"{part}_q")[e],
            getattr(self, f"{part}_scale")[e],
            None if z is None else z[e],
            K=K,
            dtype=dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference weights in the checkpoint layout: gate_up_proj (E, d, 2I), down_proj (E, I, d)."""
        every = slice(None)
        return self._deq("gate_up", every, dtype).transpose(1, 2), self._deq("down", every, dtype).transpose(1, 2)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x (N, d) -> (N, d), through the dequantized weights (the reference)."""
        gate, up = (x @ self._deq("gate_up", e, x.dtype).T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self._deq("down", e, x.dtype).T

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Tokens sorted by expert, x (N, d), counts[e] for expert e -> (N, d): two grouped matmuls."""

        def mm(part, inp):
            q, s, z = (getattr(self, f"{part}_{k}") for k in ("q", "scale", "zero"))
            return moe_matmul(inp, q, s, z, counts=counts, impl=self.impl, cpu_cache=self._cpu[part].get(q, s))

        gate, up = mm("gate_up", x).chunk(2, dim=-1)
        return mm("down", F.silu(gate) * up)

    def extra_repr(self) -> str:
        return f"experts={self.n}, d={self.d}, hidden={self.hidden}, int{self.bits}, group={self.group_size}"


def targets(model: nn.Module, quantize_attention: bool = False):
    """(parent module, attribute, module, full name) of every module the schemes quantize."""
    for i, block in enumerate(model.layers):
        ff = block.feed_forward
        base = f"layers.{i}"
        if isinstance(ff, MoE):
            yield ff, "experts", ff.experts, f"{base}.feed_forward.experts"
            mlp, mlp_name = ff.shared_expert, f"{base}.feed_forward.shared_expert"
        else:
            mlp, mlp_name = ff, f"{base}.feed_forward"
        if isinstance(mlp, MLP):
            for p in ("gate_proj", "up_proj", "down_proj"):
                yield mlp, p, getattr(mlp, p), f"{mlp_name}.{p}"
        if quantize_attention:
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield block.self_attn, p, getattr(block.self_attn, p), f"{base}.self_attn.{p}"


@torch.no_grad()
def quantize(model: nn.Module, scheme: str, group_size: int = 128, quantize_attention: bool = False) -> nn.Module:
    """Quantize ``model`` in place (module docstring) and return it.

    ``group_size`` applies to int4 (int8 is per channel); a ValueError names the layer whose
    input dim it does not divide. Already quantized modules are left as they are."""
    bits = scheme_bits(scheme)
    group = group_size if bits == 4 else None
    for parent, attr, mod, name in list(targets(model, quantize_attention)):
        try:
            if isinstance(mod, Experts):
                setattr(parent, attr, QuantizedExperts.from_experts(mod, bits, group))
            elif isinstance(mod, nn.Linear):
                setattr(parent, attr, QuantizedLinear.from_linear(mod, bits, group))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return model


def prepare(model: nn.Module, scheme: str, group_size: int = 128, quantize_attention: bool = False) -> list[str]:
    """Replace the target modules of a meta-device model with empty quantized ones (for
    streaming loads); returns their names. ``set_weight`` then fills them tensor by tensor."""
    bits = scheme_bits(scheme)
    group = group_size if bits == 4 else None
    names = []
    for parent, attr, mod, name in list(targets(model, quantize_attention)):
        try:
            if isinstance(mod, Experts):
                n, d, two_i = mod.gate_up_proj.shape
                new = QuantizedExperts(n, d, two_i // 2, bits, group, device="meta")
            else:
                new = QuantizedLinear(mod.in_features, mod.out_features, bits, group, device="meta")
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        setattr(parent, attr, new)
        names.append(name)
    return names


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the QuantizedLinear / QuantizedExperts in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}


def set_impl(model: nn.Module, impl: str) -> None:
    """Route every quantized module's matmuls through ``impl`` ("auto", "triton", "reference").

    Any other than "auto" also drops the packed CPU layouts that "auto" keeps for decode (for int4
    a second copy of the weights: ``longctx.kernels.quant.cpu_packed``); "reference" on CPU is
    the way to decode without that copy, at the unpack + matmul path's speed."""
    for m in quantized_modules(model).values():
        m.impl = impl
        if impl != "auto":
            for cache in m._cpu.values() if isinstance(m._cpu, dict) else [m._cpu]:
                cache.clear()


def cpu_packed_bytes(model: nn.Module) -> int:
    """Bytes the quantized modules of ``model`` hold in packed CPU layouts beside their weights
    (int8's packed layout is the weight itself, so only its bf16 scale vectors count)."""
    total = 0
    for m in quantized_modules(model).values():
        for cache in m._cpu.values() if isinstance(m._cpu, dict) else [m._cpu]:
            total += cache.nbytes
    return total


# ----------------------------------------------------------------------------- memory plan


__all__ = [
    "SCHEMES", "QuantizedExperts", "QuantizedLinear", "cpu_packed_bytes", "prepare", "quantize",
    "quantized_modules", "set_impl",
]  # fmt: skip
