"""Deprecated alias of :mod:`longctx.text` (kept for one release): import from ``longctx`` or
``longctx.text.*`` instead."""

import warnings

from .text.document import PAGE_SEPARATOR, BudgetError, Document, DocumentSpan, Duplicate, IngestError, Skipped
from .text.ingest import Corpus, ingest
from .text.pack import DEFAULT_MARKER, DEFAULT_TEMPLATE, Packed, delimiters

__all__ = [
    "DEFAULT_MARKER",
    "DEFAULT_TEMPLATE",
    "PAGE_SEPARATOR",
    "BudgetError",
    "Corpus",
    "Document",
    "DocumentSpan",
    "Duplicate",
    "IngestError",
    "Packed",
    "Skipped",
    "delimiters",
    "ingest",
]

warnings.warn(
    "longctx.documents is deprecated; use longctx (ingest, Corpus, ...) or longctx.text",
    DeprecationWarning,
    stacklevel=2,
)
