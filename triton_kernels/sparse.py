"""Page scoring for query-aware sparse decode (Quest): dispatcher, checks, PyTorch reference.

``page_scores(q, kmin, kmax)``: q (B, Hq, D) one query token per batch row; kmin, kmax
(B, Hkv, N, D) the element-wise min and max of the keys of N pages per KV head. For query head
h and page n, the bound sum_d max(q_d·kmin_d, q_d·kmax_d) is at least q·k for every key k of
the page; a KV head's score is the max of the bounds of its Hq/Hkv query heads (GQA: a page
matters to the KV head if it matters to any of its queries). Returns (B, Hkv, N) float32.

``impl``: "reference" (two matmuls: the positive part of q against kmax plus the negative part
against kmin, the same sum), "triton" (the kernel; an error if it cannot run), "auto" (the
kernel on CUDA tensors, or on CPU when TRITON_INTERPRET=1; otherwise the reference).
"""

from __future__ import annotations

import torch

from ._env import KernelModule, device_blocker, use_triton

_IMPLS = ("auto", "triton", "reference")
_kernels = KernelModule(f"{__package__}._sparse_triton")


def _check(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
    for name, t in (("q", q), ("kmin", kmin), ("kmax", kmax)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or kmin.dim() != 4:
        raise ValueError(f"q must be (B, Hq, D) and kmin (B, Hkv, N, D), got {tuple(q.shape)} and {tuple(kmin.shape)}")
    if kmin.shape != kmax.shape:
        raise ValueError(f"kmin and kmax shapes differ: {tuple(kmin.shape)} vs {tuple(kmax.shape)}")
    B, Hq, D = q.shape
    if kmin.shape[0] != B or kmin.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} does not fit page bounds {tuple(kmin.shape)} (batch, head dim)")
    if kmin.shape[1] == 0 or Hq % kmin.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({kmin.shape[1]}) for GQA")
    if not (q.device == kmin.device == kmax.device):
        raise ValueError(f"q, kmin, kmax must be on one device, got {q.device}, {kmin.device}, {kmax.device}")


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Quest upper bounds of q·k per page and KV head (see the module docstring):
    q (B, Hq, D), kmin/kmax (B, Hkv, N, D) -> (B, Hkv, N) float32."""
    _check(q, kmin, kmax)
    if kmin.shape[2] == 0:
        return torch.empty(kmin.shape[:3], dtype=torch.float32, device=q.device)
    if use_triton(impl, _IMPLS, device_blocker(q.device.type)):
        return _backend_scores(q, kmin, kmax)
    return _reference(q, kmin, kmax)


def _backend_scores(q, kmin, kmax):
    mod = _kernels.get()
    if mod.INTERPRET:  # the interpreter reads bf16 as raw bits in some ops: compute on fp32 copies
        q, kmin, kmax = q.float(), kmin.float(), kmax.float()
    return mod.launch(q.contiguous(), kmin.contiguous(), kmax.contiguous())


def _reference(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """max(a·lo, a·hi) = max(a, 0)·hi + min(a, 0)·lo for lo <= hi: two matmuls, no (N, D) temporaries."""
    Hkv = kmin.shape[1]
    qf = q.float().unflatten(1, (Hkv, -1))  # (B, Hkv, G, D)
    s = qf.clamp(min=0) @ kmax.float().transpose(-1, -2) + qf.clamp(max=0) @ kmin.float().transpose(-1, -2)
    return s.amax(2)  # (B, Hkv, N)
