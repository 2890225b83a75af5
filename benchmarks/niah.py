"""Needle-in-a-haystack benchmark: a depth × length grid on the embedded model or a checkpoint.

    python benchmarks/niah.py                                   # embedded model, defaults below
    python benchmarks/niah.py --task multi_key --lengths 1k,8k,32k --depths 0,.5,1 --samples 3
    python benchmarks/niah.py --model /path/to/Llama-4-Scout --device cuda --lengths 128k,1m
    python benchmarks/niah.py --compare-reuse --record          # prefix reuse vs none, same run

Writes <out>/<task>.jsonl (one line per cell, resumable), <out>/<task>.png (heatmap) and
prints the table and the effective length.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from longctx import niah
from longctx.checkpoint import load_model

RESULTS = Path(__file__).parent / "results"


def parse_length(s: str) -> int:
    s = s.strip().lower()
    return int(float(s.rstrip("km")) * {"k": 1024, "m": 1024 * 1024}.get(s[-1], 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="single", choices=niah.TASKS)
    ap.add_argument("--lengths", default="1k,2k,4k", help="comma-separated, e.g. 1k,32k,1m")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", default="english", help="english | noise | a folder or file to ingest")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-size", type=int, default=1024, help="prefill chunk (tokens)")
    ap.add_argument("--out", type=Path, default=Path("niah_results"))
    ap.add_argument("--no-reuse", action="store_true", help="prefill every cell from scratch")
    ap.add_argument("--compare-reuse", action="store_true", help="run with and without prefix reuse; compare")
    ap.add_argument("--record", action="store_true", help="write a result file to benchmarks/results/")
    args = ap.parse_args(argv)

    lengths = [parse_length(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    model = load_model(args.model, device=args.device)
    haystack = args.haystack
    if haystack not in ("english", "noise"):
        from longctx.documents import ingest

        haystack = ingest([haystack])
    common = dict(task=args.task, lengths=lengths, depths=depths, samples=args.samples, seed=args.seed,
                  haystack=haystack, chunk_size=args.chunk_size)
    t0 = time.perf_counter()
    if args.compare_reuse:
        timings, answers = {}, {}
        for reuse in (True, False):
            t = time.perf_counter()
            res = niah.run(model, **common, reuse_prefix=reuse)
            timings[reuse] = time.perf_counter() - t
            answers[reuse] = [(r["length"], r["depth"], r["sample"], r["answer"]) for r in res.records]
        same = sorted(answers[True]) == sorted(answers[False])
        speedup = timings[False] / timings[True]
        report = (f"prefix reuse: {timings[True]:.1f} s, no reuse: {timings[False]:.1f} s, speed-up {speedup:.2f}x, "
                  f"same answers: {same}")
        print(res.table())
        print(report)
        if args.record:
            _record(args, argv, lengths, depths, [report, "", "```", res.table(), "```"], "niah_prefix_reuse")
        return 0 if same else 1

    out_jsonl = args.out / f"{args.task}.jsonl"
    res = niah.run(model, **common, out=out_jsonl, reuse_prefix=not args.no_reuse)
    elapsed = time.perf_counter() - t0
    print(res.table("exact"))
    print(res.table("substring"))
    eff = res.effective_length(0.9)
    print(f"effective length (substring accuracy >= 90 % at every length up to it): {eff['effective_length']} tokens")
    try:
        png = res.heatmap(args.out / f"{args.task}.png", title=f"NIAH {args.task} ({'embedded' if args.model is None else args.model})")
        print(f"wrote {out_jsonl} and {png} in {elapsed:.1f} s")
    except ImportError as e:
        print(f"wrote {out_jsonl} in {elapsed:.1f} s; no heatmap: {e}", file=sys.stderr)
    if args.record:
        _record(args, argv, lengths, depths, ["```", res.table("exact"), "", res.table("substring"), "```", "",
                                               f"effective length at 90 %: {eff['effective_length']}",
                                               f"wall time: {elapsed:.1f} s"], f"niah_{args.task}")
    return 0


def _record(args, argv, lengths, depths, body: list[str], stem: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    day = datetime.date.today().isoformat()
    path = RESULTS / f"{stem}_{day}.md"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"
    cmd = "python benchmarks/niah.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path.write_text("\n".join([f"# NIAH {args.task} ({day})", "", f"- device: {device}", f"- command: `{cmd}`",
                               f"- model: {args.model or 'embedded default (longctx/assets/default)'}",
                               f"- lengths {lengths}, depths {depths}, samples {args.samples}, seed {args.seed}, "
                               f"haystack {args.haystack}", "", *body]) + "\n")
    print(f"recorded {path}")


if __name__ == "__main__":
    sys.exit(main())
