"""Llama-3-scaled rotary embedding on interleaved pairs (Llama 4's "complex" convention).

Pairs (2j, 2j+1) of each head are rotated by the angle p·ω_j. This is NOT rotate_half: HF
and Meta checkpoints keep Meta's interleaved q/k row order (scout_architecture.md §2.3).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """ω_j for j = 0..head_dim/2-1, float32, with llama3 frequency scaling if configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    rs = cfg.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) == "default":
        return inv_freq
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    if high > low:  # NOTE: Scout has low == high, so the smooth band is empty (HF divides by 0 there)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        scaled = torch.where(medium, blended, scaled)
    return scaled


def rope_angles(inv_freq: torch.Tensor, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim/2), float32, for absolute positions start..start+length-1."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    ang = pos[:, None] * inv_freq.to(device)[None, :]  # fp32, as the reference computes it
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (B, T, H, D) in fp32; returns x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2), broadcast over batch and heads
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)
