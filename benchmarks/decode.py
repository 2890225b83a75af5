"""Decode speed over an offloaded KV cache (issue 3, bar 7).

CPU: prefill a context, then decode with the global-layer KV resident in memory and with it on
the disk tier (memory-mapped files); reports tokens/s for both and checks they decode the same
tokens. CUDA: the model on the GPU, global-layer KV in pinned CPU memory; reports the achieved
host-to-device rate (KV bytes streamed per step / step time) as a fraction of the pinned-copy
rate measured in the same run.

    python benchmarks/decode.py --context 16k --steps 32 --record
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from longctx.cache import OffloadPolicy
from longctx.cli import parse_length
from longctx.config import ModelConfig
from longctx.generate import prefill
from longctx.model import Model
from records import write_record

RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode(model, cache, first: torch.Tensor, steps: int, warmup: int = 2) -> tuple[list[int], float]:
    """Greedy decode ``warmup + steps`` tokens; returns the tokens and the median seconds per
    step over the last ``steps`` (the median: a step that compiles a new kernel specialisation,
    which the growing tail segment can trigger, would otherwise weigh on the mean)."""
    tok, out, times = first, [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(int(tok))  # int() waits for the device: the step is complete
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def profile(model, cache, first: torch.Tensor, steps: int = 3) -> str:
    """torch.profiler's table (top ops by host time) over ``steps`` decode steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with torch.inference_mode(), run_profile(activities=acts) as prof:
        tok = first
        for _ in range(steps):
            tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
            int(tok)
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=18)


def pinned_copy_rate(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Host (pinned) -> device bytes/s for one large copy, best of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="16k")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--heads", type=int, default=None, help="query heads (default: the preset's)")
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads (default: the preset's)")
    ap.add_argument("--head-dim", type=int, default=None, help="head dim (default: the preset's)")
    ap.add_argument(
        "--segment-tokens",
        type=int,
        default=OffloadPolicy().segment_tokens,
        help="tokens per KV segment (default: OffloadPolicy's)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--profile", action="store_true", help="also print a profile of a few steps per tier")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = parse_length(args.context)
    if n <= args.segment_tokens:  # the open tail segment always stays on the device
        ap.error(
            f"--context {args.context} ({n} tokens) must exceed --segment-tokens {args.segment_tokens}: "
            "below that no KV leaves the device and the tiers would not be compared"
        )

    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset)
    # NOTE: the tiny preset's KV is 128 bytes per token and layer; Scout's attention shape
    # (--heads 40 --kv-heads 8 --head-dim 128) makes each step stream 32x more, so transfer,
    # not per-step overhead, is what a GPU run measures.
    shape = {
        k: v
        for k, v in (
            ("num_attention_heads", args.heads),
            ("num_key_value_heads", args.kv_heads),
            ("head_dim", args.head_dim),
        )
        if v is not None
    }
    cfg = dataclasses.replace(cfg, **shape)
    model = Model(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model = model.to(device=device, dtype=dtype)
    tokens = torch.randint(0, cfg.vocab_size, (1, n), device=device)

    resident = model.new_cache(offload=OffloadPolicy(segment_tokens=args.segment_tokens))
    t0 = time.perf_counter()
    last = prefill(model, tokens, resident, 2048, progress=True)
    sync(device)
    prefill_s = time.perf_counter() - t0
    first = last.argmax(-1, keepdim=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":
            lower = OffloadPolicy(device_bytes=0, segment_tokens=args.segment_tokens)  # pinned CPU
            tier = "cpu"
        else:
            lower = OffloadPolicy(device_bytes=0, cpu_bytes=0, disk_dir=tmp, segment_tokens=args.segment_tokens)
            tier = "disk"
        offloaded = model.new_cache(offload=lower)
        prefill(model, tokens, offloaded, 2048)
        for name, cache in (("resident", resident.fork()), (tier, offloaded)):
            if args.profile:
                print(f"profile, {name}:\n{profile(model, cache.fork(), first)}")
            toks, per_step = decode(model, cache, first, args.steps)
            rows[name] = {"tokens": toks, "s_per_step": per_step, "tier_bytes": cache.tier_bytes()}
    same = rows["resident"]["tokens"] == rows[tier]["tokens"]
    lines = [
        f"context {n} tokens, prefill {prefill_s:.1f} s ({n / prefill_s:.0f} tok/s), {args.steps} decode steps "
        "(median step time), "
        f"same tokens resident vs {tier}: {same}"
    ]
    for name, r in rows.items():
        lines.append(
            f"- {name}: {1 / r['s_per_step']:.1f} tok/s ({r['s_per_step'] * 1e3:.2f} ms/step), "
            f"KV bytes by tier {r['tier_bytes']}"
        )
    if device.type == "cuda":
        streamed = rows[tier]["tier_bytes"]["cpu"]
        achieved = streamed / rows[tier]["s_per_step"]
        peak = pinned_copy_rate(device)
        lines.append(
            f"- host->device: {achieved / 1e9:.2f} GB/s achieved, pinned copy {peak / 1e9:.2f} GB/s, "
            f"fraction {achieved / peak:.2f}"
        )
    print("\n".join(lines))
    if args.record:
        cmd = "python benchmarks/decode.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        facts = [
            f"model: `{args.preset}` preset, random weights, {str(dtype).removeprefix('torch.')}; "
            f"attention {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} KV heads, "
            f"head dim {cfg.head_dim}; {cfg.layer_kinds.count('global')} global layer(s), "
            f"segments of {args.segment_tokens} tokens"
        ]
        name = f"decode_{device.type}_seg{args.segment_tokens}"  # one record per device and segment size
        path = write_record(RESULTS, name, "Decode over an offloaded KV cache", cmd, facts, lines, device=str(device))
        print(f"recorded {path}")


if __name__ == "__main__":
    main()
