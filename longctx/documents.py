"""Deprecated alias of :mod:`longctx.text` (kept for one release): import from ``longctx`` or
``longctx.text.*`` instead."""

import warnings

# The names this module exported before the split; longctx.text.ingest keeps importing them all.
from .text.ingest import *  # noqa: F403
from .text.ingest import __all__  # noqa: F401

warnings.warn(
    "longctx.documents is deprecated; use longctx (ingest, Corpus, ...) or longctx.text",
    DeprecationWarning,
    stacklevel=2,
)
