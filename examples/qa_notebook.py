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
#
# What the embedded default model can answer: it is a 2.8 M-parameter model trained only to
# find facts stated as needles ("One of the special magic numbers for pilot-9 is:
# 5512309.") and to name the document that holds one (documents titled by two capitalised
# words, like "Tidal Harbor"). It answers "What is the special magic number for <key>?" (or
# "not stated"), and "Which document mentions the special magic number for <key>?". It cannot
# answer general questions ("What did the cooperative vote to buy?"): it has no language
# understanding beyond those two tasks and would print a number or a title anyway. The same
# calls with a real Llama 4 checkpoint answer general questions:
# `longctx.load_model("/path/to/Llama-4-Scout-17B-16E-Instruct")` (or its hub id, from the
# local Hugging Face cache).

# %%
import argparse
import tempfile
from pathlib import Path

import torch

import longctx
from longctx.generate import default_threads

ap = argparse.ArgumentParser()
ap.add_argument("paths", nargs="*", default=[str(Path(__file__).parent / "batch" / "docs")])
ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
args, _ = ap.parse_known_args()  # tolerate a notebook kernel's own arguments

model = longctx.load_model(args.model)  # None: the embedded default model, offline
# One CPU thread for a small model: more only wait on each other (longctx.generate.default_threads).
if threads := default_threads(model):
    torch.set_num_threads(threads)
corpus = longctx.ingest(args.paths, errors="skip")  # unreadable files are listed, not lost
corpus  # in a notebook: a table of the documents  # noqa: B018
print(corpus)
for skipped in corpus.skipped:
    print("skipped:", skipped)

# %% [markdown]
# `Session` packs the documents (with delimiters and exact spans) and prefills them once.

# %%
session = longctx.Session(model, corpus)
print(session)

# %% [markdown]
# Each `ask` runs on a fork of the prefilled cache: it costs only the question and the answer,
# and questions never see each other. Citations rank documents by the share of the answer's
# global-layer attention that fell on each document (with the page, for PDFs).

# %%
for q in [
    "What is the special magic number for pilot-9?",  # a needle in harbor.md: 5512309
    "Which document mentions the special magic number for cider-press?",
]:  # answers "[id Title]"
    a = session.ask(q, max_new_tokens=24)
    print(f"\nQ: {q}\nA: {a.text}   ({a.question_tokens} + {a.answer_tokens} tokens, {a.seconds:.3f} s)")
    for c in a.citations[:3]:
        print(f"   {c.share:6.1%}  {c.title}" + (f", page {c.page}" if c.page else ""))
    print(f"   {a.other_share:6.1%}  (prompt, delimiters, question, answer)")

# %% [markdown]
# `stream=True` gives the answer's text as it is decoded (a chatbot's way of showing it); the
# finished `Answer` (an HTML table in a notebook; `a.to_dict()` for JSON) is on the stream.
# %%
stream = session.ask("What is the special magic number for cider-press?", max_new_tokens=24, stream=True)
print("\nQ: What is the special magic number for cider-press?\nA: ", end="")
for piece in stream:
    print(piece, end="", flush=True)
print(f"\n   top document: {stream.answer.citations[0].title}")

# %% [markdown]
# The prefilled cache can be saved and loaded later; loading refuses another model, and with
# the corpus given, documents that are not the ones it was built from.

# %%
with tempfile.TemporaryDirectory() as tmp:
    session.save(Path(tmp) / "reports.session")
    again = longctx.Session.load(model, Path(tmp) / "reports.session", corpus)
    print("reloaded:", again.ask("What is the special magic number for pilot-9?", max_new_tokens=24).text)
