"""RULER-style evaluation of the embedded model (or a checkpoint), and a comparison of variants.

    python benchmarks/ruler.py --record benchmarks/results              # -> ruler_embedded.md
    python benchmarks/ruler.py --lengths 1k,4k --samples 1 --tasks common_words,variable_tracking
    python benchmarks/ruler.py --qa my_squad.jsonl --tasks qa            # document QA on a local file
    python benchmarks/ruler.py --quant --record benchmarks/results      # -> compare_quant.md (+ .png)

The RULER run is ``longctx.tasks.ruler.run`` (journals in <out>/<task>.jsonl: a rerun resumes)
and prints the table of RULER scores (share of expected strings in the answer) per task and
length, the average, and the effective length against RULER's threshold (85.6 %). It runs on
one CPU thread (``torch.set_num_threads(1)``) unless told otherwise. ``--quant`` instead
compares the model in fp32, int8 and int4 (group 64) with ``longctx.tasks.compare``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from longctx import load_model
from longctx.cli import parse_depths, parse_lengths
from longctx.tasks import niah, ruler
from longctx.tasks.compare import compare, load_variants
from records import write_record

ALL = ("single", "multi_key", "multi_value", "multi_query", *ruler.TASKS[:-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(
        prog="benchmarks/ruler.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    ap.add_argument(
        "--tasks", default=None, help=f"comma-separated (default: {','.join(ALL)}; --quant: single,multi_key)"
    )
    ap.add_argument("--lengths", type=parse_lengths, default=None, help="default 1k-16k (--quant: 1k,2k,4k)")
    ap.add_argument("--depths", type=parse_depths, default="0.25,0.75")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--qa", type=Path, default=None, help="a SQuAD/HotpotQA-style JSON(L) file for task qa")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quant", action="store_true", help="compare fp32, int8 and int4 (group 64) instead")
    ap.add_argument("--out", type=Path, default=Path("ruler_results"))
    ap.add_argument("--record", type=Path, default=None, metavar="DIR", help="write the record into DIR")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",") if args.tasks else (["single", "multi_key"] if args.quant else list(ALL))
    lengths = args.lengths or ([1024, 2048, 4096] if args.quant else [1024 * 2**i for i in range(5)])
    span = f"{niah.length_label(lengths[0])}-{niah.length_label(lengths[-1])}"
    grid = f"tasks {', '.join(tasks)}; lengths {span}; depths {args.depths}; samples {args.samples}; seed 0"
    t0 = time.perf_counter()
    png = None
    if args.quant:
        variants = load_variants([args.model], ["none", "int8", "int4"], group_size=64)
        cmp = compare(
            variants, tasks=tasks, lengths=lengths, depths=args.depths, samples=args.samples, out=args.out / "compare"
        )
        png = args.out / "compare_quant.png"
        cmp.plot(png, title="embedded model: fp32 vs int8 vs int4 (group 64)")
        body = [cmp.to_markdown()]
        name, title = "compare_quant", "compare: fp32 vs int8 vs int4 (group 64)"
    else:
        res = ruler.run(
            load_model(args.model),
            tasks=tasks,
            lengths=lengths,
            depths=args.depths,
            samples=args.samples,
            out=args.out,
            qa=args.qa,
        )
        cells = sum(len(r.records) for r in res.by_task.values())
        exact = ruler.RulerResults(res.by_task).to_markdown(metric="substring").split("\n\neffective")[0]
        body = [
            "RULER score (% of expected strings found in the answer):",
            "",
            res.to_markdown(),
            "",
            "substring match (every expected string as whole words; QA: one of them), %:",
            "",
            exact,
            "",
            f"{cells} cells",
        ]
        name, title = "ruler_" + ("embedded" if args.model is None else Path(args.model).name), "RULER-style tasks"
    elapsed = time.perf_counter() - t0
    body.append(f"wall time: {elapsed / 60:.1f} min")
    print("\n".join(body))
    if args.record:
        facts = [f"model: {args.model or 'embedded default (longctx/assets/default)'}", grid]
        path = write_record(
            args.record, name, title, "python benchmarks/ruler.py " + " ".join(argv), facts, body, png=png
        )
        print(f"recorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
