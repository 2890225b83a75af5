"""Context parallelism on CPU (issue 30, bar 3): one context prefilled by N gloo ranks vs one process.

The embedded model prefills N tokens of English text (``niah.make_haystack``) once in one
process (chunks of ``--chunk-size``) and once spread over ``--ranks`` spawned gloo ranks
(``model.new_cache(context_parallel=True)``: one shard per rank), each process on one thread;
then decodes ``--decode`` tokens in both. Reports per process: global-layer KV bytes held
after prefill (the KV only grows during prefill, so that is its peak), peak resident memory,
prefill wall seconds, the seconds each rank spent waiting on others (``ContextParallel.comm_s``:
transfers and the wait for an earlier rank's KV), and decode ms per token; and checks that every
rank's last logits equal the single process's.

    python benchmarks/context_parallel.py --tokens 64k --ranks 2 --record
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import longctx
from longctx.cache import GlobalCache
from longctx.cli import parse_length
from longctx.generate import prefill
from longctx.tasks import niah
from records import write_record

RESULTS = Path(__file__).parent / "results"


def measure(tokens: int, chunk_size: int, decode: int, context_parallel: bool) -> dict:
    """Prefill and decode in this process (a rank when ``context_parallel``); its figures."""
    torch.set_num_threads(1)
    model = longctx.load_model()
    ids = niah.make_haystack(model.tokenizer, min_tokens=tokens).ids[:tokens]
    x = torch.as_tensor(ids.astype("int64"))[None]
    with torch.inference_mode():
        cache = model.new_cache(context_parallel=context_parallel)
        if context_parallel:
            dist.barrier()  # start the clocks together
        t0 = time.perf_counter()
        logits = prefill(model, x, cache, chunk_size, progress=False)
        prefill_s = time.perf_counter() - t0
        kv = sum(layer.nbytes for layer in cache.layers if isinstance(layer, GlobalCache))
        comm_prefill = cache.context_parallel.comm_s if context_parallel else 0.0
        t0 = time.perf_counter()
        nxt = logits.argmax(-1)
        for _ in range(decode):
            nxt = model(nxt[:, None], cache)[:, -1].argmax(-1)
        decode_s = time.perf_counter() - t0
    return {
        "kv_bytes": kv,
        "prefill_s": prefill_s,
        "comm_s": comm_prefill,
        "decode_ms": 1000 * decode_s / decode,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "logits": logits,
    }


def causal_pairs(pieces: list[tuple[int, int]]) -> int:
    """(query, key) pairs a global layer computes for queries at the positions of ``pieces``:
    a query at p sees p + 1 keys."""
    return sum((b * (b + 1) - a * (a + 1)) // 2 for a, b in pieces)


def balance(tokens: int, world: int, chunk: int) -> list[str]:
    """Global-attention work per rank, counted, for contiguous shards (``shard_bounds``) and for
    zig-zag ones (2N chunk-aligned pieces, rank r holding pieces r and 2N-1-r)."""
    from longctx.distributed import shard_bounds

    contiguous = [[s] for s in shard_bounds(tokens, world, chunk)]
    halves = shard_bounds(tokens, 2 * world, chunk)
    zigzag = [[halves[r], halves[2 * world - 1 - r]] for r in range(world)]
    out = ["| layout | global-attention pairs per rank (millions) | busiest / mean |", "|---|---|---|"]
    for name, layout in (("contiguous", contiguous), ("zig-zag", zigzag)):
        pairs = [causal_pairs(p) for p in layout]
        out.append(
            f"| {name} | {', '.join(f'{p / 1e6:,.0f}' for p in pairs)} | {max(pairs) / (sum(pairs) / world):.2f} |"
        )
    return out


def _rank(rank: int, world: int, folder: str, args: tuple) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rdv", rank=rank, world_size=world, timeout=datetime.timedelta(hours=1)
    )
    torch.save(measure(*args, context_parallel=True), f"{folder}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=parse_length, default=65536)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=2048, help="the single process's prefill chunk")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--record", action="store_true", help=f"write the result to {RESULTS}")
    args = ap.parse_args()
    work = (args.tokens, args.chunk_size, args.decode)
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        one = ctx.Process(target=_one, args=(folder, work))  # its own process too: a fair peak-memory reading
        one.start()
        one.join()
        procs = [ctx.Process(target=_rank, args=(r, args.ranks, folder, work)) for r in range(args.ranks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        ref = torch.load(f"{folder}/one.pt")
        ranks = [torch.load(f"{folder}/rank{r}.pt") for r in range(args.ranks)]
    same = all(torch.allclose(r["logits"], ref["logits"], rtol=1e-4, atol=1e-4) for r in ranks)
    diff = max((r["logits"] - ref["logits"]).abs().max().item() for r in ranks)
    rows = [
        "| process | global KV after prefill (MiB) | share of one process | peak RSS (MiB) | prefill s | "
        "waiting on other ranks s (share) | decode ms/token |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name, m):
        share = m["kv_bytes"] / ref["kv_bytes"]
        wait = f"{m['comm_s']:.2f} ({m['comm_s'] / m['prefill_s']:.0%})" if name != "one process" else "-"
        rows.append(
            f"| {name} | {m['kv_bytes'] / 2**20:.1f} | {share:.3f} | {m['rss_mib']:.0f} | {m['prefill_s']:.1f} | "
            f"{wait} | {m['decode_ms']:.1f} |"
        )

    row("one process", ref)
    for r, m in enumerate(ranks):
        row(f"rank {r} of {args.ranks}", m)
    speed = ref["prefill_s"] / max(m["prefill_s"] for m in ranks)
    chunk = longctx.load_model().config.attention_chunk_size
    lines = [
        *rows,
        "",
        *balance(args.tokens, args.ranks, chunk),
        "",
        f"Prefill speed-up of {args.ranks} ranks over one process (slowest rank): {speed:.2f}x. "
        f"Last-position logits of every rank equal the single process's: {same} (max |diff| {diff:.2e}).",
    ]
    print("\n".join(lines))
    if args.record:
        facts = [
            f"embedded model, {args.tokens:,} tokens of English text (`niah.make_haystack`), fp32; one process "
            f"(prefill chunks of {args.chunk_size}) then {args.ranks} gloo ranks spawned on this machine, "
            "each process on one thread (`torch.set_num_threads(1)`)",
            f"wall time {time.perf_counter() - t0:.0f} s; the machine's 2 cores were shared with other work",
        ]
        write_record(
            RESULTS,
            f"context_parallel_{args.ranks}ranks",
            f"Context parallelism, {args.ranks} gloo ranks vs one process on CPU",
            "python benchmarks/context_parallel.py " + shlex.join(sys.argv[1:]),
            facts,
            lines,
            threads=1,
        )


def _one(folder: str, work: tuple) -> None:
    torch.save(measure(*work, context_parallel=False), f"{folder}/one.pt")


if __name__ == "__main__":
    main()
