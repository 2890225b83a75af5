"""A batch QA job: a JSONL file of jobs in, a JSONL file of answers out (resumable).

    python examples/batch_job.py                                  # examples/batch/jobs.jsonl
    python examples/batch_job.py my_jobs.jsonl --out answers.jsonl --model /path/to/checkpoint
    torchrun --nproc-per-node 2 examples/batch_job.py             # the same, sharded over 2 processes

Equivalent command line: `longctx batch examples/batch/jobs.jsonl --out out/batch_answers.jsonl`.

One job per line: {"id": ..., "corpus": a folder or file, or a list of them (relative paths are
relative to the jobs file), "questions": [{"id": ..., "question": ...} or plain strings]}.
Kill it at any point and run it again: answered questions are skipped and nothing is written
twice. A job naming a missing corpus, a malformed line or a question too long for the context
becomes an error line; the other jobs still run (`longctx batch` then exits with status 1).

The embedded default model answers only what it was trained for: "What is the special magic
number for <key>?" about a needle sentence in the documents ("not stated" when no document has
one) and "Which document mentions the special magic number for <key>?" (answered as the
document's "[id Title]" marker). General questions need a real checkpoint (--model).
"""

import argparse
import json
import os
from pathlib import Path

import torch

from longctx import load_model, run_batch
from longctx.generate import default_threads
from longctx.tasks.batch import count_answers

HERE = Path(__file__).parent
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("jobs", nargs="?", type=Path, default=HERE / "batch" / "jobs.jsonl")
ap.add_argument("--out", type=Path, default=Path("out") / "batch_answers.jsonl")
ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
ap.add_argument("--max-new-tokens", type=int, default=24)
args = ap.parse_args()

args.out.parent.mkdir(parents=True, exist_ok=True)
model = load_model(args.model)
# One CPU thread for a small model: more only wait on each other (longctx.generate.default_threads).
if threads := default_threads(model):
    torch.set_num_threads(threads)
out = run_batch(model, args.jobs, args.out, max_new_tokens=args.max_new_tokens)

if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 holds the merged file
    answered, failed = count_answers(out)
    print(f"{answered} answered, {failed} failed (see {out})")
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        if rec["error"]:
            print(f"{rec['job']}/{rec['id']}: ERROR {rec['error']}")
        else:
            top = rec["citations"][0] if rec["citations"] else None
            cite = f"  [{top['title']} {top['share']:.0%}]" if top else ""
            print(f"{rec['job']}/{rec['id']}: {rec['question']}\n    -> {rec['answer']}{cite}")
