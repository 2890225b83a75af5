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

from . import compressed_tensors
from .config import ConfigError, ModelConfig
from .hub import CheckpointError, hf_to_longctx, longctx_to_hf, resolve_checkpoint, resolve_device, resolve_dtype
from .model import Model
from .quant import QuantizedExperts, QuantizedLinear, prepare, quantized_modules, scheme_bits

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "default"


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
        raise CheckpointError(
            f"{folder}: no *.safetensors weights (found {what}); "
            ".bin/.pth checkpoints are not loaded because they would need unpickling"
        )
    return dict.fromkeys(found)


# ----------------------------------------------------------------------------- compressed-tensors


# Module names (checkpoint side, prefixes removed) whose ``.weight`` is an nn.Linear matmul: the
# modules a compressed-tensors "Linear" target can mean.
def load_model(
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    group_size: int = 128,
    quantize_attention: bool = False,
) -> Model:
    """Load a Llama-4 text model; ``path=None`` loads the embedded default.

    path: a checkpoint folder, or a hub id (``"meta-llama/Llama-4-Scout-17B-16E-Instruct"``,
    optionally ``@revision``) found in the local Hugging Face cache, offline (``longctx.hub``).
    device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``; a device this torch cannot use is a
    ``ConfigError``. dtype: None / ``"auto"`` keeps the checkpoint's dtype (config
    ``torch_dtype`` / ``dtype``, else the first tensor's); else a name (``"bfloat16"``) or a
    ``torch.dtype``. ``quantize`` ("int4" | "int8" | None), ``group_size`` and
    ``quantize_attention`` are ``longctx.quant.quantize``'s, applied tensor by tensor while
    streaming (no full-precision copy of a quantized layer is ever held beside the model). A
    compressed-tensors ``pack-quantized`` checkpoint is loaded as stored (bit-identical, not
    re-quantized); other quantization configs raise ``CheckpointError`` naming them.
    Raises ``CheckpointError`` naming the missing/unexpected/mis-shaped tensor or missing
    shard, ``ConfigError`` for a bad config.json, ValueError for a bad scheme / group size.
    """
    from safetensors import SafetensorError, safe_open

    from .text.tokenizer import Tokenizer

    device, dtype = resolve_device(device), resolve_dtype(dtype)
    folder = resolve_checkpoint(DEFAULT_MODEL if path is None else path)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no config.json)")
    tokenizer_file = _tokenizer_file(folder)
    cfg = ModelConfig.from_file(cfg_path)  # validated: types, ranges, finiteness (ConfigError)
    raw = json.loads(cfg_path.read_text())
    ct = compressed_tensors.read_config(raw, cfg_path)
    if ct is not None and quantize is not None:
        raise CheckpointError(
            f"{folder}: the checkpoint is already quantized (compressed-tensors); "
            f"load it with quantize=None, not {quantize!r}"
        )
    if quantize is not None:
        scheme_bits(quantize)
    files = _weight_files(folder)
    if dtype is None:
        name = (raw.get("text_config") or {}).get("torch_dtype") or raw.get("torch_dtype") or raw.get("dtype")
        dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None

    keys: dict[str, str] = {}  # checkpoint key -> file (headers only)
    stored_dtypes: set[str] = set()
    try:
        for fname, listed in files.items():
            with safe_open(str(folder / fname), framework="pt", device="cpu") as f:
                present = set(f.keys())
                stored_dtypes.update(f.get_slice(k).get_dtype() for k in present)
            absent = [k for k in (listed or []) if k not in present]
            if absent:
                raise CheckpointError(
                    f"{folder / fname}: tensors listed in the index are missing: {', '.join(absent[:5])}"
                )
            keys.update(dict.fromkeys(sorted(present), fname))
    except SafetensorError as e:
        raise CheckpointError(f"{folder}: unreadable safetensors file ({e})") from None

    check_weight_bytes(cfg, folder, list(files), 0.5 if ct is not None else _min_itemsize(stored_dtypes))
    with torch.device("meta"):
        model = Model(cfg)
    expected_extra: set[str] = set()
    if ct is not None:
        quantized = compressed_tensors.prepare_model(model, keys, *ct, cfg_path)
        expected_extra = compressed_tensors.expected_names(model, quantized)
    elif quantize is not None:
        for qname in prepare(model, quantize, group_size, quantize_attention):
            mod = model.get_submodule(qname)
            expected_extra.update(
                [f"{qname}.gate_up_proj", f"{qname}.down_proj"]
                if isinstance(mod, QuantizedExperts)
                else [f"{qname}.weight"]
            )
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for fname in dict.fromkeys(keys.values()):
        fpath = folder / fname
        try:
            with safe_open(str(fpath), framework="pt", device="cpu") as f:
                for key in (k for k, v in keys.items() if v == fname):
                    name = hf_to_longctx(key)
                    if name is None:
                        continue
                    if name in params:
                        param = params[name]
                        shape = tuple(f.get_slice(key).get_shape())
                        if shape != tuple(param.shape):
                            raise CheckpointError(
                                f"{fpath}: tensor {key} has shape {list(shape)}, the config needs {list(param.shape)}"
                            )
                        t = f.get_tensor(key)
                        if dtype is None and t.is_floating_point():
                            dtype = t.dtype
                        # copy=True: safetensors hands out views of its memory map; a kept view
                        # would pin the whole shard in memory for the model's lifetime.
                        _assign(model, name, t.to(device=device, dtype=dtype, copy=True))
                    elif name in expected_extra and ct is None:  # quantize while streaming
                        t = f.get_tensor(key)
                        if dtype is None:
                            dtype = t.dtype
                        mod_name, _, leaf = name.rpartition(".")
                        mod = model.get_submodule(mod_name)
                        try:
                            if isinstance(mod, QuantizedExperts):
                                mod.set_weight(leaf, t.to(device=device, dtype=dtype))
                            else:
                                mod.set_weight(t.to(device=device, dtype=dtype))
                        except ValueError as e:
                            raise CheckpointError(f"{fpath}: tensor {key}: {e}") from None
                        del t
                    elif name in expected_extra and compressed_tensors.assign(
                        model, name, f.get_tensor(key), device, dtype, f"{fpath}: {key}"
                    ):
                        pass
                    else:
                        unexpected.append(key)
                        continue
                    loaded.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"{fpath}: unreadable safetensors file ({e})") from None
    if unexpected:
        raise CheckpointError(
            f"{folder}: unexpected tensors (not in a Llama-4 text model of this config): "
            f"{', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}"
        )
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted((set(params) | expected_extra) - loaded - tied)
    if missing:
        raise CheckpointError(
            f"{folder}: missing tensors: {', '.join(longctx_to_hf(m) for m in missing[:8])}"
            f"{' …' if len(missing) > 8 else ''}"
        )
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.tokenizer = None if tokenizer_file is None else Tokenizer.from_file(tokenizer_file)
    return model.eval()


# Bytes per element of the safetensors dtypes that can hold weights.
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
}
# A checkpoint whose config implies more weight bytes than this many times what its files hold is
# refused before the model is built. Every parameter is stored at least at the smallest element
# size found in the files (0.5 B for packed int4), so a valid checkpoint implies at most its file
# sizes; the 25 % margin absorbs layouts whose parameter count our formula slightly overstates.
WEIGHT_BYTES_TOLERANCE = 1.25


def _min_itemsize(dtypes: set[str]) -> float:
    sizes = [_DTYPE_BYTES[d] for d in dtypes if d in _DTYPE_BYTES]
    return min(sizes) if sizes else 1.0


def check_weight_bytes(cfg: ModelConfig, folder: Path, files: list[str], bytes_per_param: float) -> None:
    """Refuse a config that implies far more weights than the files hold, before anything is
    allocated: ``cfg.num_parameters() * bytes_per_param`` against the sum of the weight files'
    sizes (times ``WEIGHT_BYTES_TOLERANCE``, plus 1 MiB for headers). Raises CheckpointError."""
    held = sum((folder / f).stat().st_size for f in files)
    implied = cfg.num_parameters() * bytes_per_param
    if implied > WEIGHT_BYTES_TOLERANCE * held + (1 << 20):
        raise CheckpointError(
            f"{folder / 'config.json'}: describes {cfg.num_parameters():,} parameters (≥ {implied:,.0f} B at "
            f"{bytes_per_param} B each) but the weight files hold {held:,} B; the config does not match the weights "
            f"(num_hidden_layers={cfg.num_hidden_layers}, hidden_size={cfg.hidden_size}, head_dim={cfg.head_dim}, "
            f"num_local_experts={cfg.num_local_experts}, vocab_size={cfg.vocab_size})"
        )


def _tokenizer_file(folder: Path) -> Path | None:
    """The folder's tiktoken ``tokenizer.model``, or None when it ships no tokenizer. A folder with
    only a Hugging Face ``tokenizer.json`` is refused before any weight is read: that file is a
    different format, and a model without its tokenizer would fail later, far from the cause."""
    tok = folder / "tokenizer.model"
    if tok.exists():
        return tok
    if (folder / "tokenizer.json").exists():
        raise CheckpointError(
            f"{folder}: has tokenizer.json but no tokenizer.model; longctx reads the "
            "tiktoken tokenizer.model that Llama 4 checkpoints ship beside it: copy it into the folder"
        )
    return None


def _assign(model: Model, name: str, value: torch.Tensor) -> None:
    """Replace the (meta) parameter ``name`` with ``value``: no second copy is allocated."""
    *path, leaf = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=False))


def save_model(model: Model, folder: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write ``model`` as a ``Llama4ForCausalLM`` folder (config.json, model.safetensors,
    tokenizer.model if a tokenizer is given or attached) that ``load_model`` and transformers read.

    A quantized model is written in compressed-tensors ``pack-quantized`` (what vLLM and the
    published w4a16 checkpoints use): per quantized linear ``weight_packed`` int32 (int4: 8 per
    word; int8: 4 per word), ``weight_scale``, ``weight_shape`` (and ``weight_zero_point``);
    routed experts unfused, per expert ``experts.{e}.{gate,up,down}_proj.*`` in [out, in]."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    mods = quantized_modules(model)
    if mods:
        cfg["quantization_config"] = compressed_tensors.write_config(model, mods)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    owned = tuple(f"{n}." for n in mods)
    state = {
        longctx_to_hf(n): t.detach().cpu().contiguous()
        for n, t in model.state_dict().items()
        if not n.startswith(owned)
    }
    for name, m in mods.items():
        hf = longctx_to_hf(name)
        if isinstance(m, QuantizedLinear):
            state.update(
                compressed_tensors.linear_tensors(
                    hf,
                    m.weight_q.cpu(),
                    m.weight_scale.cpu(),
                    None if m.weight_zero is None else m.weight_zero.cpu(),
                    m.in_features,
                )
            )
            continue
        hid = m.hidden
        parts = (
            ("gate", "gate_up", slice(0, hid), m.d),
            ("up", "gate_up", slice(hid, 2 * hid), m.d),
            ("down", "down", slice(None), hid),
        )
        for e in range(m.n):
            for proj, which, rows, K in parts:
                z = getattr(m, f"{which}_zero")
                state.update(
                    compressed_tensors.linear_tensors(
                        f"{hf}.{e}.{proj}_proj",
                        getattr(m, f"{which}_q")[e, rows].cpu(),
                        getattr(m, f"{which}_scale")[e, rows].cpu(),
                        None if z is None else z[e, rows].cpu(),
                        K,
                    )
                )
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok = tokenizer or model.tokenizer
    if tok is not None:
        tok.save(folder / "tokenizer.model")
    return folder


__all__ = ["CheckpointError", "ConfigError", "hf_to_longctx", "longctx_to_hf", "load_model", "save_model"]
