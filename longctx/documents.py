"""Deprecated alias of :mod:`longctx.text` (kept for one release): import from ``longctx`` or
``longctx.text.*`` instead."""

import warnings

from .text.ingest import *  # noqa: F401,F403
from .text.ingest import __all__  # noqa: F401

warnings.warn("longctx.documents is deprecated; use longctx (ingest, Corpus, ...) or longctx.text",
              DeprecationWarning, stacklevel=2)
