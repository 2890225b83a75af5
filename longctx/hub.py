"""Hugging Face conventions: where a checkpoint lives (local folders, hub ids in the local cache,
offline), how its tensor keys map to ours, and dtype and device names.

    resolve_checkpoint("meta-llama/Llama-4-Scout-17B-16E-Instruct")  # -> .../snapshots/<commit>/
    resolve_dtype("bfloat16"), resolve_device("auto")

Nothing here reaches the network: a hub id is found only if ``huggingface-cli download`` (or
transformers) already put it in the local cache. The cache is found the way huggingface_hub
finds it: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``; inside it, ``models--{org}--{name}/refs/{revision}`` names the
commit whose ``snapshots/{commit}/`` folder holds the files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .config import ConfigError

# A hub id: "org/name" (letters, digits, '-', '_', '.'), optionally "@revision"; never a path
# that starts with '.', '/' or '~'. Only used when no folder of that name exists.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")

_IGNORED_PREFIXES = ("vision_model.", "multi_modal_projector.")

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}  # fmt: skip


class CheckpointError(RuntimeError):
    """A checkpoint that can't be found or loaded; the message names the path, file or tensor."""


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


def hub_cache() -> Path:
    """The local Hugging Face hub cache folder (it may not exist)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder for ``path``: an existing folder as it is, or a hub id ``org/name``
    (``org/name@revision``; default revision ``main``) looked up in the local hub cache.

    Raises ``CheckpointError`` saying which: the path is a file, it does not exist, or the hub id
    is not in the cache (naming the folder it looked in and how to fill it)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a folder path or hub id (str), got {type(path).__name__}")
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise CheckpointError(f"{folder}: is a file, not a checkpoint folder")
    text = os.fspath(path)
    m = _HUB_ID.match(text)
    if m is None or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{folder}: does not exist")
    return _snapshot(m["repo"], m["rev"] or "main")


def _snapshot(repo: str, revision: str) -> Path:
    cache = hub_cache()
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    fetch = f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision != "main" else "")
    if not repo_dir.is_dir():
        raise CheckpointError(
            f"{repo}: not a local folder and not in the Hugging Face cache ({repo_dir} does not exist); "
            f"download it first ({fetch}) or pass the folder's path"
        )
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision  # a revision may be a commit hash
    snap = repo_dir / "snapshots" / commit
    if not snap.is_dir():
        have = sorted(p.name for p in (repo_dir / "snapshots").glob("*")) if (repo_dir / "snapshots").is_dir() else []
        raise CheckpointError(
            f"{repo}@{revision}: no snapshot in the Hugging Face cache ({snap} does not exist; "
            f"snapshots there: {', '.join(have) or 'none'}); download it first ({fetch})"
        )
    return snap


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` / ``"auto"`` -> None (keep the checkpoint's dtype); a name (``"bfloat16"``,
    ``"bf16"``, ``"float16"``, ``"float32"``, ...) or a floating ``torch.dtype`` -> that dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype: {dtype} is not a floating-point dtype")
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ConfigError(f"dtype: {dtype!r} is not one of 'auto', {', '.join(map(repr, _DTYPES))} or a torch.dtype")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> the first CUDA device if torch sees one, else the CPU; otherwise the device
    named, checked to be usable here (a one-line ``ConfigError`` instead of torch's assertion)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device: {device!r} is not a device torch knows ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {device!r} asked for, but this torch build sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type not in ("cpu", "meta"):
        raise ConfigError(f"device: {device!r} is not supported (use 'cpu', 'cuda', 'cuda:N' or 'auto')")
    return dev
