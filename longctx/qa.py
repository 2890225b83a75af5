"""Deprecated alias of :mod:`longctx.tasks.qa` and :mod:`longctx.tasks.batch` (kept for one
release): import from ``longctx`` (Session, Answer, run_batch, ...) or ``longctx.tasks`` instead."""

import warnings

from .tasks.batch import run_batch  # noqa: F401
from .tasks.qa import Answer, Citation, QAError, Session  # noqa: F401

warnings.warn(
    "longctx.qa is deprecated; use longctx (Session, run_batch, ...), longctx.tasks.qa or longctx.tasks.batch",
    DeprecationWarning,
    stacklevel=2,
)
