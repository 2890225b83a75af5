"""Issue 32, bar 2: a needle whose key a user wrote, planted in a folder of real documents (the
repo's example docs and a PDF), asked through ``Session.ask`` on the embedded model: the value and
the holder's citation in at least 9 of 10 trials.

The keys were written before any model was tried on them, as a user names things: words and
phrases from outside the model's key vocabulary, a code, a number with a word, capitals. Each
trial plants one needle (the other needles of the example docs stay, as distractors) at a
paragraph or line boundary of one document, the documents taking turns.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from text.text_samples import make_pdf  # tests/text/text_samples.py

import longctx
from longctx.checkpoint import DEFAULT_MODEL, load_model
from longctx.tasks import needles
from longctx.tasks.needles import NEEDLE, QUESTION, make_value

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "examples" / "batch" / "docs"

USER_KEYS = (
    "harvest-ledger",
    "Project Nightingale",
    "srv-04b",
    "blue_otter",
    "invoice 2291",
    "north gate",
    "Marlow account",
    "delta-7",
    "KESTREL",
    "rooftop garden",
)

# A three-page report, drawn as lines of text the way a PDF holds them.
REPORT = [
    [
        "Regional Water Board - annual summary",
        "The board met eleven times this year. Rainfall was close to the long-term",
        "average, but it fell unevenly: the spring was wet and the late summer dry,",
        "so the reservoirs were drawn down to sixty percent by the end of August.",
        "Two pumping stations were rebuilt, and the pipe survey found fewer leaks",
        "than expected in the older districts.",
    ],
    [
        "Finances",
        "Operating costs rose by four percent, mostly energy for pumping. The",
        "capital budget paid for the new filter beds at the river works and for",
        "smart meters in nine hundred homes. Water charges stay the same next year.",
        "The auditors asked for a clearer record of contractor invoices.",
    ],
    [
        "Outlook",
        "The board expects demand to grow slowly as the new housing estates fill.",
        "A study of a second intake on the river will report in the spring, and a",
        "public consultation on hosepipe rules will run over the summer.",
    ],
]


def plant(folder: Path, holder: int, sentence: str, rng: random.Random) -> str:
    """Copy the example docs and the report into ``folder``, ``sentence`` planted in document
    number ``holder`` (0-2: the Markdown files in name order, 3: the PDF) between two of its
    paragraphs or lines; returns the holder's file name."""
    names = sorted(p.name for p in DOCS.glob("*.md"))
    for i, name in enumerate(names):
        text = (DOCS / name).read_text()
        if i == holder:
            paragraphs = text.split("\n\n")
            at = rng.randrange(1, len(paragraphs) + 1)  # after the title, anywhere
            text = "\n\n".join(paragraphs[:at] + [sentence] + paragraphs[at:])
        (folder / name).write_text(text)
    pages = [list(p) for p in REPORT]
    if holder == len(names):
        page = rng.randrange(len(pages))
        pages[page].insert(rng.randrange(1, len(pages[page]) + 1), sentence)
    (folder / "report.pdf").write_bytes(make_pdf(pages))
    return (names + ["report.pdf"])[holder]


def trials(model, tmp_path: Path, seed: int = 0) -> list[dict]:
    """One trial per user key: plant, ingest, prefill, ask; what was asked, answered, cited."""
    rng = random.Random(seed)
    out = []
    for i, key in enumerate(USER_KEYS):
        folder = tmp_path / f"trial{i}" / "docs"
        folder.mkdir(parents=True)
        value = make_value(rng)
        holder = plant(folder, i % 4, NEEDLE.format(key=key, value=value), rng)
        # The packed corpus names each document's source as it was given: a relative path keeps
        # the prompt (and so the answer) the same whatever the temporary folder is called.
        cwd = os.getcwd()
        os.chdir(folder.parent)  # (contextlib.chdir is Python 3.11+)
        try:
            corpus = longctx.ingest("docs")
        finally:
            os.chdir(cwd)
        session = longctx.Session(model, corpus, progress=False)
        answer = session.ask(QUESTION.format(key=key), max_new_tokens=16)
        top = answer.citations[0].source if answer.citations else None
        out.append(
            {
                "key": key,
                "value": value,
                "holder": holder,
                "answer": answer.text,
                "cited": Path(top).name if top else None,
                "tokens": session.n_tokens,
            }
        )
        shutil.rmtree(folder.parent)
    return out


def test_each_trial_plants_one_needle_in_the_holder_only(tmp_path):
    """The set-up itself: every document kind holds a needle in some trial, the PDF's text is
    read back with the needle in it, and no key is made of the model's vocabulary words."""
    rng = random.Random(0)
    for i, key in enumerate(USER_KEYS):
        folder = tmp_path / f"t{i}"
        folder.mkdir()
        sentence = NEEDLE.format(key=key, value=make_value(rng))
        holder = plant(folder, i % 4, sentence, rng)
        corpus = longctx.ingest(folder)
        holding = [Path(d.source).name for d in corpus.documents if sentence in d.text.replace("\f", "\n")]
        assert holding == [holder] and len(corpus.documents) == 4
        assert not set(needles.key_words(key)) <= needles._VOCAB_WORDS, key


@pytest.mark.usefixtures("one_thread")
def test_user_keys_in_real_documents_are_answered_and_cited(tmp_path):
    """The shipped model answers ten user-written keys planted in the example documents with
    the value and the holder cited first: 10 of 10 (measured; the vocab-key model it replaced
    found 2), one miss allowed for float differences across platforms."""
    rows = trials(load_model(DEFAULT_MODEL), tmp_path)
    found = [r for r in rows if r["answer"].strip() == r["value"] and r["cited"] == r["holder"]]
    assert len(found) >= 9, "\n".join(map(str, rows))


if __name__ == "__main__":  # the trials on other models: python tests/test_open_keys_docs.py MODEL_DIR ...
    import sys
    import tempfile

    import torch

    torch.set_num_threads(1)
    for path in sys.argv[1:] or [str(DEFAULT_MODEL)]:
        with tempfile.TemporaryDirectory() as d:
            rows = trials(load_model(path), Path(d))
        hits = sum(r["answer"].strip() == r["value"] and r["cited"] == r["holder"] for r in rows)
        print(f"{path}: value and holder's citation in {hits} of {len(rows)}")
        for r in rows:
            print(f"  {r['key']!r:24} in {r['holder']:11} -> {r['answer']!r:34} cites {r['cited']}")
