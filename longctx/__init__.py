"""longctx: long-context document analysis with a Llama-4-Scout-style MoE.

    import longctx
    model = longctx.load_model()                      # the embedded default model, offline
    corpus = longctx.ingest(["reports/", "contract.pdf"])
    session = longctx.Session(model, corpus)          # prefill once
    answer = session.ask("What is the special magic number for pilot-9?")  # what it can answer

The task layers (``Session``, ``run_batch``, ``niah``, ``ruler``, ``compare``) and ``Monitor``
are imported on first use, so ``import longctx`` stays light.
"""

from __future__ import annotations

import importlib

from .cache import CacheError, KVCache, OffloadPolicy
from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ModelConfig
from .distributed import ContextParallelError
from .generate import Generation, generate, prefill, sample
from .model import Model
from .quant import quantize
from .sparse import SparseDecode
from .text.ingest import BudgetError, Corpus, Document, DocumentSpan, IngestError, ingest
from .text.tokenizer import Tokenizer, TokenizerError

__version__ = "0.1.0"

# name -> (module, attribute); attribute None means the module itself.
_LAZY = {
    "Session": ("tasks.qa", "Session"),
    "AnswerStream": ("tasks.qa", "AnswerStream"),
    "Answer": ("tasks.qa", "Answer"),
    "Citation": ("tasks.qa", "Citation"),
    "QAError": ("tasks.qa", "QAError"),
    "run_batch": ("tasks.batch", "run_batch"),
    "niah": ("tasks.niah", None),
    "ruler": ("tasks.ruler", None),
    "compare": ("tasks.compare", "compare"),
    "Monitor": ("monitor", "Monitor"),
    "RoutingCollapse": ("monitor", "RoutingCollapse"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(f".{module}", __name__)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'longctx' has no attribute {name!r}")


__all__ = [
    "BudgetError",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "ContextParallelError",
    "Corpus",
    "Document",
    "DocumentSpan",
    "Generation",
    "IngestError",
    "KVCache",
    "Model",
    "ModelConfig",
    "OffloadPolicy",
    "SparseDecode",
    "Tokenizer",
    "TokenizerError",
    "generate",
    "ingest",
    "load_model",
    "prefill",
    "quantize",
    "sample",
    "save_model",
    *_LAZY,
]
