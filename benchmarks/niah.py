"""Needle-in-a-haystack benchmark: a depth × length grid on the embedded model or a checkpoint.

    python benchmarks/niah.py                                   # embedded model: 1k,2k,4k x 5 depths x 2
    python benchmarks/niah.py --task multi_key --lengths 1k,8k,32k --depths 0,.5,1 --samples 3
    python benchmarks/niah.py --model /path/to/Llama-4-Scout --device cuda --lengths 128k,1m
    python benchmarks/niah.py --record benchmarks/results                   # -> niah_single_1k-4k.md
    python benchmarks/niah.py --compare-reuse --record benchmarks/results  # -> niah_prefix_reuse_1k-4k.md
    python benchmarks/niah.py --compare-keys --lengths 1k,2k,4k,8k,16k --samples 10 --record benchmarks/results
                                                    # -> niah_keys_single_1k-16k.md: vocab vs open keys

The grid run is the library's `longctx niah` (same options; writes <out>/<task>.jsonl, one
line per cell, a rerun resumes, and <out>/<task>.png, prints the tables and the effective
length). This script adds what only a benchmark needs: --compare-reuse (the grid with and
without prefix reuse, timed, answers compared), --compare-keys (the grid with the vocab keys and
with open keys of held-out words, same haystacks and seeds, per-length accuracy side by side, and
the MoE layers' routing over both runs under ``longctx.Monitor``) and --record (the current
record of this configuration: task or comparison, lengths, device kind; a rerun replaces it).
--keys open|vocab picks the needles' keys of a single grid (``niah.run(keys=)``; default open).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from longctx.cli import add_niah_arguments, niah_grid, niah_inputs
from longctx.monitor import Monitor
from longctx.monitor_report import RoutingCollapse
from longctx.tasks import needles, niah
from records import write_record


def compare_reuse(args) -> tuple[bool, list[str]]:
    """Run the grid twice with prefix reuse and twice without, in the order reuse, none, none,
    reuse (a drift in machine load hits both alike). Returns (all four runs gave the same
    answers, the report as markdown lines)."""
    model, kw = niah_inputs(args)
    # Warm-up outside the timings: haystack encoding (cached) and first-call allocations.
    niah.run(
        model,
        **{**kw, "lengths": [min(kw["lengths"])], "depths": [0.0], "samples": 1},
        reuse_prefix=False,
        progress=False,
    )
    timings, prefill_s, decode_s = {True: 0.0, False: 0.0}, {True: 0.0, False: 0.0}, {True: 0.0, False: 0.0}
    answers, tokens, runs, consistent = {}, {}, [], True
    for reuse in (True, False, False, True):
        t = time.perf_counter()
        res = niah.run(model, **kw, reuse_prefix=reuse)
        took = time.perf_counter() - t
        timings[reuse] += took
        runs.append(f"{'reuse' if reuse else 'no reuse'} {took:.1f} s")
        got = sorted((r["length"], r["depth"], r["sample"], r["answer"]) for r in res.records)
        answers.setdefault(reuse, got)
        consistent = consistent and answers[reuse] == got  # runs of one mode agree too
        tokens[reuse] = sum(r["new_prefill_tokens"] + r.get("base_prefill_tokens", 0) for r in res.records)
        prefill_s[reuse] += sum(r["prefill_s"] for r in res.records)
        decode_s[reuse] += sum(r["decode_s"] for r in res.records)
    same = answers[True] == answers[False] and consistent
    body = [
        f"prefix reuse: {timings[True] / 2:.1f} s, no reuse: {timings[False] / 2:.1f} s (mean of 2 runs each; "
        f"in order: {', '.join(runs)}), speed-up {timings[False] / timings[True]:.2f}x, "
        f"same answers: {same} ({len(res.records)} cells)",
        f"prefilled tokens: {tokens[True]:,} with reuse (base extensions included), {tokens[False]:,} "
        f"without ({tokens[False] / max(1, tokens[True]):.2f}x)",
        f"prefill time (base extensions included): {prefill_s[True] / 2:.1f} s with reuse, "
        f"{prefill_s[False] / 2:.1f} s without ({prefill_s[False] / max(1e-9, prefill_s[True]):.2f}x); "
        f"decode time {decode_s[True] / 2:.1f} s / {decode_s[False] / 2:.1f} s (the same work either way)",
        "",
        "```",
        res.table(),
        "```",
    ]
    print("\n".join(body))
    return same, body


def compare_keys(args) -> tuple[bool, list[str]]:
    """Run the grid with the vocab keys, then with open keys (``niah.run(keys=)``), on the same
    model, haystacks and seeds, under one ``longctx.Monitor``. Returns (no MoE layer collapsed
    at the monitor's default threshold, the report as markdown lines): exact accuracy per length
    for both key kinds, both grids, and each MoE layer's routing over both runs."""
    model, kw = niah_inputs(args)
    kw.pop("keys")  # both kinds run below
    args.out.mkdir(parents=True, exist_ok=True)
    res, took = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RoutingCollapse)
        with Monitor(model) as mon:
            for keys in needles.KEY_KINDS:
                t = time.perf_counter()
                res[keys] = niah.run(model, **kw, keys=keys, out=args.out / f"{args.task}_{keys}.jsonl")
                took[keys] = time.perf_counter() - t
        report = mon.report()
    collapses = [str(w.message) for w in caught if issubclass(w.category, RoutingCollapse)]
    lengths = sorted({r["length"] for r in res["vocab"].records})
    body = [
        "| keys | " + " | ".join(niah.length_label(L) for L in lengths) + " | all |",
        "|---|" + "---|" * (len(lengths) + 1),
    ]
    for keys in needles.KEY_KINDS:
        recs = res[keys].records
        row = [sum(r["exact"] for r in recs if r["length"] == L) / sum(r["length"] == L for r in recs) for L in lengths]
        body.append(
            f"| {keys} | " + " | ".join(f"{a:.0%}" for a in row) + f" | {sum(r['exact'] for r in recs)}/{len(recs)} |"
        )
    body += ["", "exact match per cell (length × depth):", ""]
    for keys in needles.KEY_KINDS:
        body += [f"{keys} keys ({took[keys]:.1f} s):", "", "```", res[keys].table("exact"), "```", ""]
    body += [
        "Routing over both runs (`longctx.Monitor`, default threshold): tokens per expert, the busiest "
        "expert's share of the layer's tokens",
        "",
        "| MoE layer | tokens per expert | busiest share | collapse threshold | normalised entropy |",
        "|---|---|---|---|---|",
    ]
    for e in report.experts:
        body.append(
            f"| {e.layer} | {', '.join(map(str, e.counts))} | {e.busiest_share:.1%} | {report.threshold(e):.1%} | "
            f"{e.entropy_normalised:.3f} |"
        )
    body += ["", "RoutingCollapse warnings: " + ("; ".join(collapses) if collapses else "none")]
    print("\n".join(body))
    return not collapses, body


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(
        prog="benchmarks/niah.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_niah_arguments(ap)  # --keys among them
    ap.add_argument("--compare-reuse", action="store_true", help="run with and without prefix reuse; compare")
    ap.add_argument(
        "--compare-keys",
        action="store_true",
        help="run with vocab keys and with open keys of held-out words; compare, with the routing",
    )
    ap.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write a result file (device, date, command, numbers) into DIR",
    )
    args = ap.parse_args(argv)
    if args.stats is not None and (args.compare_keys or args.compare_reuse):
        ap.error("--stats writes the report of a single grid (--compare-keys reports the routing itself)")
    png = None
    if args.compare_keys:
        same, body = compare_keys(args)  # "same": no routing collapse
        name, what = "niah_keys", f"{args.task}, vocab keys vs open keys of held-out words"
    elif args.compare_reuse:
        same, body = compare_reuse(args)
        name, what = "niah_prefix_reuse", f"prefix reuse vs none, task {args.task}"
    else:
        _, body, png = niah_grid(args)
        same, name, what = True, f"niah_{args.task}", args.task
    if args.record:
        # One current record per configuration: the task (or the comparison), the lengths, the device kind.
        lengths = sorted(args.lengths)
        span = niah.length_label(lengths[0]) + (f"-{niah.length_label(lengths[-1])}" if len(lengths) > 1 else "")
        name += f"_{args.task}" if args.compare_keys else ""
        name += f"_{span}" + ("_vocab" if args.keys == "vocab" and not args.compare_keys else "")
        name += "_cuda" if args.device.startswith("cuda") else ""
        facts = [
            f"model: {args.model or 'embedded default (longctx/assets/default)'}",
            f"lengths {args.lengths}, depths {args.depths}, samples {args.samples}, seed {args.seed}, "
            f"haystack {args.haystack}" + ("" if args.compare_keys else f", keys {args.keys}"),
        ]
        path = write_record(
            args.record,
            name,
            f"NIAH {what}",
            "python benchmarks/niah.py " + " ".join(argv),
            facts,
            body,
            device=args.device,
            png=png,
        )
        print(f"recorded {path}")
    return 0 if same else 1  # 1: --compare-reuse's modes answered differently, --compare-keys saw a collapse


if __name__ == "__main__":
    sys.exit(main())
