"""One attention module for both Llama-4 layer kinds (scout_architecture.md §2.3).

Chunked layers: interleaved llama3 RoPE, then weightless RMS QK-norm, then a chunk-local
causal mask. Global layers: no RoPE, no QK-norm, q scaled by the temperature s(p), plain
causal mask. Masks come from absolute positions (DESIGN §3), so whole, chunked and
token-by-token calls compute the same thing; the kernels in ``longctx.kernels`` do the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import sparse
from .cache import ChunkedCache, GlobalCache
from .config import ModelConfig
from .kernels import decode_attention, flash_attention, merge_attention
from .kernels.attention import visibility_mask
from .offload import Segment, stage
from .rope import apply_rope

# Queries per call at or below which the split-KV decode kernel is used over cached keys.
_DECODE_MAX_QUERIES = 16


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) over the last dim in fp32, cast back to x's dtype, then times
    ``weight`` (d,) if given: HF's order, so bf16 models round where the reference does. Used
    weightless for the QK-norm and with a weight by ``model.RMSNorm``."""
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if weight is None else out * weight


def temperature_scale(cfg: ModelConfig, start: int, length: int, device) -> torch.Tensor:
    """s(p) = 1 + attn_scale · ln(1 + ⌊(p+1)/floor_scale⌋) for p = start..start+length-1 (fp32)."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    return torch.log1p(torch.floor((pos + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.chunked = cfg.layer_kinds[layer] == "chunked"
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def project(self, x: torch.Tensor, start: int, rope: tuple[torch.Tensor, torch.Tensor]):
        """q (B, T, Hq, D), k and v (B, T, Hkv, D) as the attention uses them: RoPE and QK-norm
        on chunked layers, temperature tuning on global ones. (Training also calls this, to
        put a loss on chosen heads' attention.)"""
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.chunked:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cfg.use_qk_norm:
                q, k = rms_norm(q, cfg.rms_norm_eps), rms_norm(k, cfg.rms_norm_eps)
        elif cfg.attn_temperature_tuning:
            s = temperature_scale(cfg, start, T, x.device)
            q = (q * s[None, :, None, None]).to(q.dtype)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: ChunkedCache | GlobalCache | None,
    ) -> torch.Tensor:
        """x (B, T, d) at absolute positions start..start+T-1; ``kv`` is this layer's cache
        (``None`` for a cache-free forward; its ``stats`` recorder, if any, sees every call
        over it). ``rope`` = (cos, sin), each (T, head_dim/2). Returns (B, T, d)."""
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = (t.transpose(1, 2) for t in self.project(x, start, rope))  # (B, H, T, D)

        chunk = cfg.attention_chunk_size if self.chunked else None
        scale = self.head_dim**-0.5
        if kv is None and torch.is_grad_enabled():
            out = dense_attention(q, k, v, start, chunk, scale)  # training: needs autograd
        elif kv is None:
            out, _ = flash_attention(q, k, v, q_start=start, k_start=start, causal=True, chunk=chunk, scale=scale)
        elif kv.cp is not None:  # a context-parallel global layer: other ranks hold keys too
            out, _ = kv.cp.attend(q, k, v, start, kv, scale)  # appends and records citations itself
        elif T == 1 and kv.pages is not None:  # sparse decode: only the selected pages are read
            kv.append(k, v, start)  # (no segment list: its length grows with the context)
            out, lse, read = sparse.attend(q, kv, start, scale)
            if kv.stats is not None:
                kv.stats.record_gathered(q, *read, lse, scale)
        else:
            segments = kv.segments() + [(k, v, start)]
            kv.append(k, v, start)
            out, lse = attend(q, segments, start, chunk, scale)
            if kv.stats is not None:
                kv.stats.record(q, start, segments, lse, scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, chunk: int | None, scale: float
) -> torch.Tensor:
    """The same masked attention through PyTorch SDPA, differentiable: used for training (grad
    enabled, no cache; the kernels' reference path is inference-only, with in-place softmax).
    q, k, v (B, H, T, D) at the same positions start..start+T-1 (self-attention).

    Causal layers go through SDPA's is_causal path (its fused kernel skips the masked half and
    never builds a (T, T) mask). Chunked layers whose first chunk starts at ``start`` are cut
    into chunks, padded at the end, and run the same way with the chunks as a batch dimension:
    O(T·chunk) work instead of O(T²). Any other start falls back to an explicit mask."""
    B, H, T, D = q.shape
    g = H // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # GQA: head h reads KV head h // g
    if chunk is None or T <= chunk - start % chunk:  # one causal block
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if start % chunk == 0:
        n = -(-T // chunk)
        pad = n * chunk - T  # padded keys sit after every real query of the last chunk: masked

        def blocks(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, 0, 0, pad)).reshape(B, H, n, chunk, D)

        out = F.scaled_dot_product_attention(blocks(q), blocks(k), blocks(v), is_causal=True, scale=scale)
        return out.reshape(B, H, n * chunk, D)[:, :, :T]
    mask = visibility_mask(start, start + T - 1, start, start + T, True, chunk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attend(
    q: torch.Tensor, segments: list[Segment], q_start: int, chunk: int | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q (B, Hq, M, D) over key segments [(k, v, k_start), ...] that may
    live on any tier; lower tiers are streamed up by ``offload.stage`` and per-group results
    merged exactly by their LSE. Returns out (B, Hq, M, D) and lse (B, Hq, M) fp32."""
    M = q.shape[2]
    visible = [seg for seg in segments if _visible(seg, q_start, M, chunk)]
    parts = []
    for group in stage(visible, q.device):
        if M <= _DECODE_MAX_QUERIES:  # split-KV launches over the group, merged in one step
            parts.append(decode_attention(q, group, q_start=q_start, causal=True, chunk=chunk, scale=scale))
        else:
            parts += [
                flash_attention(q, k, v, q_start=q_start, k_start=k_start, causal=True, chunk=chunk, scale=scale)
                for k, v, k_start in group
            ]
    return parts[0] if len(parts) == 1 else merge_attention(parts)


def _visible(segment: Segment, q_start: int, M: int, chunk: int | None) -> bool:
    """Whether any query at q_start..q_start+M-1 may see a key of the segment."""
    k, _, k_start = segment
    if k.shape[2] == 0 or k_start > q_start + M - 1:
        return False
    return chunk is None or k_start + k.shape[2] > (q_start // chunk) * chunk
