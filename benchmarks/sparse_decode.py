"""Sparse decode (``longctx.sparse``) against exact decode on the embedded model, on CPU.

1. NIAH accuracy: each cell is prefilled once into a cache with page summaries; its answer is
   then decoded from forks of that cache exactly and with each ``--budgets`` k (top pages per
   KV head and step, besides one sink and one recent page). Reports exact-match accuracy, the
   agreement of sparse answers with exact ones, and the share of global-layer KV read.
2. Decode step time and bytes read: at each ``--speed-contexts`` length the global-layer KV is
   put on the disk tier (memory-mapped files); exact and sparse decode alternate from forks of
   one prefilled cache (``--rounds`` rounds, ``--steps`` greedy steps each, median per step),
   with citations recorded as ``Session.ask`` does. Bytes read per step: exact reads every
   off-device segment; sparse reads are counted row by row (the page cache is not dropped:
   these are the bytes asked of the tier, not disk transfers).

    python benchmarks/sparse_decode.py --record     # -> benchmarks/results/sparse_decode_4k-16k.md
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

import longctx
from longctx import sparse
from longctx.cache import OffloadPolicy
from longctx.cli import parse_lengths
from longctx.generate import generate, prefill
from longctx.sparse import SparseDecode
from longctx.tasks import niah
from records import write_record

RESULTS = Path(__file__).parent / "results"


def with_budget(cache, top_pages: int | None):
    """A fork of ``cache`` (built with page summaries) that decodes with ``top_pages``, or
    exactly (None: the fork drops its summaries)."""
    fork = cache.fork()
    for layer in sparse.layers(fork):
        if top_pages is None:
            layer.pages = None
        else:
            layer.pages.sparse = dataclasses.replace(layer.pages.sparse, top_pages=top_pages)
            layer.pages.reset_reads()
    return fork


def plot(rows: dict, args, path: Path) -> Path | None:
    """Agreement with exact decode against the share of global-layer KV read, one line per
    context length (points: k); None without matplotlib (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for L in args.lengths:
        pts = []
        for k in args.budgets:
            rs = [r for (t, length, kk), r in rows.items() if length == L and kk == k]
            n = sum(r["n"] for r in rs)
            pts.append((sum(r["read"] for r in rs) / n, sum(r["same"] for r in rs) / n, k))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=niah.length_label(L))
        for x, y, k in pts:
            ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("share of global-layer KV read per decode step")
    ax.set_ylabel("answers equal to exact decode's")
    ax.set_ylim(0, 1.05)
    ax.legend(title="context")
    ax.set_title(f"Sparse decode, embedded model ({', '.join(args.tasks)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy(model, args) -> tuple[list[str], dict]:
    tok = model.tokenizer
    variants = [None, *args.budgets]
    rows, lines = {}, []
    for task in args.tasks:
        for sample in range(args.samples):
            hay = niah.make_haystack(tok, "english", max(args.lengths), seed=sample)
            for L in args.lengths:
                for d in args.depths:
                    c = niah.make_cell(tok, task, L, d, sample, 0, hay, model.config.local_chunk)
                    cache = model.new_cache(sparse=SparseDecode(top_pages=0, page_tokens=args.page_tokens))
                    prefill(model, torch.tensor([c.prompt[:-1]]), cache, 1024, progress=False)
                    answers = {}
                    for k in variants:
                        fork = with_budget(cache, k)
                        gen = generate(
                            model, torch.tensor([c.prompt[-1:]]), cache=fork, max_new_tokens=32, progress=False
                        )
                        text = tok.decode(gen.tokens[0]).strip()
                        ok = niah.score(text, c.expected, ordered=c.ordered, any_of=c.any_of)[0]
                        answers[k] = text
                        r = rows.setdefault((task, L, k), {"n": 0, "ok": 0, "same": 0, "read": 0.0})
                        r["n"] += 1
                        r["ok"] += ok
                        r["same"] += text == answers[None]
                        r["read"] += sparse.read_share(fork) if k is not None else 1.0
                    print(
                        f"{task} {L} d={d} s={sample}: " + " | ".join(f"{k}: {a[:12]}" for k, a in answers.items()),
                        flush=True,
                    )
    head = "| task | length | " + " | ".join("exact" if k is None else f"k={k}" for k in variants) + " |"
    lines += [
        "Exact-match accuracy / answers equal to exact decode's / share of global-layer KV read:",
        "",
        head,
        "|---|---|" + "---|" * len(variants),
    ]
    for task in args.tasks:
        for L in args.lengths:
            cells = []
            for k in variants:
                r = rows[(task, L, k)]
                cells.append(
                    f"{r['ok']}/{r['n']}"
                    if k is None
                    else f"{r['ok']}/{r['n']}, same {r['same']}/{r['n']}, read {r['read'] / r['n']:.3f}"
                )
            lines.append(f"| {task} | {niah.length_label(L)} | " + " | ".join(cells) + " |")
    return lines, rows


@torch.inference_mode()
def steps(model, cache, first, n: int) -> tuple[list[int], list[float]]:
    cache.record_attention()  # citations included, as in Session.ask
    tok, out, times = first, [], []
    for _ in range(n):
        t0 = time.perf_counter()
        tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(int(tok))
        times.append(time.perf_counter() - t0)
    cache.attention_mass()
    return out, times


def speed(model, args, tmp: Path) -> list[str]:
    tok = model.tokenizer
    lines = [
        f"Decode with the global-layer KV in segments of {args.segment_tokens} tokens on the disk tier "
        f"(memory-mapped files; the open tail segment on the device), pages of {args.page_tokens} tokens, "
        f"k = {args.speed_budget}; median ms per step over {args.rounds} alternating rounds of {args.steps} "
        "steps (first step of each round dropped); global-layer KV bytes read per step, all tiers and disk:",
        "",
        "| context | exact ms/step | sparse ms/step | exact bytes/step (disk) | sparse bytes/step (disk) | "
        "share read | same tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    per_ctx = {}
    for L in args.speed_contexts:
        hay = niah.make_haystack(tok, "english", L, seed=0)
        c = niah.make_cell(tok, "single", L, 0.5, 0, 0, hay, model.config.local_chunk)
        policy = OffloadPolicy(device_bytes=0, cpu_bytes=0, disk_dir=tmp / f"kv{L}", segment_tokens=args.segment_tokens)
        cache = model.new_cache(
            offload=policy, sparse=SparseDecode(top_pages=args.speed_budget, page_tokens=args.page_tokens)
        )
        t0 = time.perf_counter()
        prefill(model, torch.tensor([c.prompt[:-1]]), cache, 1024, progress=False)
        print(f"{L}: prefill {time.perf_counter() - t0:.1f} s", flush=True)
        first = torch.tensor([c.prompt[-1:]])
        times, toks, read = {None: [], args.speed_budget: []}, {}, {}
        for _ in range(args.rounds):
            for k in times:
                fork = with_budget(cache, k)
                toks[k], ts = steps(model, fork, first, args.steps)
                times[k] += ts[1:]
                if k is not None:
                    read = sparse.bytes_read(fork)
        # Exact decode reads all of every global layer's KV once per step.
        full, full_disk = sum(g.nbytes for g in sparse.layers(cache)), cache.tier_bytes()["disk"]
        total, disk = sum(read.values()) / args.steps, read["disk"] / args.steps
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        per_ctx[L] = ms
        lines.append(
            f"| {niah.length_label(L)} | {ms[None]:.2f} | {ms[args.speed_budget]:.2f} | "
            f"{full:,} ({full_disk:,}) | "
            f"{total:,.0f} ({disk:,.0f}) | {total / full:.4f} | {toks[None] == toks[args.speed_budget]} |"
        )
        print(lines[-1], flush=True)
    if len(per_ctx) > 1:
        lo, hi = min(per_ctx), max(per_ctx)
        lines += [
            "",
            f"Step time {niah.length_label(hi)} / {niah.length_label(lo)}: exact "
            f"{per_ctx[hi][None] / per_ctx[lo][None]:.2f}×, sparse "
            f"{per_ctx[hi][args.speed_budget] / per_ctx[lo][args.speed_budget]:.2f}×.",
        ]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="single,multi_key", type=lambda s: s.split(","))
    ap.add_argument("--lengths", type=parse_lengths, default="4k,8k,16k")
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default="0.25,0.75")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default="4,8,16,32")
    ap.add_argument("--page-tokens", type=int, default=64)
    ap.add_argument("--segment-tokens", type=int, default=4096, help="KV segment size for the speed runs")
    ap.add_argument("--speed-contexts", type=parse_lengths, default="16k,64k")
    ap.add_argument("--speed-budget", type=int, default=8)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument(
        "--record",
        action="store_true",
        help=f"write {RESULTS}/sparse_decode_<lengths>.md (with --skip-accuracy: sparse_decode_speed.md)",
    )
    ap.add_argument(
        "--load-note",
        default="2 cores, several jobs",
        help="what else ran on the machine, for the record (default: 2 cores, several jobs)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = longctx.load_model()
    t0 = time.perf_counter()
    body, png = [], None
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_accuracy:
            lines, rows = accuracy(model, args)
            body += lines + [""]
            png = plot(rows, args, Path(tmp) / "sparse_decode.png")
        body += speed(model, args, Path(tmp))
        wall = time.perf_counter() - t0
        print("\n".join(body))
        if args.record:
            record(args, argv, wall, body, png)
    return 0


def record(args, argv, wall: float, body: list[str], png) -> None:
    """Write the record: the speed part alone is its own (a rerun of it keeps the accuracy record)."""
    cmd = "python benchmarks/sparse_decode.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    # One record per span of lengths (a 256K-only run must not replace the 16K-128K one).
    span = niah.length_label(min(args.lengths)) + (
        f"-{niah.length_label(max(args.lengths))}" if len(set(args.lengths)) > 1 else ""
    )
    name, what = ("sparse_decode_speed", ", decode step time") if args.skip_accuracy else (f"sparse_decode_{span}", "")
    path = write_record(
        RESULTS,
        name,
        f"Sparse decode vs exact{what}, embedded model",
        cmd,
        [
            f"wall time {wall:.0f} s; one process, exact and sparse alternating",
            f"machine shared with other work: {args.load_note}",
        ],
        body,
        threads=1,
        png=png,
    )
    print(f"recorded {path}")


if __name__ == "__main__":
    sys.exit(main())
