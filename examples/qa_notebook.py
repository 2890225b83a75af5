"""Cross-document QA from Python (as in a notebook): prefill once, ask many, cite.

    python examples/qa_notebook.py [folder-or-files ...]

Without arguments it makes a few demo documents, one of which holds the fact asked about.
"""

import sys
import tempfile
from pathlib import Path

from longctx import Session, ingest, load_model

model = load_model()
if len(sys.argv) > 1:
    corpus = ingest(sys.argv[1:], errors="skip")
else:
    folder = Path(tempfile.mkdtemp())
    prose = "The committee met on Tuesday and reviewed the budget for the coming year. " * 12
    for i, name in enumerate(["harbor", "orchard", "glacier", "lantern"]):
        extra = "One of the special magic numbers for amber-falcon is: 4817263. " if i == 2 else ""
        (folder / f"{name}.txt").write_text(prose[: 400 * (i + 1)] + extra + prose)
    corpus = ingest([folder])
print(corpus)

session = Session(model, corpus)  # packs and prefills the corpus once
print(f"prefilled {session.n_tokens} tokens in {session.prefill_s:.2f} s")
for q in ["What is the special magic number for amber-falcon?",
          "Which document mentions the special magic number for amber-falcon?"]:
    a = session.ask(q, max_new_tokens=16)  # a fork of the cache: no re-prefill
    print(f"\nQ: {q}\nA: {a.text}   ({a.prefill_s + a.decode_s:.3f} s)")
    for c in a.citations[:3]:
        print(f"   {c.share:6.1%}  {c.title}" + (f", page {c.page}" if c.page else ""))

with tempfile.TemporaryDirectory() as tmp:
    session.save(Path(tmp) / "session")  # the prefilled cache, written atomically
    again = Session.load(model, Path(tmp) / "session", corpus)  # refuses another model or corpus
    print("\nreloaded session answers:", again.ask("What is the special magic number for amber-falcon?").text)
