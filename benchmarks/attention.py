"""Benchmark: longctx's Triton flash-attention vs torch SDPA, causal and chunk-local prefill.

Usage (GPU):
    python benchmarks/attention.py                      # bf16, D=128, Hq 40 / Hkv 8, 1K..128K
    python benchmarks/attention.py --lengths 1024,16384 --modes causal --record

Both sides get the same bf16 tensors q (B, Hq, L, D), k/v (B, Hkv, L, D), q_start = k_start = 0.

* GQA: SDPA is called with ``enable_gqa=True`` (no repeated K/V; torch >= 2.5). On an older
  torch the K/V heads are repeated once, outside the timed region.
* Chunk-local (Llama 4 chunked layers): SDPA runs the chunks folded into the batch dimension
  with ``is_causal=True`` (one call per distinct chunk length). With q_start = k_start = 0
  that is exactly the chunk-local mask and SDPA's fastest form; an explicit boolean mask would
  need O(L^2) memory (16 GiB at 128K) and pushes SDPA off its flash backend.
* FLOPs = 4 * B * Hq * D * (visible query-key pairs): M*N for full attention, M*N/2 for
  causal (the usual convention), the exact count of visible pairs for chunk-local.
* Timing: ``triton.testing.do_bench`` (CUDA events, L2 flush between runs); median ms.

On a machine without CUDA the script runs one tiny case through the PyTorch reference and the
Triton interpreter only, to show the code path works; those times mean nothing.
Works with torch >= 2.4 and triton >= 3.0 (only long-standing APIs are used).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lengths",
        default="1024,2048,4096,8192,16384,32768,65536,131072",
        help="comma-separated sequence lengths (queries = keys)",
    )
    p.add_argument("--modes", default="causal,chunk", help="comma-separated: causal, chunk")
    p.add_argument("--chunk", type=int, default=8192, help="attention chunk size for 'chunk'")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hq", type=int, default=40, help="query heads")
    p.add_argument("--hkv", type=int, default=8, help="KV heads (GQA ratio hq / hkv)")
    p.add_argument("--dim", type=int, default=128, help="head dim")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument(
        "--sdpa-backend",
        default="default",
        choices=["default", "flash", "cudnn", "efficient", "math"],
        help="force one SDPA backend (default: let torch choose)",
    )
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument(
        "--blocks",
        default=None,
        help="tuning: launch shapes to time, each BLOCK_M,BLOCK_N,warps,stages or "
        "'table' (the kernel's own choice), separated by ':'",
    )
    p.add_argument(
        "--record", action="store_true", help="write (replace) JSON + markdown records in benchmarks/results/"
    )
    return p.parse_args(argv)


def parse_blocks(spec: str | None) -> list[tuple[int, int, int, int] | None]:
    """``--blocks`` as a list of launch shapes; None ("table") means the kernel's own table."""
    if not spec:
        return [None]
    shapes = []
    for item in spec.split(":"):
        if item == "table":
            shapes.append(None)
            continue
        try:
            parts = [int(x) for x in item.split(",")]
        except ValueError:
            parts = []
        if len(parts) != 4:
            sys.exit(f"--blocks: {item!r} is not 'table' or BLOCK_M,BLOCK_N,warps,stages")
        shapes.append(tuple(parts))
    return shapes


def pin_blocks(shape: tuple[int, int, int, int] | None) -> None:
    """Make the Triton kernel launch with ``shape`` (None: its own ``_blocks`` table again).

    A tuning aid only: it swaps the table function of the loaded kernel module for this run."""
    from longctx.kernels import attention as attn

    mod = attn._kernels.get()
    table = getattr(mod, "_blocks_table", mod._blocks)
    mod._blocks_table = table
    mod._blocks = table if shape is None else (lambda head_dim, m_rows, dtype, device: shape)


def visible_pairs(L: int, mode: str, chunk: int) -> int:
    """Query-key pairs that do work, for q_start = k_start = 0 and M = N = L."""
    if mode == "causal":
        return L * L // 2  # the convention the published numbers use
    full, rest = divmod(L, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def sdpa_fn(q, k, v, mode: str, chunk: int):
    """A closure running SDPA for ``mode``; GQA via enable_gqa (or K/V repeated here once)."""
    try:
        F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], enable_gqa=True)
        gqa = {"enable_gqa": True}
    except TypeError:  # torch < 2.5
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        gqa = {}
    if mode == "causal":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)

    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    full = (L // chunk) * chunk

    def fold(t, H, lo, hi, c):  # (B, H, L, D) slice -> (B * n_chunks, H, c, D)
        return t[:, :, lo:hi].reshape(B, H, (hi - lo) // c, c, D).transpose(1, 2).reshape(-1, H, c, D)

    pieces = []
    if full:
        pieces.append((fold(q, Hq, 0, full, chunk), fold(k, Hkv, 0, full, chunk), fold(v, Hkv, 0, full, chunk)))
    if full < L:
        pieces.append((q[:, :, full:], k[:, :, full:], v[:, :, full:]))
    return lambda: [F.scaled_dot_product_attention(a, b, c, is_causal=True, **gqa) for a, b, c in pieces]


def bench(fn, args) -> float:
    """Median milliseconds per call."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def sdpa_context(name: str):
    import contextlib

    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }[name]
    )


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        # NOTE: must be set before the kernel module is imported (triton reads it at @jit).
        os.environ["TRITON_INTERPRET"] = "1"
        print(
            "CUDA is not available: running one tiny case through the Triton interpreter\n"
            "(checked against the PyTorch reference and SDPA) only, to show the path works.\n"
            "Times are meaningless.\n"
        )
        args.lengths, args.chunk, args.batch, args.hq, args.hkv, args.dim = "96", 64, 1, 5, 1, 64
        args.dtype = "fp16"  # interpreter: fp16 (bf16 tl.dot is wrong there)
    from longctx.kernels import flash_attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = "cuda" if cuda else "cpu"
    impl = "triton"
    lengths = [int(x) for x in args.lengths.split(",") if x]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("causal", "chunk"):
            sys.exit(f"unknown mode {m!r}; use causal and/or chunk")

    shapes = parse_blocks(args.blocks)
    rows = []
    head = (
        f"{'mode':>6} {'L':>7} {'blocks':>12} {'ours ms':>9} {'TFLOP/s':>8} {'sdpa ms':>9} "
        f"{'TFLOP/s':>8} {'sdpa/ours':>9} {'max|diff|':>9}"
    )
    print(
        f"device: {torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu'}; "
        f"B={args.batch} Hq={args.hq} Hkv={args.hkv} D={args.dim} {args.dtype} "
        f"chunk={args.chunk} sdpa backend={args.sdpa_backend}, GQA via enable_gqa"
    )
    print(head)
    for mode in modes:
        for L in lengths:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(args.batch, args.hq, L, args.dim, device=device, dtype=dtype, generator=g)
            k = torch.randn(args.batch, args.hkv, L, args.dim, device=device, dtype=dtype, generator=g)
            v = torch.randn(k.shape, device=device, dtype=dtype, generator=g)
            chunk = args.chunk if mode == "chunk" else None

            def ours(q=q, k=k, v=v, chunk=chunk):  # bound now: the loop rebinds them
                return flash_attention(q, k, v, q_start=0, k_start=0, causal=True, chunk=chunk, impl=impl)[0]

            sdpa = sdpa_fn(q, k, v, mode, args.chunk)
            flops = 4 * args.batch * args.hq * args.dim * visible_pairs(L, mode, args.chunk)
            with sdpa_context(args.sdpa_backend):
                ref = sdpa()
                ref = ref if isinstance(ref, torch.Tensor) else _unfold(ref, q, args.chunk)
                t_sdpa = bench(sdpa, args)
            for shape in shapes:
                pin_blocks(shape)
                label = ",".join(map(str, shape)) if shape else "table"
                try:
                    diff = (ours().float() - ref.float()).abs().max().item()
                    t_ours = bench(ours, args)
                except Exception as e:  # e.g. a shape over the shared-memory limit
                    print(f"{mode:>6} {L:>7} {label:>12} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                    continue
                finally:
                    pin_blocks(None)
                row = dict(
                    mode=mode,
                    L=L,
                    blocks=label,
                    ours_ms=t_ours,
                    sdpa_ms=t_sdpa,
                    ours_tflops=flops / t_ours / 1e9,
                    sdpa_tflops=flops / t_sdpa / 1e9,
                    speedup=t_sdpa / t_ours,
                    max_abs_diff=diff,
                )
                rows.append(row)
                print(
                    f"{mode:>6} {L:>7} {label:>12} {t_ours:>9.3f} {row['ours_tflops']:>8.1f} "
                    f"{t_sdpa:>9.3f} {row['sdpa_tflops']:>8.1f} {row['speedup']:>9.2f} "
                    f"{diff:>9.2e}"
                )
            if not cuda:  # the smoke run also checks the interpreter against the reference
                ref = flash_attention(q, k, v, q_start=0, k_start=0, chunk=chunk, impl="reference")[0]
                print(
                    f"{'':>6} {'':>7} interpreter vs reference: max|diff| = "
                    f"{(ours().float() - ref.float()).abs().max().item():.2e}"
                )
            del q, k, v, sdpa, ref
            if cuda:
                torch.cuda.empty_cache()
    if args.record:
        record(args, rows, cuda)


def _unfold(outs, q, chunk):
    """Undo sdpa_fn's chunk folding: list of (B*n, H, c, D) -> (B, H, L, D)."""
    B, H, L, D = q.shape
    parts = []
    for o in outs:
        c = o.shape[2]
        parts.append(o.reshape(B, -1, H, c, D).transpose(1, 2).reshape(B, H, -1, D))
    return torch.cat(parts, dim=2)


def record(args, rows, cuda):
    import triton

    RESULTS.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    device = torch.cuda.get_device_name() if cuda else "cpu (reference/interpreter smoke run)"
    meta = dict(
        device=device,
        date=now.isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        config=dict(
            batch=args.batch,
            hq=args.hq,
            hkv=args.hkv,
            dim=args.dim,
            dtype=args.dtype,
            chunk=args.chunk,
            sdpa_backend=args.sdpa_backend,
            blocks="BLOCK_M,BLOCK_N,warps,stages; 'table' = the kernel's own _blocks",
            sdpa_gqa="enable_gqa=True",
            sdpa_chunk="chunks folded into batch, is_causal",
            flops="4*B*Hq*D*visible pairs (causal: L^2/2)",
            timing="do_bench median ms" if cuda else "perf_counter, one call",
        ),
    )
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")[:40]
    # One record per device and configuration; a rerun replaces it (git keeps the earlier ones).
    # Names keep the "attention-" prefix that gpu_session.sh looks for.
    parts = [slug] + ([f"sdpa-{args.sdpa_backend}"] if args.sdpa_backend != "default" else [])
    if args.lengths != parse_args([]).lengths:
        parts.append("-".join(f"{int(x) // 1024}k" if int(x) % 1024 == 0 else x for x in args.lengths.split(",")))
    if len(parse_blocks(args.blocks)) > 2:  # a launch-shape sweep, not the table plus one shape
        parts.append("shapes")
    stem = RESULTS / ("attention-" + "-".join(parts))
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, rows=rows), indent=2) + "\n")
    lines = [
        "# Attention forward: longctx Triton vs torch SDPA",
        "",
        f"- device: {meta['device']}",
        f"- date: {meta['date']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}",
        f"- command: `{meta['command']}`",
        f"- config: {json.dumps(meta['config'])}",
        "",
        "| mode | L | blocks | ours ms | ours TFLOP/s | SDPA ms | SDPA TFLOP/s | SDPA/ours | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['L']} | {r['blocks']} | {r['ours_ms']:.3f} | {r['ours_tflops']:.1f} | "
            f"{r['sdpa_ms']:.3f} | {r['sdpa_tflops']:.1f} | {r['speedup']:.2f} | "
            f"{r['max_abs_diff']:.2e} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"recorded {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
