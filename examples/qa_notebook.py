# %% [markdown]
# # Cross-document QA from a notebook
#
# Prefill a pile of documents once, ask as many questions as you like, and see which document
# each answer came from. The cells below (`# %%`) open as a notebook in Jupyter (jupytext) or
# VS Code, or run top to bottom as a script:
#
#     python examples/qa_notebook.py [files or folders ...] [--model CHECKPOINT]
#
# Without paths it uses the three reports in `examples/batch/docs/`.

# %%
import argparse
import tempfile
from pathlib import Path

import longctx

ap = argparse.ArgumentParser()
ap.add_argument("paths", nargs="*", default=[str(Path(__file__).parent / "batch" / "docs")])
ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
args, _ = ap.parse_known_args()  # tolerate a notebook kernel's own arguments

model = longctx.load_model(args.model)  # None: the embedded default model, offline
corpus = longctx.ingest(args.paths, errors="skip")  # unreadable files are listed, not lost
print(corpus)
for skipped in corpus.skipped:
    print("skipped:", skipped)

# %% [markdown]
# `Session` packs the documents (with delimiters and exact spans) and prefills them once.

# %%
session = longctx.Session(model, corpus)
print(f"prefilled {session.n_tokens} tokens in {session.prefill_s:.2f} s")

# %% [markdown]
# Each `ask` runs on a fork of the prefilled cache: it costs only the question and the answer,
# and questions never see each other. Citations rank documents by the share of the answer's
# global-layer attention that fell on each document (with the page, for PDFs).

# %%
for q in ["What is the special magic number for quiet-otter?",
          "What did the cooperative vote to buy?"]:
    a = session.ask(q, max_new_tokens=24)
    print(f"\nQ: {q}\nA: {a.text}   ({a.question_tokens} + {a.answer_tokens} tokens, {a.seconds:.3f} s)")
    for c in a.citations[:3]:
        print(f"   {c.share:6.1%}  {c.title}" + (f", page {c.page}" if c.page else ""))
    print(f"   {a.other_share:6.1%}  (prompt, delimiters, question, answer)")

# %% [markdown]
# The prefilled cache can be saved and loaded later; loading refuses another model, and with
# the corpus given, documents that are not the ones it was built from.

# %%
with tempfile.TemporaryDirectory() as tmp:
    session.save(Path(tmp) / "reports.session")
    again = longctx.Session.load(model, Path(tmp) / "reports.session", corpus)
    print("reloaded:", again.ask("What is the special magic number for quiet-otter?", max_new_tokens=24).text)
