"""Ingest a folder of documents and pack it for the model, with exact spans.

    python examples/ingest.py                 # a small demo folder made on the fly
    python examples/ingest.py path/to/folder  # your own .txt / .md / .html / .pdf files

Shows what `ingest` read and skipped, the packed layout (each document between a delimiter
line with its id and title), which tokens belong to which document and page, and what
happens when the corpus does not fit a token budget.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from longctx.text.ingest import BudgetError, ingest
from longctx.text.tokenizer import Tokenizer


def demo_folder(root: Path) -> Path:
    """A few documents of each kind, one duplicate and one unreadable file."""
    (root / "contracts").mkdir()
    (root / "reports").mkdir()
    (root / "contracts" / "lease.txt").write_text(
        "LEASE AGREEMENT\n\nThe tenant pays 1,200 EUR per month, due on the first day.\n"
        "Either party may end the lease with three months' notice.\n",
        encoding="utf-8",
    )
    (root / "contracts" / "lease_copy.txt").write_text(  # same text: reported as a duplicate
        (root / "contracts" / "lease.txt").read_text(encoding="utf-8"), encoding="utf-8"
    )
    (root / "reports" / "q3.md").write_text(
        "# Q3 report\n\nRevenue rose 12 % to 4.1 M EUR. The Oslo office opened in August.\n", encoding="utf-8"
    )
    (root / "reports" / "press.html").write_text(
        "<html><head><title>Press release</title><style>p {color: red}</style></head>"
        "<body><h1>New office</h1><p>We opened in Oslo &amp; Bergen.</p>"
        "<script>track()</script></body></html>",
        encoding="utf-8",
    )
    (root / "reports" / "scan.pdf").write_bytes(b"%PDF-1.4\n truncated")  # unreadable on purpose
    return root


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(argv[0]) if argv else demo_folder(Path(tmp))

        # errors="skip": unreadable files are listed in corpus.skipped instead of raising.
        corpus = ingest(folder, errors="skip")
        print(corpus)
        for doc in corpus:
            pages = f", {doc.n_pages} pages" if doc.n_pages else ""
            print(f"  [{doc.id}] {doc.title!r:24} {doc.format:8} {len(doc.text):6} chars{pages}  {doc.source}")
        for s in corpus.skipped:
            print(f"  skipped    {s.path}: {s.reason}")
        for d in corpus.duplicates:
            print(f"  duplicate  {d.path} (same text as document {d.kept_id})")

        tok = Tokenizer.default()
        packed = corpus.pack(tok)
        print(f"\n{packed}")
        print(tok.decode(packed.ids[:60]) + " ...\n")
        for span in packed.spans[:8]:
            page = f" page {span.page}" if span.page else ""
            print(f"  tokens {span.start:6}..{span.end:<6} document {span.doc_id}{page}: {span.title!r}")

        # Which document (and page) did a token come from? Delimiter tokens give None.
        middle = packed.spans[0].start + len(packed.spans[0]) // 2
        doc, page = packed.locate(middle)
        print(f"\n  token {middle} comes from document {doc.id} ({doc.title!r}), page {page}")
        print(f"  token 0 is part of a delimiter: locate(0) = {packed.locate(0)}")

        # A budget: an error that says how far over, unless a policy is chosen.
        budget = len(packed) - 20
        try:
            corpus.pack(tok, budget=budget)
        except BudgetError as e:
            print(f"\n  budget {budget}: {e.over} tokens over")
        for policy in ("drop", "truncate"):
            fit = corpus.pack(tok, budget=budget, overflow=policy)
            cut = [s.doc_id for s in fit.spans if s.truncated]
            print(
                f"  overflow={policy!r}: {len(fit)} tokens, documents {[d.id for d in fit.documents]}, "
                f"dropped {[d.id for d in fit.dropped]}, truncated {cut}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
