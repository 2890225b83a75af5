"""Statistics that attention records into a layer cache while asked to (``KVCache.record_attention``):
today the citation statistic, the attention mass each key position receives."""

from __future__ import annotations

import torch

from .offload import Segment, stage


class AttentionMass:
    """The citation statistic of one global layer while recording: per key position, the
    causal-softmax probability that the queries of later forwards put on it, summed over heads
    and queries. ``mass`` (B, capacity) fp32 on CPU; capacity may run past the last key (those
    entries stay zero). Each (head, query) row adds exactly 1 in total."""

    def __init__(self, mass: torch.Tensor):
        self.mass = mass

    def copy(self) -> AttentionMass:
        return AttentionMass(self.mass.clone())

    def reserve(self, end: int) -> None:
        """Make room for key positions < ``end``; geometrically: a decode step adds one key, not one O(L) copy."""
        if self.mass.shape[1] < end:
            grow = max(end, 2 * self.mass.shape[1]) - self.mass.shape[1]
            self.mass = torch.cat([self.mass, self.mass.new_zeros(self.mass.shape[0], grow)], 1)

    def record(self, q: torch.Tensor, q_start: int, segments: list[Segment], lse: torch.Tensor, scale: float) -> None:
        """Add the mass that queries q (B, Hq, M, D) at positions q_start.. put on the keys of
        ``segments`` (every key they attended to, their own included), given the softmax's
        log-normaliser lse (B, Hq, M) fp32 from the attention and its score scale."""
        B, Hq, M, D = q.shape
        end = q_start + M
        self.reserve(end)
        G = Hq // segments[0][0].shape[1]  # query heads per KV head
        qf = q.float().unflatten(1, (-1, G))  # (B, Hkv, G, M, D)
        lse = lse.unflatten(1, (-1, G))[..., None]  # (B, Hkv, G, M, 1)
        qpos = torch.arange(q_start, end, device=q.device)
        for group in stage(segments, q.device):
            for k, _, ks in group:
                n = k.shape[2]
                s = torch.einsum("bhgmd,bhnd->bhgmn", qf, k.float()) * scale
                p = torch.exp(s - lse)
                p = p.masked_fill(torch.arange(ks, ks + n, device=q.device)[None, :] > qpos[:, None], 0.0)
                self.mass[:, ks : ks + n] += p.sum((1, 2, 3)).cpu()

    def record_gathered(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, lse: torch.Tensor, scale: float):
        """Sparse decode's form of ``record``: one query token q (B, Hq, 1, D) attended only to
        gathered keys k (B, Hkv, n, D) at absolute positions ``pos`` (B, Hkv, n), with its lse
        (B, Hq, 1) over them; the mass goes to those positions, unread keys get none."""
        B, Hkv = q.shape[0], k.shape[1]
        self.reserve(int(pos.max()) + 1)
        qf = q[:, :, 0].float().unflatten(1, (Hkv, -1))  # (B, Hkv, G, D)
        p = torch.exp(torch.einsum("bhgd,bhnd->bhgn", qf, k.float()) * scale - lse.unflatten(1, (Hkv, -1)))
        flat = (pos.cpu() + torch.arange(B)[:, None, None] * self.mass.shape[1]).reshape(-1)
        self.mass.view(-1).index_add_(0, flat, p.sum(2).reshape(-1).cpu())
