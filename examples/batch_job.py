"""A batch QA job: a JSONL file of jobs in, a JSONL file of answers out (resumable).

    python examples/batch_job.py                    # writes demo docs + jobs, runs them
    torchrun --nproc-per-node 2 examples/batch_job.py   # the same, sharded over 2 processes

Equivalent command line: `longctx batch jobs.jsonl --out answers.jsonl`. Kill it at any point
and run it again: answered questions are skipped, nothing is written twice.
"""

import json
from pathlib import Path

from longctx import load_model, run_batch

work = Path("batch_example")
(work / "docs").mkdir(parents=True, exist_ok=True)
for name, key, value in [("harbor", "quiet-otter", "5512309"), ("orchard", "bold-crane", "7093415")]:
    (work / "docs" / f"{name}.txt").write_text(
        "The shipment arrived late because of the storm. " * 30
        + f"One of the special magic numbers for {key} is: {value}. " + "Everyone went home early. " * 20)
jobs = [
    {"id": "harbor-and-orchard", "corpus": str(work / "docs"),
     "questions": [{"id": "q1", "question": "What is the special magic number for quiet-otter?"},
                   {"id": "q2", "question": "What is the special magic number for bold-crane?"}]},
    {"id": "missing", "corpus": str(work / "no-such-folder"), "questions": ["Recorded as an error, not a crash."]},
]
(work / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))

out = run_batch(load_model(), work / "jobs.jsonl", work / "answers.jsonl", max_new_tokens=16)
for line in out.read_text().splitlines():
    rec = json.loads(line)
    print(rec["job"], rec["id"], rec.get("answer"), rec["error"] or "")
