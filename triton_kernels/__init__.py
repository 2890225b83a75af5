"""Triton kernels with pure-PyTorch references (installed as ``longctx.kernels``).

Each op has a Triton kernel, a host wrapper that checks its arguments, a PyTorch reference
and a dispatcher ``op(..., impl="auto" | "triton" | "reference")``. Triton is optional: it is
imported only when a kernel is about to run.
"""

from .attention import decode_attention, flash_attention, merge_attention
from .quant import moe_matmul, quant_matmul

__all__ = ["flash_attention", "merge_attention", "decode_attention", "moe_matmul", "quant_matmul"]
