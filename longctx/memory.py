"""Memory plan: what a configuration's weights and KV cache take, per part and per tier, for a
context length, a quantization scheme and GPU/CPU budgets; computed from the config alone
(nothing is allocated). ``longctx info`` prints it."""

from __future__ import annotations

import dataclasses

import torch

from .config import ModelConfig
from .quant import packed_words, scheme_bits

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
            what = (
                f"{self.scheme} ({group}) experts + shared{' + attention' if self.quantize_attention else ''}, "
                f"rest {dt}"
            )
        quantized = {"experts", "shared"} | ({"attention"} if self.quantize_attention else set())
        out = [
            f"memory plan for {self.context:,} tokens: {what}",
            f"  weights            {_fmt(self.weight_bytes):>11}  ({sum(self.params.values()):,} parameters)",
        ]
        for part, b in self.weights.items():
            kind = self.scheme if self.scheme and part in quantized else dt
            out.append(f"    {part:<16} {_fmt(b):>11}  ({self.params[part]:,} parameters, {kind})")
        out.append(f"  KV per token       {_fmt(self.kv_per_token):>11}  in {self.global_layers} global layers ({dt})")
        if self.chunked_layers:
            out.append(
                f"  chunked-layer KV   {_fmt(self.chunked_kv):>11}  fixed, {self.chunked_layers} layers x "
                f"min(context, chunk {self.chunk:,})"
            )
        out.append(f"  KV at context      {_fmt(self.kv_bytes):>11}")
        dev = "GPU" if self.gpu_bytes is not None else "CPU"
        budget = self.gpu_bytes if self.gpu_bytes is not None else self.cpu_bytes
        if budget is None:
            out.append("  no memory budget given: everything stays on the CPU")
            return out
        need = self.weight_bytes + self.chunked_kv + self.reserve
        if not self.fits:
            out.append(
                f"  {dev} {_fmt(budget)}: weights + chunked KV + reserve ({_fmt(self.reserve)}) need "
                f"{_fmt(need)}; short by {_fmt(need - budget)}"
            )
            return out
        out.append(
            f"  {dev} {_fmt(budget)}: {_fmt(budget - need)} left beside weights, chunked KV and "
            f"{_fmt(self.reserve)} reserve -> {self.device_tokens:,} tokens of KV"
        )
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
    return n * (packed_words(k, bits) * 4 if bits == 4 else k) + n * (k // G) * dtype_bytes


def memory_plan(
    cfg: ModelConfig,
    scheme: str | None = None,
    *,
    context: int,
    group_size: int = 128,
    quantize_attention: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    gpu_bytes: int | None = None,
    cpu_bytes: int | None = None,
    reserve: int = _GIB,
) -> MemoryPlan:
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
    params = {
        "experts": n_moe * E * 3 * d * width,
        "shared": sum(n * k for n, k in shared_shapes),
        "attention": L * sum(n * k for n, k in attn_shapes),
        "router": n_moe * E * d,
        "norms": (2 * L + 1) * d,
        "embeddings/head": cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2),
    }
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
    return MemoryPlan(
        scheme,
        group if bits else None,
        quantize_attention,
        dtype,
        context,
        params,
        weights,
        kv_per_token,
        n_global,
        n_chunked,
        cfg.local_chunk,
        chunked_kv,
        reserve,
        gpu_bytes,
        cpu_bytes,
        fits,
        device_tokens,
        cpu_tokens,
        disk_tokens,
    )


__all__ = ["MemoryPlan", "memory_plan"]
