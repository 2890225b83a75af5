"""NIAH on the embedded model unquantized, int8 and int4, side by side (issue 25, bar 6).

The embedded model is fp32 and stays fp32: ``load_model(quantize=...)`` keeps the checkpoint's
dtype for the scales, so activations are fp32 and the quantized matmuls take the dequantize +
fp32 matmul path (torch's packed CPU ops want bf16 activations). int8 is per output channel;
int4 uses group 64, because the default 128 does not divide the expert width 192 (the down
projection's input dim). Attention, router, embeddings and head stay fp32 (the default recipe).

Two grids of ``task single`` (haystack english, seed 0, prefix reuse on, as ``longctx niah``):
the README's (1k,2k,4k × depths 0,.25,.5,.75,1 × 2 samples) and a long one (16k,32k × 0,.5,1 × 2).
Each variant runs both grids in turn on ``--threads`` threads; the table reports exact-match
accuracy per length, and how many answers equal the unquantized model's.

    python benchmarks/quant_niah.py --threads 1 --record
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from longctx import load_model
from longctx.cli import parse_depths, parse_lengths
from longctx.tasks import niah
from records import write_record

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"fp32": {}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4", "group_size": 64}}


def run_grid(model, lengths, depths, samples) -> tuple[dict, float]:
    """{(length, depth, sample): (exact, answer)} of one grid, and its wall time in seconds."""
    t0 = time.perf_counter()
    res = niah.run(
        model,
        task="single",
        lengths=lengths,
        depths=depths,
        samples=samples,
        seed=0,
        haystack="english",
        progress=False,
    )
    took = time.perf_counter() - t0
    return {(r["length"], r["depth"], r["sample"]): (bool(r["exact"]), r["answer"]) for r in res.records}, took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="fp32,int8,int4")
    ap.add_argument("--short", type=parse_lengths, default="1k,2k,4k")
    ap.add_argument("--short-depths", type=parse_depths, default="0,0.25,0.5,0.75,1")
    ap.add_argument("--long", type=parse_lengths, default="16k,32k")
    ap.add_argument("--long-depths", type=parse_depths, default="0,0.5,1")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    grids = {"short": (args.short, args.short_depths), "long": (args.long, args.long_depths)}
    results: dict[str, dict[str, tuple[dict, float]]] = {}
    for name in args.variants.split(","):
        model = load_model(**VARIANTS[name])
        results[name] = {}
        for g, (lengths, depths) in grids.items():
            if not lengths:
                continue
            cells, took = run_grid(model, lengths, depths, args.samples)
            results[name][g] = (cells, took)
            hits = sum(e for e, _ in cells.values())
            print(f"{name} {g}: {hits}/{len(cells)} exact, {took:.1f} s", flush=True)
        del model

    base = results.get("fp32")
    body = []
    for g, (lengths, depths) in grids.items():
        if not lengths:
            continue
        body += [
            f"## Grid {niah.length_label(lengths[0])}-{niah.length_label(lengths[-1])}: depths "
            f"{', '.join(f'{d:g}' for d in depths)}, {args.samples} samples",
            "",
            "| weights | "
            + " | ".join(niah.length_label(L) for L in lengths)
            + " | all | vs fp32 (points) | answers equal to fp32 | wall s |",
            "|---|" + "---|" * (len(lengths) + 4),
        ]
        ref_acc = None
        for name, per in results.items():
            cells, took = per[g]
            row = []
            for L in lengths:
                mine = [e for (length, _, _), (e, _) in cells.items() if length == L]
                row.append(f"{sum(mine)}/{len(mine)} ({100 * sum(mine) / len(mine):.0f} %)")
            acc = 100 * sum(e for e, _ in cells.values()) / len(cells)
            ref_acc = acc if name == "fp32" else ref_acc
            delta = "-" if ref_acc is None or name == "fp32" else f"{acc - ref_acc:+.1f}"
            same = (
                "-"
                if base is None or name == "fp32"
                else f"{sum(a == base[g][0][k][1] for k, (_, a) in cells.items())}/{len(cells)}"
            )
            body.append(f"| {name} | " + " | ".join(row) + f" | {acc:.1f} % | {delta} | {same} | {took:.0f} |")
        body.append("")
    print("\n".join(body))
    if args.record:
        facts = [
            "model: the embedded default (fp32), task single, haystack english, seed 0, prefix reuse on, "
            "greedy, 32 new tokens; exact match as `longctx niah` scores it",
            "int8: per output channel; int4: group 64 (128 does not divide the expert width 192); routed + "
            "shared experts quantized, attention / router / embeddings / head fp32; scales fp32, activations "
            "fp32 (the dequantize + fp32 matmul path)",
            "bar: int8 within 2 points of unquantized",
        ]
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        path = write_record(
            RESULTS,
            "quant_niah",
            "NIAH, embedded model unquantized vs int8 vs int4",
            command,
            facts,
            body,
            threads=args.threads,
        )
        print(f"recorded {path}")


if __name__ == "__main__":
    main()
