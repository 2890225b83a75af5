"""Hugging Face Llama-4 checkpoints <-> ``Model``.

A checkpoint is a folder with ``config.json``, safetensors weights (one file, or shards listed
in ``model.safetensors.index.json``) and optionally a tiktoken ``tokenizer.model``. Keys may
carry the ``language_model.`` prefix (``Llama4ForConditionalGeneration``) or not
(``Llama4ForCausalLM``); vision keys are ignored. Only safetensors are read: nothing is ever
unpickled. Weights stream one tensor at a time into a model allocated directly on the target
device, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .kernels.quant import bits_of, pack_int32, unpack_int32
from .model import Model
from .quant import QuantizedExperts, QuantizedLinear, prepare, quantized_modules, scheme_bits

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


# ----------------------------------------------------------------------------- compressed-tensors

# Module names (checkpoint side, prefixes removed) whose ``.weight`` is an nn.Linear matmul: the
# modules a compressed-tensors "Linear" target can mean.
_LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router", "lm_head")
_CT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
_CT_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj$")


@dataclasses.dataclass(frozen=True)
class _CTScheme:
    """One compressed-tensors config group's weight args: bits, group size (None: per
    channel), symmetric (False: ``weight_zero_point`` stored), and its targets."""
    bits: int
    group_size: int | None
    symmetric: bool
    targets: tuple[str, ...]


def _match(patterns, name: str) -> bool:
    """compressed-tensors target / ignore matching: ``re:<regex>`` or an exact module name
    (checked with and without the checkpoint's ``language_model.`` / ``model.`` prefixes)."""
    bare = hf_to_longctx(name) or name
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name) or re.match(p[3:], bare):
                return True
        elif p in (name, bare) or (hf_to_longctx(p) or p) == bare:
            return True
    return False


def _compressed_tensors(raw: dict, where: Path) -> tuple[list[_CTScheme], list[str]] | None:
    """Parse ``quantization_config``: None when absent; (schemes, ignore) for weight-only int4/int8
    compressed-tensors ``pack-quantized``; CheckpointError naming anything else."""
    qc = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
    if qc is None:
        return None

    def refuse(what: str):
        return CheckpointError(f"{where}: quantization_config {what} is not supported (longctx loads "
                               "compressed-tensors pack-quantized int4/int8 weight-only checkpoints)")

    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise refuse(f"quant_method {method!r}")
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise refuse(f"format {fmt!r}")
    for key in ("sparsity_config", "kv_cache_scheme", "transform_config"):
        if qc.get(key):
            raise refuse(f"{key} {qc[key]!r}")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise refuse("with no config_groups")
    schemes = []
    for gname, g in groups.items():
        w = g.get("weights") or {}
        for act in ("input_activations", "output_activations"):
            if g.get(act):
                raise refuse(f"{gname}.{act} (activation quantization)")
        if w.get("type", "int") != "int":
            raise refuse(f"{gname} weights type {w.get('type')!r} (e.g. fp8)")
        bits = w.get("num_bits")
        if bits not in (4, 8):
            raise refuse(f"{gname} weights num_bits {bits!r}")
        strategy = w.get("strategy")
        if strategy not in ("group", "channel"):
            raise refuse(f"{gname} weights strategy {strategy!r}")
        if w.get("actorder") == "group":
            raise refuse(f"{gname} weights actorder 'group' (weight_g_idx)")
        gs = w.get("group_size") if strategy == "group" else None
        if strategy == "group" and (not isinstance(gs, int) or gs <= 0):
            raise refuse(f"{gname} weights group_size {gs!r}")
        schemes.append(_CTScheme(bits, gs, w.get("symmetric", True) is not False, tuple(g.get("targets") or ())))
    return schemes, list(qc.get("ignore") or [])


def _ct_scheme(schemes: list[_CTScheme], ignore: list[str], module: str, where: Path) -> _CTScheme:
    """The config group that quantizes checkpoint module ``module`` (stored as weight_packed)."""
    if _match(ignore, module):
        raise CheckpointError(f"{where}: {module} is stored quantized but its config lists it in 'ignore'")
    for s in schemes:
        if "Linear" in s.targets or _match(s.targets, module):
            return s
    raise CheckpointError(f"{where}: {module} is stored quantized but no config group targets it")


def _prepare_compressed(model: Model, keys: dict[str, str], schemes, ignore, where: Path) -> dict[str, _CTScheme]:
    """Replace the modules a compressed-tensors checkpoint stores packed by empty quantized ones
    (meta); return {longctx module name: scheme}. Checks the ignore list both ways."""
    packed: dict[str, tuple[str, _CTScheme]] = {}
    for key in keys:
        if key.endswith(".weight_packed"):
            hf_mod = key.removesuffix(".weight_packed")
            name = hf_to_longctx(hf_mod)
            if name is not None:
                packed[name] = (hf_mod, _ct_scheme(schemes, ignore, hf_mod, where))
        elif key.endswith(".weight") and key.removesuffix(".weight").rsplit(".", 1)[-1] in _LINEAR_SUFFIXES:
            hf_mod = key.removesuffix(".weight")
            targeted = any("Linear" in s.targets or _match(s.targets, hf_mod) for s in schemes)
            if targeted and not _match(ignore, hf_mod) and hf_to_longctx(hf_mod) is not None:
                raise CheckpointError(f"{where}: {hf_mod} is targeted by the quantization config and not in "
                                      "'ignore', but is stored unquantized (.weight)")
    out: dict[str, _CTScheme] = {}
    experts: dict[str, set[_CTScheme]] = {}
    for name, (hf_mod, s) in packed.items():
        m = _CT_EXPERT.match(name)
        if m:
            experts.setdefault(m.group(1), set()).add(s)
            continue
        parent_name, _, attr = name.rpartition(".")
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: unexpected quantized module {hf_mod} (not in this config)") from None
        if not isinstance(lin, torch.nn.Linear):
            raise CheckpointError(f"{where}: {hf_mod} is stored quantized but is not a linear layer here")
        setattr(model.get_submodule(parent_name), attr,
                QuantizedLinear(lin.in_features, lin.out_features, s.bits, s.group_size, zero=not s.symmetric,
                                device="meta"))
        out[name] = s
    for name, found in experts.items():
        if len(found) != 1:
            raise CheckpointError(f"{where}: the experts of {name} mix quantization schemes {sorted(map(str, found))}")
        s = found.pop()
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: unexpected quantized experts {name} (not in this config)") from None
        n, d, two_i = old.gate_up_proj.shape
        parent_name, _, attr = name.rpartition(".")
        try:
            new = QuantizedExperts(n, d, two_i // 2, s.bits, s.group_size, zero=not s.symmetric, device="meta")
        except ValueError as e:
            raise CheckpointError(f"{where}: {name}: {e}") from None
        setattr(model.get_submodule(parent_name), attr, new)
        out[name] = s
    return out


def _ct_expected(model: Model, quantized: dict[str, _CTScheme]) -> set[str]:
    """The compressed-tensors tensor names (longctx side) the quantized modules need."""
    need = set()
    for name, s in quantized.items():
        parts = [p for p in _CT_PARTS if p != "weight_zero_point" or not s.symmetric]
        mod = model.get_submodule(name)
        mods = ([f"{name}.{e}.{p}_proj" for e in range(mod.n) for p in ("gate", "up", "down")]
                if isinstance(mod, QuantizedExperts) else [name])
        need.update(f"{m}.{p}" for m in mods for p in parts)
    return need


def _ct_assign(model: Model, name: str, t: torch.Tensor, device, dtype, where: str) -> bool:
    """Store compressed-tensors tensor ``name`` (longctx side) into its quantized module; False
    when ``name`` is not a compressed-tensors part of a quantized module."""
    mod_name, _, part = name.rpartition(".")
    if part not in _CT_PARTS:
        return False
    m = _CT_EXPERT.match(mod_name)
    if m:
        try:
            mod = model.get_submodule(m.group(1))
        except AttributeError:
            return False
        if not isinstance(mod, QuantizedExperts):
            return False
        e, proj = int(m.group(2)), m.group(3)
        if e >= mod.n:
            return False
        which = "down" if proj == "down" else "gate_up"
        hid = mod.hidden
        rows = slice(None) if proj == "down" else slice(0, hid) if proj == "gate" else slice(hid, 2 * hid)
        K = mod.d if which == "gate_up" else mod.hidden
        prefix, index = which + "_", (e, rows)
    else:
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            return False
        if not isinstance(mod, QuantizedLinear):
            return False
        K, prefix, index = mod.in_features, "weight_", (slice(None),)
    buf = {"weight_packed": "q", "weight_scale": "scale", "weight_zero_point": "zero"}.get(part)
    if buf is None:  # weight_shape: a check only
        target = getattr(mod, prefix + "q")[index]
        if [int(v) for v in t.tolist()] != [target.shape[0], K]:
            raise CheckpointError(f"{where}: {name} is {t.tolist()}, the config needs {[target.shape[0], K]}")
        return True
    slot = getattr(mod, prefix + buf)
    if slot is None:
        raise CheckpointError(f"{where}: {name}: the config group is symmetric, so no zero point is expected")
    want = tuple(slot[index].shape)
    bits = mod.bits
    if part != "weight_scale" and t.dtype != torch.int32:
        raise CheckpointError(f"{where}: {name} has dtype {t.dtype}, pack-quantized stores int32")
    if part == "weight_packed":
        t = t if bits == 4 else unpack_int32(t, 8, K)
    elif part == "weight_zero_point":  # packed along the output dim
        t = unpack_int32(t.T.contiguous(), bits, want[0]).T
    else:
        t = t.to(dtype or t.dtype)
    if tuple(t.shape) != want:
        raise CheckpointError(f"{where}: tensor {name} has shape {list(t.shape)} after unpacking, "
                              f"the config needs {list(want)}")
    if slot.device.type == "meta" or (part == "weight_scale" and slot.dtype != t.dtype):
        slot = torch.empty(slot.shape, dtype=t.dtype, device=device)
        setattr(mod, prefix + buf, slot)
    slot[index] = t.to(device)
    return True


# ----------------------------------------------------------------------------- load / save


def load_model(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, quantize: str | None = None, group_size: int = 128,
               quantize_attention: bool = False) -> Model:
    """Load a Llama-4 text model from a HF folder; ``path=None`` loads the embedded default.

    dtype: None keeps the checkpoint's dtype (config ``torch_dtype`` / ``dtype``, else the
    first tensor's). ``quantize`` ("int4" | "int8" | None), ``group_size`` and
    ``quantize_attention`` are ``longctx.quant.quantize``'s, applied tensor by tensor while
    streaming (no full-precision copy of a quantized layer is ever held beside the model). A
    compressed-tensors ``pack-quantized`` checkpoint is loaded as stored (bit-identical, not
    re-quantized); other quantization configs raise ``CheckpointError`` naming them.
    Raises ``CheckpointError`` naming the missing/unexpected/mis-shaped tensor or missing
    shard, ``ConfigError`` for a bad config.json, ValueError for a bad scheme / group size.
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
    ct = _compressed_tensors(raw, cfg_path)
    if ct is not None and quantize is not None:
        raise CheckpointError(f"{folder}: the checkpoint is already quantized (compressed-tensors); "
                              f"load it with quantize=None, not {quantize!r}")
    if quantize is not None:
        scheme_bits(quantize)
    files = _weight_files(folder)
    if dtype is None:
        name = (raw.get("text_config") or {}).get("torch_dtype") or raw.get("torch_dtype") or raw.get("dtype")
        dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None

    keys: dict[str, str] = {}  # checkpoint key -> file (headers only)
    try:
        for fname, listed in files.items():
            with safe_open(str(folder / fname), framework="pt", device="cpu") as f:
                present = set(f.keys())
            absent = [k for k in (listed or []) if k not in present]
            if absent:
                raise CheckpointError(f"{folder / fname}: tensors listed in the index are missing: "
                                      f"{', '.join(absent[:5])}")
            keys.update(dict.fromkeys(sorted(present), fname))
    except SafetensorError as e:
        raise CheckpointError(f"{folder}: unreadable safetensors file ({e})") from None

    with torch.device("meta"):
        model = Model(cfg)
    expected_extra: set[str] = set()
    if ct is not None:
        quantized = _prepare_compressed(model, keys, *ct, cfg_path)
        expected_extra = _ct_expected(model, quantized)
    elif quantize is not None:
        for qname in prepare(model, quantize, group_size, quantize_attention):
            mod = model.get_submodule(qname)
            expected_extra.update([f"{qname}.gate_up_proj", f"{qname}.down_proj"] if isinstance(mod, QuantizedExperts)
                                  else [f"{qname}.weight"])
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
                            raise CheckpointError(f"{fpath}: tensor {key} has shape {list(shape)}, "
                                                  f"the config needs {list(param.shape)}")
                        t = f.get_tensor(key)
                        if dtype is None and t.is_floating_point():
                            dtype = t.dtype
                        _assign(model, name, t.to(device=device, dtype=dtype))
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
                    elif name in expected_extra and _ct_assign(model, name, f.get_tensor(key), device, dtype,
                                                                f"{fpath}: {key}"):
                        pass
                    else:
                        unexpected.append(key)
                        continue
                    loaded.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"{fpath}: unreadable safetensors file ({e})") from None
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensors (not in a Llama-4 text model of this config): "
                              f"{', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}")
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted((set(params) | expected_extra) - loaded - tied)
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


def _ct_tensors(name: str, w, scale, zero, K: int) -> dict[str, torch.Tensor]:
    """One linear's compressed-tensors tensors (checkpoint names relative to module ``name``)."""
    bits = bits_of(w)
    out = {f"{name}.weight_packed": (w if bits == 4 else pack_int32(w, 8)).contiguous(),
           f"{name}.weight_scale": scale.contiguous(),
           f"{name}.weight_shape": torch.tensor([w.shape[0], K], dtype=torch.int64)}
    if zero is not None:
        out[f"{name}.weight_zero_point"] = pack_int32(zero.T, bits).T.contiguous()
    return out


def _quantization_config(model: Model, mods: dict) -> dict:
    """``quantization_config`` for the quantized modules ``mods``: one config group per scheme
    (targets "Linear" when there is one scheme), ``ignore`` = every other linear module."""
    schemes: dict[tuple, list[str]] = {}
    for name, m in mods.items():
        zero = (m.weight_zero if isinstance(m, QuantizedLinear) else m.gate_up_zero) is not None
        schemes.setdefault((m.bits, m.group_size, not zero), []).append(name)
    groups = {}
    for i, ((bits, gs, sym), names) in enumerate(sorted(schemes.items(), key=str)):
        targets = ["Linear"] if len(schemes) == 1 else [f"re:^model\\.{re.escape(n)}(\\.\\d+\\.\\w+)?$" for n in names]
        groups[f"group_{i}"] = {
            "targets": targets, "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False, "actorder": None,
                        "strategy": "channel" if gs is None else "group", "group_size": gs}}
    ignore = [longctx_to_hf(f"{n}.weight").removesuffix(".weight") for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in _LINEAR_SUFFIXES]
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}


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
        cfg["quantization_config"] = _quantization_config(model, mods)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    owned = tuple(f"{n}." for n in mods)
    state = {longctx_to_hf(n): t.detach().cpu().contiguous() for n, t in model.state_dict().items()
             if not n.startswith(owned)}
    for name, m in mods.items():
        hf = longctx_to_hf(name)
        if isinstance(m, QuantizedLinear):
            state.update(_ct_tensors(hf, m.weight_q.cpu(), m.weight_scale.cpu(),
                                     None if m.weight_zero is None else m.weight_zero.cpu(), m.in_features))
            continue
        hid = m.hidden
        parts = (("gate", "gate_up", slice(0, hid), m.d), ("up", "gate_up", slice(hid, 2 * hid), m.d),
                 ("down", "down", slice(None), hid))
        for e in range(m.n):
            for proj, which, rows, K in parts:
                z = getattr(m, f"{which}_zero")
                state.update(_ct_tensors(f"{hf}.{e}.{proj}_proj", getattr(m, f"{which}_q")[e, rows].cpu(),
                                         getattr(m, f"{which}_scale")[e, rows].cpu(),
                                         None if z is None else z[e, rows].cpu(), K))
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok = tokenizer or model.tokenizer
    if tok is not None:
        tok.save(folder / "tokenizer.model")
    return folder


__all__ = ["CheckpointError", "ConfigError", "hf_to_longctx", "longctx_to_hf", "load_model", "save_model"]
