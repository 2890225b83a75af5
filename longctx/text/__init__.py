"""Floor 2, text: the tokenizer, prompt layout, document records, readers, ingest and packing.
Imports the model core only where it must; never imports ``longctx.tasks``.

    tokenizer.py  Tokenizer: encode (lists or int32 arrays), decode, chat template
    vocab.py      rank files, the Llama 4 special-token table, the tokenizer sidecar
    bpe.py        train_bpe: learn rank tables
    prompt.py     the document-QA prompt layout
    document.py   Document, DocumentSpan, Skipped, Duplicate, IngestError, BudgetError
    readers.py    one file -> Document (txt/md, HTML, PDF)
    ingest.py     ingest(): files, folders, in-memory texts -> Corpus (walk, dedupe)
    pack.py       pack(): Corpus -> Packed token ids with exact spans (layout, markers, budget)

NOTE: the function `ingest` is not re-exported here: it would hide the submodule
`longctx.text.ingest` (`import longctx.text.ingest as m` would give the function). Use
`longctx.ingest` or `longctx.text.ingest.ingest`.
"""

from .document import BudgetError, Document, DocumentSpan, Duplicate, IngestError, Skipped
from .ingest import Corpus
from .pack import DEFAULT_MARKER, DEFAULT_TEMPLATE, Packed, delimiters
from .tokenizer import Tokenizer, TokenizerError

__all__ = [
    "DEFAULT_MARKER",
    "DEFAULT_TEMPLATE",
    "BudgetError",
    "Corpus",
    "Document",
    "DocumentSpan",
    "Duplicate",
    "IngestError",
    "Packed",
    "Skipped",
    "Tokenizer",
    "TokenizerError",
    "delimiters",
]
