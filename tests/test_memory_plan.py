"""``longctx.memory.memory_plan``: weights per part and KV placement, checked against the storage of
models built from the same configs (meta device: nothing allocated) and against Scout's figures."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_model, tiny_config
from longctx import memory, quant
from longctx.config import ModelConfig
from longctx.model import Model

GIB = 1 << 30
SCOUT = ModelConfig.preset("scout")
# Scout, tiny MoE, dense layers between MoE ones with tied embeddings, an all-global model.
CONFIGS = {
    "scout": SCOUT,
    "tiny": tiny_config(),
    "dense_tied": tiny_config(interleave_moe_layer_step=2, tie_word_embeddings=True),
    "all_global": tiny_config(no_rope_layer_interval=1),
}


def part_of(name: str) -> str:
    """The plan's part of a parameter or quantized buffer, from its module path."""
    if ".feed_forward.experts" in name:
        return "experts"
    if ".feed_forward.router." in name:
        return "router"
    if ".feed_forward." in name:
        return "shared"  # shared expert, or a dense layer's MLP
    if ".self_attn." in name:
        return "attention"
    if "norm" in name:
        return "norms"
    assert name.split(".")[0] in ("embed_tokens", "lm_head"), name
    return "embeddings/head"


def meta_model(cfg: ModelConfig) -> Model:
    with torch.device("meta"):
        return Model(cfg)


def stored_bytes(model: Model, dtype: torch.dtype) -> dict[str, int]:
    """Bytes per part of the model's state as loaded in ``dtype``: floating tensors (parameters,
    quantization scales) in ``dtype``, integer (quantized) tensors as they are."""
    size = torch.empty(0, dtype=dtype).element_size()
    out = dict.fromkeys(["experts", "shared", "attention", "router", "norms", "embeddings/head"], 0)
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or id(t) in seen:  # tied head: counted once
            continue
        seen.add(id(t))
        out[part_of(name)] += t.numel() * (size if t.is_floating_point() else t.element_size())
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_params_per_part_equal_the_model_built_from_the_config(name):
    cfg = CONFIGS[name]
    plan = memory.memory_plan(cfg, context=0)
    counts = dict.fromkeys(plan.params, 0)
    for pname, p in meta_model(cfg).named_parameters():  # tied weights are listed once
        counts[part_of(pname)] += p.numel()
    assert plan.params == counts
    assert sum(plan.params.values()) == cfg.num_parameters()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "scheme,attn", [(None, False), ("int8", False), ("int4", False), ("int4", True), ("int8", True)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_bytes_per_part_equal_the_prepared_model(name, scheme, attn, dtype):
    """The plan's bytes = the buffers ``quant.prepare`` (what ``load_model(quantize=)`` fills)
    allocates for the same config, part by part."""
    cfg = CONFIGS[name]
    group = 128 if name == "scout" else 16
    model = meta_model(cfg)
    if scheme:
        quant.prepare(model, scheme, group, quantize_attention=attn)
    plan = memory.memory_plan(cfg, scheme, context=0, group_size=group, quantize_attention=attn, dtype=dtype)
    assert plan.weights == stored_bytes(model, dtype)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_weight_bytes_equal_a_quantized_models_state_dict(scheme):
    """End to end on real tensors: the plan's total = the bytes of a quantized model's state_dict."""
    model = random_model(tiny_config(interleave_moe_layer_step=2)).to(torch.bfloat16)
    q = quant.quantize(copy.deepcopy(model), scheme, group_size=16, quantize_attention=True)
    have = {id(t): t for t in q.state_dict().values()}.values()  # tied tensors once
    plan = memory.memory_plan(model.config, scheme, context=0, group_size=16, quantize_attention=True)
    assert plan.weight_bytes == sum(t.numel() * t.element_size() for t in have)


def test_scout_figures():
    """The figures the issue quotes, from the config: weights of the int4 recipe, attention int4
    too, and bf16; KV per token and the chunked layers' fixed share."""
    recipe = memory.memory_plan(SCOUT, "int4", context=10 << 20)
    assert round(recipe.weight_bytes / GIB, 1) == 58.8
    assert round(memory.memory_plan(SCOUT, "int4", context=0, quantize_attention=True).weight_bytes / GIB, 1) == 54.6
    bf16 = memory.memory_plan(SCOUT, None, context=0)
    assert sum(bf16.params.values()) == 107_769_861_120 and bf16.weight_bytes == 2 * 107_769_861_120
    assert recipe.kv_per_token == 48 * 1024 and recipe.global_layers == 12
    assert recipe.chunked_kv == 1.125 * GIB
    assert memory.memory_plan(SCOUT, "int4", context=100).chunked_kv == 36 * 100 * 4096  # below one chunk
    # An 80 GB card leaves ~14 GiB beside the weights, the chunked KV and the 1 GiB reserve: ~300K tokens.
    h100 = memory.memory_plan(SCOUT, "int4", context=10 << 20, gpu_bytes=80 * 10**9)
    assert 280_000 < h100.device_tokens < 320_000


def test_placement_fills_gpu_then_cpu_then_disk():
    ctx = 10 << 20
    plan = memory.memory_plan(SCOUT, "int4", context=ctx, gpu_bytes=80 * GIB, cpu_bytes=256 * GIB, reserve=GIB)
    left = 80 * GIB - plan.weight_bytes - plan.chunked_kv - GIB
    assert plan.fits and plan.device_tokens * plan.kv_per_token <= left < (plan.device_tokens + 1) * plan.kv_per_token
    assert plan.cpu_tokens == 256 * GIB // plan.kv_per_token
    assert plan.device_tokens + plan.cpu_tokens + plan.disk_tokens == ctx
    assert plan.kv_bytes == ctx * plan.kv_per_token + plan.chunked_kv
    small = memory.memory_plan(SCOUT, "int4", context=1000, gpu_bytes=80 * GIB, cpu_bytes=0)
    assert (small.device_tokens, small.cpu_tokens, small.disk_tokens) == (1000, 0, 0)
    # Without a GPU the CPU budget holds the weights too; no budget at all keeps everything there.
    cpu = memory.memory_plan(SCOUT, "int4", context=ctx, cpu_bytes=128 * GIB)
    assert (
        cpu.cpu_tokens == 0
        and cpu.device_tokens == (128 * GIB - cpu.weight_bytes - cpu.chunked_kv - GIB) // cpu.kv_per_token
        and cpu.disk_tokens == ctx - cpu.device_tokens
    )
    assert memory.memory_plan(SCOUT, "int4", context=ctx).device_tokens == ctx
    bf16 = memory.memory_plan(SCOUT, None, context=ctx, gpu_bytes=80 * GIB)
    assert not bf16.fits and bf16.device_tokens == bf16.cpu_tokens == bf16.disk_tokens == 0
    assert any("short by" in line for line in bf16.lines())


def test_lines_name_every_part_and_the_token_counts():
    plan = memory.memory_plan(SCOUT, "int4", context=10 << 20, gpu_bytes=80 * GIB, cpu_bytes=256 * GIB)
    text = str(plan)
    for part in plan.weights:
        assert part in text
    for n in (plan.device_tokens, plan.cpu_tokens, plan.disk_tokens, sum(plan.params.values())):
        assert f"{n:,}" in text
    assert "58.79 GiB" in text and "48.00 KiB" in text


def test_bad_inputs_name_the_reason():
    embedded_like = tiny_config(hidden_size=128, intermediate_size=192, num_attention_heads=4, head_dim=32)
    with pytest.raises(ValueError, match=r"routed experts down: group_size=128 must divide the input dim 192"):
        memory.memory_plan(embedded_like, "int4", context=1)
    assert memory.memory_plan(embedded_like, "int4", context=1, group_size=64).group_size == 64
    with pytest.raises(ValueError, match="int3"):
        memory.memory_plan(SCOUT, "int3", context=1)
    with pytest.raises(ValueError, match="context"):
        memory.memory_plan(SCOUT, "int4", context=-1)
