"""compressed-tensors ``pack-quantized`` checkpoints: the format of the published w4a16/w8a16
Llama 4 checkpoints and what vLLM reads.

Per quantized linear: ``weight_packed`` int32 [out, ceil(in / (32 / bits))] (element j of a row in
word j // per-word at bits ``bits * (j % per-word)``, stored as q + 2^(bits-1)), ``weight_scale``
[out, in / group] (one column for the channel strategy) in the model dtype, ``weight_shape`` int64
[2], and ``weight_zero_point`` (packed along the output dim) only when ``symmetric: false``.
Routed experts are stored unfused, per expert: ``feed_forward.experts.{e}.{gate,up,down}_proj.*``
in nn.Linear [out, in] orientation. ``config.json`` carries ``quantization_config``
(``config_groups`` with targets and weight args, and an ``ignore`` list), read generically here:
anything this module does not implement exactly is refused with a ``CheckpointError``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from .hub import CheckpointError, hf_to_longctx, longctx_to_hf
from .kernels.quant import bits_of, pack_int32, unpack_int32
from .model import Model
from .quant import QuantizedExperts, QuantizedLinear

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


def read_config(raw: dict, where: Path) -> tuple[list[_CTScheme], list[str]] | None:
    """Parse ``quantization_config``: None when absent; (schemes, ignore) for weight-only int4/int8
    compressed-tensors ``pack-quantized``; CheckpointError naming anything else."""
    qc = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
    if qc is None:
        return None

    def refuse(what: str):
        return CheckpointError(
            f"{where}: quantization_config {what} is not supported (longctx loads "
            "compressed-tensors pack-quantized int4/int8 weight-only checkpoints)"
        )

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


def prepare_model(model: Model, keys: dict[str, str], schemes, ignore, where: Path) -> dict[str, _CTScheme]:
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
                raise CheckpointError(
                    f"{where}: {hf_mod} is targeted by the quantization config and not in "
                    "'ignore', but is stored unquantized (.weight)"
                )
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
        setattr(
            model.get_submodule(parent_name),
            attr,
            QuantizedLinear(
                lin.in_features, lin.out_features, s.bits, s.group_size, zero=not s.symmetric, device="meta"
            ),
        )
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


def expected_names(model: Model, quantized: dict[str, _CTScheme]) -> set[str]:
    """The compressed-tensors tensor names (longctx side) the quantized modules need."""
    need = set()
    for name, s in quantized.items():
        parts = [p for p in _CT_PARTS if p != "weight_zero_point" or not s.symmetric]
        mod = model.get_submodule(name)
        mods = (
            [f"{name}.{e}.{p}_proj" for e in range(mod.n) for p in ("gate", "up", "down")]
            if isinstance(mod, QuantizedExperts)
            else [name]
        )
        need.update(f"{m}.{p}" for m in mods for p in parts)
    return need


def assign(model: Model, name: str, t: torch.Tensor, device, dtype, where: str) -> bool:
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
        raise CheckpointError(
            f"{where}: tensor {name} has shape {list(t.shape)} after unpacking, the config needs {list(want)}"
        )
    if slot.device.type == "meta" or (part == "weight_scale" and slot.dtype != t.dtype):
        slot = torch.empty(slot.shape, dtype=t.dtype, device=device)
        setattr(mod, prefix + buf, slot)
    slot[index] = t.to(device)
    return True


# ----------------------------------------------------------------------------- load / save


def linear_tensors(name: str, w, scale, zero, K: int) -> dict[str, torch.Tensor]:
    """One linear's compressed-tensors tensors (checkpoint names relative to module ``name``)."""
    bits = bits_of(w)
    out = {
        f"{name}.weight_packed": (w if bits == 4 else pack_int32(w, 8)).contiguous(),
        f"{name}.weight_scale": scale.contiguous(),
        f"{name}.weight_shape": torch.tensor([w.shape[0], K], dtype=torch.int64),
    }
    if zero is not None:
        out[f"{name}.weight_zero_point"] = pack_int32(zero.T, bits).T.contiguous()
    return out


def write_config(model: Model, mods: dict) -> dict:
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
            "targets": targets,
            "input_activations": None,
            "output_activations": None,
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": sym,
                "dynamic": False,
                "actorder": None,
                "strategy": "channel" if gs is None else "group",
                "group_size": gs,
            },
        }
    ignore = [
        longctx_to_hf(f"{n}.weight").removesuffix(".weight")
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in _LINEAR_SUFFIXES
    ]
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
