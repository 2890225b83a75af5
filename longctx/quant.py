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

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kernels.quant import bits_of, dequantize, moe_matmul, quant_matmul
from .kernels.quant import quantize as quantize_weight
from .moe import MLP, Experts, MoE

SCHEMES = {"int8": 8, "int4": 4}


def scheme_bits(scheme: str) -> int:
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    return SCHEMES[scheme]


def _words(K: int, bits: int) -> int:
    return -(-K // 8) if bits == 4 else K


def _empty_q(shape_nk: tuple[int, ...], bits: int, n_groups: int, dtype, device, zero: bool):
    """Uninitialised (w, scale, zero) for weights of shape (..., N, K)."""
    *lead, K = shape_nk
    w = torch.empty(*lead, _words(K, bits), dtype=torch.int32 if bits == 4 else torch.int8, device=device)
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
        return sum(t.numel() * t.element_size() for packed in self.data.values() if packed is not None
                   for t in (packed[2:3] if packed[0] == "int8" else packed[1:3]))


class QuantizedLinear(nn.Module):
    """``y = x @ dequantize(W).T`` for W (out, in) stored quantized; a drop-in for bias-free nn.Linear.

    Buffers: ``weight_q`` (int32 (out, ceil(in/8)) for int4, int8 (out, in) for int8),
    ``weight_scale`` (out, n_groups) in the model dtype, ``weight_zero`` None or int8 like the
    scale (asymmetric checkpoints only). ``group_size`` None means one group per output channel.
    ``impl`` is passed to ``longctx.kernels.quant_matmul``."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, *,
                 zero: bool = False, dtype=torch.float32, device=None):
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

    def __init__(self, n: int, d: int, hidden: int, bits: int, group_size: int | None, *,
                 zero: bool = False, dtype=torch.float32, device=None):
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
        return dequantize(getattr(self, f"{part}_q")[e], getattr(self, f"{part}_scale")[e],
                          None if z is None else z[e], K=K, dtype=dtype)

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
            for cache in (m._cpu.values() if isinstance(m._cpu, dict) else [m._cpu]):
                cache.clear()


def cpu_packed_bytes(model: nn.Module) -> int:
    """Bytes the quantized modules of ``model`` hold in packed CPU layouts beside their weights
    (int8's packed layout is the weight itself, so only its bf16 scale vectors count)."""
    total = 0
    for m in quantized_modules(model).values():
        for cache in (m._cpu.values() if isinstance(m._cpu, dict) else [m._cpu]):
            total += cache.nbytes
    return total


# ----------------------------------------------------------------------------- memory plan

_GIB = 1 << 30


def _fmt(n: float) -> str:
    """Bytes as GiB (or MiB / KiB when small), two decimals."""
    for unit, size in (("GiB", _GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Where a model's weights and a context's KV go (``memory_plan``). Bytes unless named.

    ``weights``: {part: bytes} for "experts" (routed), "shared" (shared expert and dense MLPs),
    "attention" (q/k/v/o), "router", "norms", "embeddings/head" (the head counted once when
    tied); ``params``: the same parts' parameter counts. ``kv_per_token``: global-layer KV per
    context token (all global layers); ``chunked_kv``: the chunked layers' KV at this context
    (bounded by one attention chunk per layer). ``reserve``: kept free on the compute device for
    activations and workspace. ``device_tokens``: global-KV tokens that fit on the compute
    device (the GPU, or the CPU when no GPU is planned) beside the weights, chunked KV and
    reserve; ``cpu_tokens`` then fit in the CPU budget (with a GPU: all of it is KV; without:
    what the device share left), ``disk_tokens`` are the rest of ``context``. ``fits``: False
    when the weights, chunked KV and reserve alone exceed the compute device's budget."""

    scheme: str | None
    group_size: int | None
    quantize_attention: bool
    dtype: torch.dtype
    context: int
    params: dict[str, int]
    weights: dict[str, int]
    kv_per_token: int
    global_layers: int
    chunked_layers: int
    chunk: int | None
    chunked_kv: int
    reserve: int
    gpu_bytes: int | None
    cpu_bytes: int | None
    fits: bool
    device_tokens: int
    cpu_tokens: int
    disk_tokens: int

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def kv_bytes(self) -> int:
        """All KV at ``context`` tokens: global layers plus chunked layers."""
        return self.kv_per_token * self.context + self.chunked_kv

    def lines(self) -> list[str]:
        """The plan as printable lines (what ``longctx info`` shows)."""
        dt = str(self.dtype).removeprefix("torch.")
        if self.scheme is None:
            what = f"{dt} weights"
        else:
            group = "per channel" if self.group_size is None else f"group {self.group_size}"
            what = f"{self.scheme} ({group}) experts + shared{' + attention' if self.quantize_attention else ''}, " \
                   f"rest {dt}"
        quantized = {"experts", "shared"} | ({"attention"} if self.quantize_attention else set())
        out = [f"memory plan for {self.context:,} tokens: {what}",
               f"  weights            {_fmt(self.weight_bytes):>11}  ({sum(self.params.values()):,} parameters)"]
        for part, b in self.weights.items():
            kind = self.scheme if self.scheme and part in quantized else dt
            out.append(f"    {part:<16} {_fmt(b):>11}  ({self.params[part]:,} parameters, {kind})")
        out.append(f"  KV per token       {_fmt(self.kv_per_token):>11}  in {self.global_layers} global layers "
                   f"({dt})")
        if self.chunked_layers:
            out.append(f"  chunked-layer KV   {_fmt(self.chunked_kv):>11}  fixed, {self.chunked_layers} layers x "
                       f"min(context, chunk {self.chunk:,})")
        out.append(f"  KV at context      {_fmt(self.kv_bytes):>11}")
        dev = "GPU" if self.gpu_bytes is not None else "CPU"
        budget = self.gpu_bytes if self.gpu_bytes is not None else self.cpu_bytes
        if budget is None:
            out.append("  no memory budget given: everything stays on the CPU")
            return out
        need = self.weight_bytes + self.chunked_kv + self.reserve
        if not self.fits:
            out.append(f"  {dev} {_fmt(budget)}: weights + chunked KV + reserve ({_fmt(self.reserve)}) need "
                       f"{_fmt(need)}; short by {_fmt(need - budget)}")
            return out
        out.append(f"  {dev} {_fmt(budget)}: {_fmt(budget - need)} left beside weights, chunked KV and "
                   f"{_fmt(self.reserve)} reserve -> {self.device_tokens:,} tokens of KV")
        if self.gpu_bytes is not None:
            cpu = "no CPU budget given" if self.cpu_bytes is None else f"CPU {_fmt(self.cpu_bytes)}"
            out.append(f"  {cpu}: {self.cpu_tokens:,} tokens of KV ({_fmt(self.cpu_tokens * self.kv_per_token)})")
        out.append(f"  disk: {self.disk_tokens:,} tokens of KV ({_fmt(self.disk_tokens * self.kv_per_token)})")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _linear_bytes(n: int, k: int, bits: int | None, group_size: int | None, dtype_bytes: int, what: str) -> int:
    """Stored bytes of one (n, k) weight: plain, or quantized as this module stores it."""
    if bits is None:
        return n * k * dtype_bytes
    G = k if group_size is None else group_size
    if G <= 0 or k % G:
        raise ValueError(f"{what}: group_size={group_size} must divide the input dim {k}")
    return n * (_words(k, bits) * 4 if bits == 4 else k) + n * (k // G) * dtype_bytes


def memory_plan(cfg: ModelConfig, scheme: str | None = None, *, context: int, group_size: int = 128,
                quantize_attention: bool = False, dtype: torch.dtype = torch.bfloat16, gpu_bytes: int | None = None,
                cpu_bytes: int | None = None, reserve: int = _GIB) -> MemoryPlan:
    """Weights per part, KV per token and where ``context`` tokens of KV fit (``MemoryPlan``).

    Counts come from the config alone (nothing is allocated) and follow what ``quantize`` /
    ``load_model(quantize=...)`` store: int4 packs 8 weights per int32 word with one ``dtype``
    scale per ``group_size`` inputs; int8 is a byte per weight and one scale per output channel.
    ``dtype`` is the model's (scales, unquantized parts, activations, KV). ``gpu_bytes``: the
    GPU's budget (weights, chunked KV, ``reserve`` and KV tokens live there; ``cpu_bytes`` is
    then KV only); without a GPU the CPU holds it all. ``reserve`` (default 1 GiB) is kept free
    for activations, workspace and the CUDA context. Raises ValueError for an unknown scheme or
    a group size that does not divide a quantized part's input dim (naming the part)."""
    bits = None if scheme is None else scheme_bits(scheme)
    group = group_size if bits == 4 else None
    if context < 0:
        raise ValueError(f"context must be >= 0 tokens, got {context}")
    db = torch.empty(0, dtype=dtype).element_size()
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    n_moe = sum(cfg.is_moe)
    E, width, width_mlp = cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size_mlp
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    attn_shapes = [(q_out, d), (kv_out, d), (kv_out, d), (d, q_out)]  # (out, in) per layer
    mlp = lambda w: [(w, d), (w, d), (d, w)]  # noqa: E731  (out, in) of gate, up, down
    shared_shapes = n_moe * mlp(width) + (L - n_moe) * mlp(width_mlp)
    attn_bits = bits if quantize_attention else None
    params = {"experts": n_moe * E * 3 * d * width, "shared": sum(n * k for n, k in shared_shapes),
              "attention": L * sum(n * k for n, k in attn_shapes), "router": n_moe * E * d,
              "norms": (2 * L + 1) * d, "embeddings/head": cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)}
    expert = [(2 * width, d, "routed experts gate_up"), (d, width, "routed experts down")]
    weights = {
        "experts": n_moe * E * sum(_linear_bytes(n, k, bits, group, db, w) for n, k, w in expert),
        "shared": sum(_linear_bytes(n, k, bits, group, db, "shared expert / MLP") for n, k in shared_shapes),
        "attention": L * sum(_linear_bytes(n, k, attn_bits, group, db, "attention") for n, k in attn_shapes),
        **{part: params[part] * db for part in ("router", "norms", "embeddings/head")},
    }
    kinds = cfg.layer_kinds
    per_layer = 2 * cfg.num_key_value_heads * hd * db  # K and V
    n_global, n_chunked = kinds.count("global"), kinds.count("chunked")
    chunked_kv = n_chunked * per_layer * min(context, cfg.attention_chunk_size or 0)
    kv_per_token = n_global * per_layer
    budget = gpu_bytes if gpu_bytes is not None else cpu_bytes
    left = None if budget is None else budget - sum(weights.values()) - chunked_kv - reserve
    fits = left is None or left >= 0

    def take(room: int | None, want: int) -> int:
        if room is None or kv_per_token == 0:
            return want
        return min(want, max(0, room) // kv_per_token)

    device_tokens = cpu_tokens = disk_tokens = 0  # a plan whose weights do not fit places no KV
    if fits:
        device_tokens = take(left, context)
        # Without a GPU the device tier is the CPU: device_tokens already counted its budget.
        cpu_tokens = take(cpu_bytes, context - device_tokens) if gpu_bytes is not None else 0
        disk_tokens = context - device_tokens - cpu_tokens
    return MemoryPlan(scheme, group if bits else None, quantize_attention, dtype, context, params, weights,
                      kv_per_token, n_global, n_chunked, cfg.local_chunk, chunked_kv, reserve, gpu_bytes, cpu_bytes,
                      fits, device_tokens, cpu_tokens, disk_tokens)


__all__ = ["MemoryPlan", "QuantizedExperts", "QuantizedLinear", "SCHEMES", "bits_of", "cpu_packed_bytes", "memory_plan",
           "prepare", "quantize", "quantized_modules", "set_impl"]
