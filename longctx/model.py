"""The Llama-4 text decoder: embed -> [attention + FFN blocks] -> norm -> head.

Module names match the Hugging Face checkpoint keys with the ``model.`` / ``language_model.``
prefixes removed (``checkpoint.hf_to_longctx`` maps them), so loading is a rename.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention import Attention, rms_norm
from .cache import ChunkedCache, GlobalCache, KVCache
from .config import ModelConfig
from .distributed import ContextParallel
from .moe import MLP, MoE
from .offload import OffloadPolicy
from .rope import inv_frequencies, rope_angles
from .sparse import SparseDecode

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class RMSNorm(nn.Module):
    """``rms_norm`` over the last dim with a learned weight (d,), initialised to ones."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps, self.weight)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = MoE(cfg) if cfg.is_moe[layer] else MLP(cfg.hidden_size, cfg.intermediate_size_mlp)

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: ChunkedCache | GlobalCache | None,
    ) -> torch.Tensor:
        """x (B, T, d) at positions start..start+T-1 -> (B, T, d); see ``Attention.forward``."""
        h = x + self.self_attn(self.input_layernorm(x), start, rope, kv)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class Model(nn.Module):
    """``model(tokens, cache=None) -> logits``: tokens (B, T) int64, logits (B, T, vocab).

    With a cache, the tokens continue at positions ``cache.length ..`` and the cache is
    extended in place; without one, they are a whole sequence starting at position 0.
    """

    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        self.config = cfg
        self.tokenizer = tokenizer
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_frequencies(cfg)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) in the model dtype; (B, 1, V) for the last position if ``last_only``."""
        return self.lm_head(self.hidden(tokens, cache, last_only=last_only))

    def hidden(self, tokens: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden_size), the input of ``lm_head``, or the last
        position's (B, 1, hidden_size) if ``last_only``; training takes logits only where there
        are targets (the head is a quarter of a small model's work). With a context-parallel
        cache every rank passes the same tokens and gets the same result (``longctx.distributed``)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        cp = None if cache is None else cache.context_parallel
        run, start = (tokens, 0 if cache is None else cache.length) if cp is None else cp.begin(self, tokens, cache)
        rope = rope_angles(self.inv_freq, start, run.shape[1], tokens.device)
        x = self.embed_tokens(run)  # (B, T, d)
        for i, block in enumerate(self.layers):
            x = block(x, start, rope, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(tokens)
        if cp is not None:
            x = cp.end(x, cache, last_only)
        elif last_only:
            x = x[:, -1:]
        return self.norm(x)

    def new_cache(
        self,
        batch: int = 1,
        offload: OffloadPolicy | None = None,
        sparse: SparseDecode | None = None,
        context_parallel: bool | ProcessGroup = False,
    ) -> KVCache:
        """An empty KV cache for ``batch`` sequences; ``offload`` places global-layer segments;
        ``sparse`` keeps page summaries and makes one-token decode steps read only the selected
        pages (``longctx.sparse``; default: exact attention). ``context_parallel``: True (the
        default process group) or a ``torch.distributed`` group spreads the context over its
        ranks (``longctx.distributed``; call ``init_process_group`` first)."""
        cfg, device = self.config, self.embed_tokens.weight.device
        cp = None
        if context_parallel is not False and context_parallel is not None:
            cp = ContextParallel(None if context_parallel is True else context_parallel, device)
        return KVCache(cfg.layer_kinds, cfg.attention_chunk_size, batch, device, self.fingerprint, offload, sparse, cp)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the config and a strided sample of every weight (cheap, even for Scout):
        identifies the model a saved cache or a benchmark result belongs to."""
        h = hashlib.sha256(json.dumps(self.config.to_hf(), sort_keys=True).encode())
        for name, p in self.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            if p.device.type != "meta" and p.numel():
                flat = p.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 64)][:64]
                h.update(sample.float().cpu().numpy().tobytes())
        return h.hexdigest()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype
