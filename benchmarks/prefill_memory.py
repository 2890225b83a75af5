"""Peak memory of chunked prefill vs context length (issue 3, bar 5).

Each length runs in a fresh subprocess (so peak RSS is that run's own): the ``tiny`` preset
with random weights prefills N random tokens in chunks; we report peak RSS, the KV bytes the
cache holds at the end, and their difference. With O(chunk) activations and a bounded
chunked-local cache, RSS minus KV should stay flat as N grows.

    python benchmarks/prefill_memory.py --lengths 32k,128k,256k --record
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from longctx.cli import parse_length
from records import write_record

RESULTS = Path(__file__).parent / "results"


def one_run(n: int, chunk_size: int, threads: int) -> dict:
    """Runs inside the child process."""
    import torch

    from longctx.config import ModelConfig
    from longctx.generate import prefill
    from longctx.model import Model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("tiny")).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    tokens = torch.randint(0, model.config.vocab_size, (1, n))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = prefill(model, tokens, cache, chunk_size, progress=False)
    seconds = time.perf_counter() - t0
    assert torch.isfinite(logits).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "tokens": n,
        "chunk_size": chunk_size,
        "seconds": round(seconds, 2),
        "peak_rss": peak,
        "rss_before_prefill": rss_before,
        "kv_bytes": cache.nbytes,
        "peak_minus_kv": peak - cache.nbytes,
        "tokens_per_s": round(n / seconds, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="32k,128k,256k")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="append a result file to benchmarks/results/")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(one_run(args.child, args.chunk_size, args.threads)))
        return
    rows = []
    for n in map(parse_length, args.lengths.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--chunk-size",
                str(args.chunk_size),
                "--threads",
                str(args.threads),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{r['tokens']:>8} tokens  {r['seconds']:>8.1f} s  peak RSS {r['peak_rss'] / 2**20:8.1f} MiB  "
            f"KV {r['kv_bytes'] / 2**20:7.1f} MiB  peak-KV {r['peak_minus_kv'] / 2**20:8.1f} MiB",
            flush=True,
        )
    if args.record:
        spread = max(r["peak_minus_kv"] for r in rows) - min(r["peak_minus_kv"] for r in rows)
        cmd = (
            f"python benchmarks/prefill_memory.py --lengths {args.lengths} --chunk-size {args.chunk_size} "
            f"--threads {args.threads} --record"
        )
        facts = ["model: `tiny` preset (4 layers, 1 global NoPE layer, attention chunk 32), random weights, fp32"]
        lines = ["| tokens | prefill s | tok/s | peak RSS MiB | KV MiB | peak − KV MiB |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} | {r['peak_rss'] / 2**20:.1f} | "
                f"{r['kv_bytes'] / 2**20:.1f} | {r['peak_minus_kv'] / 2**20:.1f} |"
            )
        lines += ["", f"Spread of peak − KV across lengths: {spread / 2**20:.1f} MiB."]
        path = write_record(
            RESULTS, "prefill_memory", "Prefill memory vs length", cmd, facts, lines, threads=args.threads
        )
        print(f"recorded {path}")


if __name__ == "__main__":
    main()
