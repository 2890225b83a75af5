"""Feed-forward blocks: SwiGLU MLP, and the Llama-4 MoE (scout_architecture.md §3).

MoE = shared SwiGLU expert on h + routed expert e* on g·h, where e* = top-k of the router
logits and g = sigmoid(logit) (no softmax, no renormalisation; the gate scales the expert's
*input*). Two paths compute it: ``forward_reference`` (every token through every expert with
zero gates, as transformers does) and ``forward`` (tokens sorted by expert, one matmul per
expert that has tokens, through ``experts.grouped``: a loop here, one grouped kernel for
quantized experts); ``tests/test_model.py`` and ``tests/test_quant.py`` check they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class MLP(nn.Module):
    """down(silu(gate(x)) ⊙ up(x)) with nn.Linear weights (shared expert and dense layers)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Routed experts in the checkpoint's "x @ W" layout: gate_up_proj (E, d, 2I), gate half
    first; down_proj (E, I, d). Held as plain parameters, as the HF keys have no ``.weight``."""

    def __init__(self, n: int, d: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, d, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, d))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x (N, d) -> (N, d)."""
        gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down_proj[e]

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Tokens sorted by expert, x (N, d) with counts[e] rows for expert e -> (N, d): one
        matmul per expert that has tokens (``quant.QuantizedExperts`` has the same method)."""
        out = torch.empty_like(x)
        lo = 0
        for e, n in enumerate(counts):
            if n:
                out[lo : lo + n] = self.expert(e, x[lo : lo + n])
            lo += n
        return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.num_local_experts
        self.router = nn.Linear(d, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg.num_local_experts, d, cfg.intermediate_size)
        self.shared_expert = MLP(d, cfg.intermediate_size)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (N, d) -> expert ids (N, k) int64 and gates (N, k) in h's dtype (sigmoid in fp32)."""
        logits = self.router(h)  # (N, E), model dtype as in the reference
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        return idx, torch.sigmoid(top.float()).to(h.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d). Grouped path: each expert runs once, on the tokens routed to it."""
        h = x.reshape(-1, x.shape[-1])  # (N, d)
        idx, gate = self.route(h)
        flat = idx.flatten()  # (N·k,) token-major
        order = torch.argsort(flat, stable=True)
        token = order // self.top_k  # which token each sorted slot belongs to
        routed_in = h[token] * gate.flatten()[order, None]  # (N·k, d), the gate scales the input
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        out = self.shared_expert(h)
        out = out.index_add(0, token, self.experts.grouped(routed_in, counts))
        return out.view_as(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The obvious form: every token through every expert, unselected experts gated by 0."""
        h = x.reshape(-1, x.shape[-1])
        idx, gate = self.route(h)
        scores = torch.zeros(h.shape[0], self.n_experts, dtype=h.dtype, device=h.device)
        scores.scatter_(1, idx, gate)  # sigmoid(-inf) = 0 for experts not in the top k
        out = self.shared_expert(h)
        for e in range(self.n_experts):
            out = out + self.experts.expert(e, h * scores[:, e : e + 1])
        return out.view_as(x)
