"""Hugging Face Llama-4 checkpoints <-> ``Model``.

A checkpoint is a folder with ``config.json``, safetensors weights (one file, or shards listed
in ``model.safetensors.index.json``) and optionally a tiktoken ``tokenizer.model``. Keys may
carry the ``language_model.`` prefix (``Llama4ForConditionalGeneration``) or not
(``Llama4ForCausalLM``); vision keys are ignored. Only safetensors are read: nothing is ever
unpickled. Weights stream one tensor at a time into a model allocated directly on the target
device, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .model import Model

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "default"
_IGNORED_PREFIXES = ("vision_model.", "multi_modal_projector.")


class CheckpointError(RuntimeError):
    """A checkpoint folder that can't be loaded; the message names the file or tensor."""


def hf_to_longctx(key: str) -> str | None:
    """Map a HF text-model key to our parameter name; None for keys that are not ours (vision).

    ``language_model.model.layers.0.self_attn.q_proj.weight`` -> ``layers.0.self_attn.q_proj.weight``
    ``language_model.lm_head.weight`` -> ``lm_head.weight``; routed experts keep their
    ``experts.gate_up_proj`` / ``experts.down_proj`` names (no ``.weight`` in HF either).
    """
    key = key.removeprefix("language_model.")
    if key.startswith(_IGNORED_PREFIXES):
        return None
    return key.removeprefix("model.")


def longctx_to_hf(name: str) -> str:
    """Our parameter name -> the ``Llama4ForCausalLM`` key (inverse of ``hf_to_longctx``)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def _weight_files(folder: Path) -> dict[str, list[str] | None]:
    """{file name: keys it should hold (from the index) or None (read from the file)}."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(fname, []).append(key)
        missing = sorted(f for f in files if not (folder / f).exists())
        if missing:
            raise CheckpointError(f"{folder}: shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if not found:
        what = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise CheckpointError(f"{folder}: no *.safetensors weights (found {what}); "
                              ".bin/.pth checkpoints are not loaded because they would need unpickling")
    return dict.fromkeys(found)


def load_model(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Model:
    """Load a Llama-4 text model from a HF folder; ``path=None`` loads the embedded default.

    dtype: None keeps the checkpoint's dtype (config ``torch_dtype`` / ``dtype``, else the
    first tensor's). Raises ``CheckpointError`` naming the missing/unexpected/mis-shaped
    tensor or missing shard, ``ConfigError`` for a bad config.json.
    """
    from safetensors import SafetensorError, safe_open

    from .text.tokenizer import Tokenizer

    folder = Path(DEFAULT_MODEL if path is None else path)
    if not folder.is_dir():
        hint = " (the embedded default model has not been trained yet: see examples/train_tiny_model.py)" if path is None else ""
        raise CheckpointError(f"{folder}: not a checkpoint folder{hint}")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json")
    raw = json.loads(cfg_path.read_text())
    cfg = ModelConfig.from_file(cfg_path)
    files = _weight_files(folder)
    if dtype is None:
        name = (raw.get("text_config") or {}).get("torch_dtype") or raw.get("torch_dtype") or raw.get("dtype")
        dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None

    with torch.device("meta"):
        model = Model(cfg)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for fname, keys in files.items():
        fpath = folder / fname
        try:
            with safe_open(str(fpath), framework="pt", device="cpu") as f:
                present = set(f.keys())
                absent = [k for k in (keys or []) if k not in present]
                if absent:
                    raise CheckpointError(f"{fpath}: tensors listed in the index are missing: {', '.join(absent[:5])}")
                for key in sorted(present):
                    name = hf_to_longctx(key)
                    if name is None:
                        continue
                    if name not in params:
                        unexpected.append(key)
                        continue
                    param = params[name]
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(param.shape):
                        raise CheckpointError(f"{fpath}: tensor {key} has shape {list(shape)}, "
                                              f"the config needs {list(param.shape)}")
                    t = f.get_tensor(key)
                    if dtype is None:
                        dtype = t.dtype
                    _assign(model, name, t.to(device=device, dtype=dtype))
                    loaded.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"{fpath}: unreadable safetensors file ({e})") from None
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensors (not in a Llama-4 text model of this config): "
                              f"{', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}")
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(set(params) - loaded - tied)
    if missing:
        raise CheckpointError(f"{folder}: missing tensors: {', '.join(longctx_to_hf(m) for m in missing[:8])}"
                              f"{' …' if len(missing) > 8 else ''}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    tok = folder / "tokenizer.model"
    model.tokenizer = Tokenizer.from_file(folder) if tok.exists() else None
    return model.eval()


def _assign(model: Model, name: str, value: torch.Tensor) -> None:
    """Replace the (meta) parameter ``name`` with ``value``: no second copy is allocated."""
    *path, leaf = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=False))


def save_model(model: Model, folder: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write ``model`` as a ``Llama4ForCausalLM`` folder (config.json, model.safetensors,
    tokenizer.model if a tokenizer is given or attached) that ``load_model`` and transformers read."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {longctx_to_hf(n): t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok = tokenizer or model.tokenizer
    if tok is not None:
        tok.save(folder / "tokenizer.model")
    return folder


__all__ = ["CheckpointError", "ConfigError", "hf_to_longctx", "longctx_to_hf", "load_model", "save_model"]
