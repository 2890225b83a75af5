"""Quantized checkpoints: load_model(quantize=...) while streaming, compressed-tensors
pack-quantized save/load, checkpoints packed by an independent packer, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import TINY_HF, add_prefix, hf_model
from test_quant import loop_pack

from longctx import quant
from longctx.checkpoint import CheckpointError, load_model, save_model

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def write_hf(folder, seed=0, init="hf", **overrides):
    """A random tiny Llama4ForCausalLM written by transformers. ``init="hf"`` keeps its own
    initialisation (std 0.02, as a trained model's weights are small); "wide": std 0.25."""
    if init == "hf":
        torch.manual_seed(seed)
        model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**{**TINY_HF, **overrides})).eval()
    else:
        model = hf_model(seed, **overrides)
    model.save_pretrained(folder)
    return folder


# Relative logit error ||quantized - unquantized|| / ||unquantized|| of these tiny random models
# (fp32, 2x23 tokens; experts and shared expert quantized, group 32; attention, router, head not),
# measured over seeds 0-2: init "hf" (std 0.02): int8 0.0008-0.0009, int4 0.014-0.015; init
# "wide" (std 0.25, logits O(10), where flipped top-1 routes amplify the error): int8 0.025-0.087,
# int4 0.38-0.41. The bars are about twice the largest.
BARS = {("hf", "int8"): 0.002, ("hf", "int4"): 0.03, ("wide", "int8"): 0.2, ("wide", "int4"): 0.8}


@pytest.mark.parametrize("init", ["hf", "wide"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_load_quantized_logits_within_measured_error(tmp_path, init, scheme, one_thread):
    folder = write_hf(tmp_path, init=init)
    ref = load_model(folder)
    ours = load_model(folder, quantize=scheme, group_size=32)
    with torch.no_grad():
        err = rel_err(ours(TOKENS), ref(TOKENS))
        assert err <= BARS[init, scheme], err
        # streaming quantization == quantizing the loaded model in memory, bit for bit
        mem = quant.quantize(load_model(folder), scheme, group_size=32)
        a, b = ours.state_dict(), mem.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scheme,group,attn", [("int4", 32, False), ("int8", 128, True), ("int4", 16, True)])
def test_save_load_bit_identical(tmp_path, scheme, group, attn, one_thread):
    folder = write_hf(tmp_path / "hf", init="wide", torch_dtype="bfloat16")
    model = load_model(folder, dtype=torch.bfloat16, quantize=scheme, group_size=group, quantize_attention=attn)
    save_model(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["format"]) == ("compressed-tensors", "pack-quantized")
    assert "lm_head" in cfg["ignore"] and "model.layers.0.feed_forward.router" in cfg["ignore"]
    assert ("model.layers.0.self_attn.q_proj" in cfg["ignore"]) == (not attn)
    keys = load_file(str(tmp_path / "q" / "model.safetensors"))
    packed = keys["model.layers.1.feed_forward.experts.3.down_proj.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (64, 32 // (8 if scheme == "int4" else 4))
    back = load_model(tmp_path / "q")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), back(TOKENS))


def pack_checkpoint(src, dst, *, bits, group, symmetric=True, attention=False, seed=0):
    """Rewrite the bf16/fp32 HF folder ``src`` as compressed-tensors pack-quantized in ``dst``,
    with random integer weights packed by ``loop_pack`` (written here, independent of longctx).
    Returns {HF module name: dequantized weight (out, in)} computed as (q - zero) * scale."""
    g = torch.Generator().manual_seed(seed)
    state = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    E, hid = cfg["num_local_experts"], cfg["intermediate_size"]
    linears = {}
    for k in list(state):
        if ".experts.gate_up_proj" in k:
            base = k.removesuffix(".gate_up_proj")
            gu = state.pop(k)
            for e in range(E):
                linears[f"{base}.{e}.gate_proj"] = gu[e, :, :hid].T
                linears[f"{base}.{e}.up_proj"] = gu[e, :, hid:].T
        elif ".experts.down_proj" in k:
            base = k.removesuffix(".down_proj")
            dn = state.pop(k)
            for e in range(E):
                linears[f"{base}.{e}.down_proj"] = dn[e].T
        elif ".shared_expert." in k or (attention and ".self_attn." in k):
            linears[k.removesuffix(".weight")] = state.pop(k)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    deq = {}
    for name, w in linears.items():
        out, K = w.shape
        G = K if group is None else group
        q = torch.randint(lo, hi + 1, (out, K), generator=g, dtype=torch.int8)
        scale = (torch.rand(out, K // G, generator=g) * 0.02 + 0.005).to(w.dtype)
        state[f"{name}.weight_packed"] = loop_pack(q, bits)
        state[f"{name}.weight_scale"] = scale
        state[f"{name}.weight_shape"] = torch.tensor([out, K])
        zero = torch.zeros(out, K // G, dtype=torch.int8)
        if not symmetric:
            zero = torch.randint(-3, 4, (out, K // G), generator=g, dtype=torch.int8)
            state[f"{name}.weight_zero_point"] = loop_pack(zero.T, bits).T.contiguous()  # packed along out
        deq[name] = (q.float() - zero.float().repeat_interleave(G, 1)) * scale.float().repeat_interleave(G, 1)
    ignore = ["lm_head", "re:.*router$"] + ([] if attention else ["re:.*self_attn.*"])
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "ignore": ignore,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "output_activations": None,
                "weights": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": symmetric,
                    "dynamic": False,
                    "strategy": "channel" if group is None else "group",
                    "group_size": group,
                    "actorder": None,
                },
            }
        },
    }
    dst.mkdir()
    save_file(state, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg))
    return deq


@pytest.mark.parametrize(
    "bits,group,symmetric,attention,layout",
    [
        (4, 16, True, False, "causal-lm"),
        (8, None, True, True, "causal-lm"),
        (4, 32, False, False, "conditional-generation"),
        (8, 16, False, True, "causal-lm"),
    ],
)
def test_independently_packed_checkpoint(tmp_path, bits, group, symmetric, attention, layout, one_thread):
    """longctx on a packed checkpoint == the plain model carrying the dequantized weights."""
    src = write_hf(tmp_path / "hf", init="wide")
    deq = pack_checkpoint(src, tmp_path / "ct", bits=bits, group=group, symmetric=symmetric, attention=attention)
    plain = load_model(src)
    with torch.no_grad():
        for name, w in deq.items():
            mod_name, _, proj = name.removeprefix("model.").rpartition(".")
            if ".experts." in name:
                experts_name, e = mod_name.rsplit(".", 1)
                experts, e = plain.get_submodule(experts_name), int(e)
                hid = experts.down_proj.shape[1]
                if proj == "gate_proj":
                    experts.gate_up_proj[e, :, :hid] = w.T
                elif proj == "up_proj":
                    experts.gate_up_proj[e, :, hid:] = w.T
                else:
                    experts.down_proj[e] = w.T
            else:
                plain.get_submodule(f"{mod_name}.{proj}").weight.copy_(w)
    if layout != "causal-lm":
        add_prefix(tmp_path / "ct", shards=2)
        cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
        cfg["quantization_config"] = cfg["text_config"].pop("quantization_config")
        cfg["quantization_config"]["ignore"] = ["language_model.lm_head", "re:.*router$", "re:.*self_attn.*"]
        (tmp_path / "ct" / "config.json").write_text(json.dumps(cfg))
    ours = load_model(tmp_path / "ct")
    mods = quant.quantized_modules(ours)
    assert any(isinstance(m, quant.QuantizedExperts) for m in mods.values())
    assert any(".self_attn." in n for n in mods) == attention
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), plain(TOKENS), rtol=1e-5, atol=1e-5)


def test_packed_checkpoint_saves_back_bit_identical(tmp_path, one_thread):
    src = write_hf(tmp_path / "hf")
    pack_checkpoint(src, tmp_path / "ct", bits=4, group=16, symmetric=False)
    model = load_model(tmp_path / "ct")
    save_model(model, tmp_path / "again")
    a = load_file(str(tmp_path / "ct" / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


REFUSED = {
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"quant_method": "awq", "bits": 4},
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True},
    "unknown": {"quant_method": "mystery"},
    "float-quantized": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}},
    "'float'": {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}
        },
    },
    "actorder": {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "g": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16, "actorder": "group"},
            }
        },
    },
    "input_activations": {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "g": {
                "targets": ["Linear"],
                "input_activations": {"num_bits": 8},
                "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
            }
        },
    },
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_other_quantization_configs_refused(tmp_path, name):
    folder = write_hf(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = REFUSED[name]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=name.strip("'") if name != "unknown" else "mystery"):
        load_model(folder)


def test_inconsistent_ignore_list_and_quantize_twice_refused(tmp_path):
    src = write_hf(tmp_path / "hf")
    pack_checkpoint(src, tmp_path / "ct", bits=4, group=16)
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(tmp_path / "ct", quantize="int4")
    cfg_path = tmp_path / "ct" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["ignore"].append("re:.*shared_expert.*")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shared_expert.*ignore"):
        load_model(tmp_path / "ct")
    cfg["quantization_config"]["ignore"] = ["lm_head"]  # the routers are Linear targets now
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="router.*stored unquantized"):
        load_model(tmp_path / "ct")
