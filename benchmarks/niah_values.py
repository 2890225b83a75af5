"""NIAH single with other values and other wording than the embedded model trained on.

The model trained on one needle sentence ("One of the special magic numbers for {key} is:
{value}."), one question and 7-digit values. This swaps each in turn (values: shorter and longer
numbers, codes, words; wording: the question, the needle, both with another noun) and scores
the same grid, open keys, so a user knows which lookups it does:

    python benchmarks/niah_values.py --threads 1 --record
"""

from __future__ import annotations

import argparse
import random
import shlex
import string
import sys
import tempfile
from pathlib import Path

import torch

import longctx
from longctx.tasks import needles, niah
from records import write_record

RESULTS = Path(__file__).parent / "results"
TRAINED = (needles.NEEDLE, needles.QUESTION, needles.make_value)
WORDS = ("harbor", "lantern", "meadow", "copper", "violet", "granite", "saddle", "quarry", "thistle", "beacon")


def code(rng: random.Random) -> str:
    """Like ``kqz-42b``."""
    letters = lambda n: "".join(rng.choice(string.ascii_lowercase) for _ in range(n))  # noqa: E731
    return f"{letters(3)}-{rng.randrange(10, 100)}{letters(1)}"


VALUES = {
    "7-digit number (trained)": TRAINED[2],
    "4-digit number": lambda rng: str(rng.randrange(1_000, 10_000)),
    "10-digit number": lambda rng: str(rng.randrange(10**9, 10**10)),
    "code (`kqz-42b`)": code,
    "one word": lambda rng: rng.choice(WORDS),
}
WORDINGS = {
    "trained wording": TRAINED[:2],
    "question reworded": (TRAINED[0], "Tell me the special magic number for {key}."),
    "needle reworded": ("The special magic number for {key} is {value}.", TRAINED[1]),
    '"access code" for "special magic number" in both': (
        "The access code for {key} is {value}.",
        "What is the access code for {key}?",
    ),
}


def score(model, wording: tuple[str, str], value, lengths, depths, samples: int) -> tuple[int, int]:
    """Right answers and cells of the single-needle grid with this needle/question and values.
    ``niah`` builds a cell from ``needles``' templates at call time: they are swapped for the run."""
    needles.NEEDLE, needles.QUESTION = wording
    needles.make_value = value
    try:
        with tempfile.TemporaryDirectory() as tmp:
            res = niah.run(
                model,
                lengths=lengths,
                depths=depths,
                samples=samples,
                out=Path(tmp) / "cells.jsonl",
                progress=False,
            )
    finally:
        needles.NEEDLE, needles.QUESTION, needles.make_value = TRAINED
    rows = res.records
    return sum(r["exact"] for r in rows), len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1k,4k")
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/niah_values.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = longctx.load_model()
    lengths = args.lengths.split(",")  # "1k"-style: niah.run parses them
    depths = [float(x) for x in args.depths.split(",")]
    # Values with the trained wording, then wordings with the trained values.
    runs = [(v, "trained wording") for v in VALUES] + [("7-digit number (trained)", w) for w in list(WORDINGS)[1:]]
    body = ["| value | wording | exact |", "|---|---|---|"]
    for v, w in runs:
        ok, n = score(model, WORDINGS[w], VALUES[v], lengths, depths, args.samples)
        body.append(f"| {v} | {w} | {ok}/{n} |")
        print(body[-1], flush=True)
    if args.record:
        facts = [
            f"model: the embedded default, open keys, NIAH single, lengths {args.lengths} x depths {args.depths} x "
            f"{args.samples} samples, seed 0, greedy; exact = the answer is the value",
            'question reworded: "'
            + WORDINGS["question reworded"][1]
            + '"; needle reworded: "'
            + WORDINGS["needle reworded"][0]
            + '"',
        ]
        cmd = "python benchmarks/niah_values.py " + shlex.join(sys.argv[1:])
        path = write_record(RESULTS, "niah_values", "NIAH single, other values and wording", cmd, facts, body)
        print("recorded", path)


if __name__ == "__main__":
    main()
