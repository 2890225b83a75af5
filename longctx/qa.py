"""Deprecated alias of :mod:`longctx.tasks.qa` (kept for one release): import from ``longctx``
(Session, Answer, run_batch, ...) or ``longctx.tasks`` instead."""

import warnings

from .tasks.qa import Answer, Citation, QAError, Session, run_batch  # noqa: F401

warnings.warn("longctx.qa is deprecated; use longctx (Session, run_batch, ...) or longctx.tasks.qa",
              DeprecationWarning, stacklevel=2)
