"""Shared fixtures: tiny random models, and tiny HF checkpoints written by transformers."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

# Triton decides interpreter-or-compiled when it is first imported (its @jit runs at import),
# and some tests import it indirectly (transformers' Llama 4 module does). Without a GPU the
# interpreter is the only mode Triton can run in, so import it in that mode before anything
# else does; the kernel tests still switch TRITON_INTERPRET on only around their own calls.
if not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved

import importlib.util

from longctx.config import ModelConfig
from longctx.model import Model


def tiny_config(**overrides) -> ModelConfig:
    """The ``tiny`` preset with a 5-token attention chunk and floor_scale 3, so that chunk
    boundaries and temperature tuning are crossed within a few dozen tokens."""
    base = dataclasses.asdict(ModelConfig.preset("tiny"))
    base.update(
        vocab_size=97,
        attention_chunk_size=5,
        floor_scale=3,
        no_rope_layers=[],
        moe_layers=None,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8,
        },
        bos_token_id=1,
        eos_token_id=[2],
        pad_token_id=0,
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.25) -> Model:
    """A Model with weights large enough that logits are O(1-10) and routing is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    model = Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def text_model(tokenizer, seed: int = 0, **overrides) -> Model:
    """A random tiny model over ``tokenizer``'s vocabulary (attention chunk 32), tokenizer
    attached, for tests that go through text: NIAH, QA sessions, the CLI."""
    cfg = tiny_config(
        vocab_size=tokenizer.vocab_size,
        attention_chunk_size=32,
        floor_scale=64,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=[tokenizer.eot_id],
        pad_token_id=tokenizer.pad_id,
        **overrides,
    )
    model = random_model(cfg, seed=seed, std=0.1)
    model.tokenizer = tokenizer
    return model


@pytest.fixture
def tiny_model():
    return random_model(tiny_config())


@pytest.fixture(scope="module")
def one_thread():
    """Tests on tiny models gain nothing from more threads, and on a busy 2-core machine
    (CI) oversubscribed threads make each small matmul tens of times slower; restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tok():
    """The embedded tokenizer (shared, read-only)."""
    from longctx.text.tokenizer import Tokenizer

    return Tokenizer.default()


@pytest.fixture(scope="module")
def model(tok):
    """A random tiny model over the embedded tokenizer (``text_model``); a test module that needs
    another model defines its own ``model`` fixture, which takes precedence."""
    return text_model(tok)


@pytest.fixture
def triton_device(monkeypatch):
    """Device on which a Triton kernel runs: CUDA, else CPU via TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"
