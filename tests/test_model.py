"""The decoder against transformers' Llama4ForCausalLM, and its own equivalences."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, tiny_config
from longctx.checkpoint import CheckpointError, hf_to_longctx, load_model, longctx_to_hf, save_model
from longctx.config import ConfigError, ModelConfig
from longctx.model import Model
from longctx.moe import MoE

transformers = pytest.importorskip("transformers")
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 16.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 1.0,
    "original_max_position_embeddings": 8,
}

# Each case: Llama4TextConfig overrides. All cross >= 3 chunk boundaries (T=23, chunk 5) with
# temperature tuning active (floor_scale 3) and random norm weights.
CASES = {
    "moe-every-layer_gqa2_qknorm": dict(interleave_moe_layer_step=1, num_attention_heads=4, num_key_value_heads=2),
    "moe-step2_gqa1_no-qknorm": dict(
        interleave_moe_layer_step=2, num_attention_heads=4, num_key_value_heads=4, use_qk_norm=False
    ),
    "gqa5_nope-every-2nd_top2": dict(
        num_attention_heads=10, num_key_value_heads=2, no_rope_layer_interval=2, num_experts_per_tok=2
    ),
    "default-rope_no-temperature": dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_temperature_tuning=False
    ),
}


# A tiny Llama4TextConfig: 5-token attention chunks and floor_scale 3, so that chunk
# boundaries and temperature tuning are crossed within a few dozen tokens.
TINY_HF = dict(
    vocab_size=97,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=32,
    intermediate_size_mlp=48,
    num_local_experts=4,
    attention_chunk_size=5,
    floor_scale=3,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def hf_model(seed: int, **overrides):
    cfg = {**TINY_HF, "rope_parameters": LLAMA3, "attn_implementation": "eager", **overrides}
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.5 + torch.rand_like(p) if "norm" in name else torch.randn_like(p) * 0.25)
    return model


def add_prefix(folder, shards: int = 1):
    """Rewrite a Llama4ForCausalLM folder in the Llama4ForConditionalGeneration layout:
    `language_model.` keys, a text_config wrapper, a vision key, optionally sharded."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    state = {f"language_model.{k}": v for k, v in state.items()}
    state["vision_model.patch_embedding.linear.weight"] = torch.zeros(3, 3)
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::shards]}
        save_file(part, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": cfg, "vision_config": {}}))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["causal-lm", "conditional-generation-sharded"])
def test_logits_match_transformers(case, layout, tmp_path):
    ref_model = hf_model(0, **CASES[case])
    ref_model.save_pretrained(tmp_path)
    if layout != "causal-lm":
        add_prefix(tmp_path, shards=3)
    ours = load_model(tmp_path)
    tokens = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_model(tokens).logits
        got = ours(tokens)
    scale = ref.abs().max().item()
    assert scale > 1.0  # logits large enough for the tolerance to mean something
    assert (got - ref).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_transformers_norms(dtype):
    """One rms_norm serves the block norms (with weight) and the QK-norm (without): bit-equal to
    transformers' Llama4TextRMSNorm and its weightless QK-norm, fp32 and bf16 (rounding order)."""
    from transformers.models.llama4 import modeling_llama4 as hf

    from longctx.attention import rms_norm
    from longctx.model import RMSNorm

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 7, 3, 16, generator=g) * 5).to(dtype)
    ours, theirs = RMSNorm(16, 1e-5).to(dtype), hf.Llama4TextRMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(16, generator=g) + 0.5)
        theirs.weight.copy_(ours.weight)
        assert torch.equal(ours(x), theirs(x))
        assert torch.equal(rms_norm(x, 1e-5, ours.weight), theirs(x))
        assert torch.equal(rms_norm(x, 1e-6), hf.Llama4TextL2Norm(1e-6)(x))


def test_decode_matches_full_forward_across_chunks():
    model = random_model(tiny_config(num_hidden_layers=4, interleave_moe_layer_step=2))
    tokens = torch.randint(0, 97, (2, 31), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch=2)
        steps = torch.cat([model(tokens[:, i : i + 1], cache) for i in range(tokens.shape[1])], dim=1)
    assert cache.length == 31
    assert (steps - full).abs().max().item() <= 1e-5 * full.abs().max().item()


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_moe_equals_reference(top_k):
    cfg = tiny_config(num_experts_per_tok=top_k, num_local_experts=5)
    moe = random_model(cfg).layers[0].feed_forward
    assert isinstance(moe, MoE)
    x = torch.randn(3, 17, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast, ref = moe(x), moe.forward_reference(x)
    idx, _ = moe.route(x.reshape(-1, cfg.hidden_size))
    assert idx.unique().numel() > 1  # several experts really in use
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_gate_scales_expert_input_not_output():
    cfg = tiny_config()
    moe = random_model(cfg).layers[0].feed_forward
    h = torch.randn(6, cfg.hidden_size)
    with torch.no_grad():
        idx, gate = moe.route(h)
        want = moe.shared_expert(h) + torch.stack(
            [moe.experts.expert(int(e), g * row[None])[0] for e, g, row in zip(idx[:, 0], gate[:, 0], h)]
        )
        wrong = moe.shared_expert(h) + torch.stack(
            [g * moe.experts.expert(int(e), row[None])[0] for e, g, row in zip(idx[:, 0], gate[:, 0], h)]
        )
        got = moe(h[None])[0]
    torch.testing.assert_close(got, want)
    assert (got - wrong).abs().max() > 1e-3


def test_scout_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = Model(ModelConfig.preset("scout"))
    assert sum(p.numel() for p in model.parameters()) == 107_769_861_120
    assert ModelConfig.preset("scout").num_parameters() == 107_769_861_120


def test_config_round_trips():
    marked = dataclasses.replace(ModelConfig.preset("tiny"), chunk_markers=True)
    presets = (ModelConfig.preset("scout"), ModelConfig.preset("tiny"))
    for cfg in (*presets, tiny_config(interleave_moe_layer_step=2), marked):
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg
        assert ModelConfig.from_hf({"text_config": cfg.to_hf()}) == cfg
    # longctx's own field is written only when set: HF-style configs (and the fingerprints of
    # models saved before it existed) are unchanged.
    assert "chunk_markers" not in ModelConfig.preset("tiny").to_hf() and marked.to_hf()["chunk_markers"] is True


def test_config_reads_published_and_transformers5_forms():
    scout = ModelConfig.preset("scout")
    assert scout.layer_kinds[:4] == ["chunked", "chunked", "chunked", "global"]
    assert scout.layer_kinds.count("global") == 12 and all(scout.is_moe)
    published = {  # the shape of the 2025 Scout config.json (text part), attn_temperature_tuning as int
        "text_config": {
            "hidden_size": 5120,
            "num_hidden_layers": 48,
            "num_attention_heads": 40,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 8192,
            "intermediate_size_mlp": 16384,
            "num_local_experts": 16,
            "vocab_size": 202048,
            "rope_theta": 500000.0,
            "attn_temperature_tuning": 4,
            "floor_scale": 8192,
            "attn_scale": 0.1,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 16.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
            "no_rope_layers": [],
            "interleave_moe_layer_step": 1,
            "use_qk_norm": True,
            "attention_chunk_size": 8192,
            "max_position_embeddings": 10485760,
            "bos_token_id": 200000,
            "eos_token_id": [200001, 200007, 200008],
            "pad_token_id": 200018,
            "model_type": "llama4_text",
        }
    }
    assert ModelConfig.from_hf(published) == scout
    dropped = ("rope_theta", "rope_scaling", "attn_temperature_tuning")
    rope = {"rope_theta": 500000.0, **published["text_config"]["rope_scaling"]}
    hf5 = transformers.Llama4TextConfig(
        **{k: v for k, v in published["text_config"].items() if k not in dropped}, rope_parameters=rope
    )
    assert ModelConfig.from_hf(hf5.to_dict()) == scout


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ConfigError, match="rope_type"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "field, value, why",
    [
        ("hidden_size", 0, "must be a positive int"),
        ("hidden_size", -64, "must be a positive int"),
        ("hidden_size", 64.5, "must be a positive int"),
        ("hidden_size", "64", "must be a positive int"),
        ("num_hidden_layers", 1e5, "must be a positive int"),  # JSON 1e5 is a float
        ("num_hidden_layers", 10**9, "is over 10000"),
        ("num_attention_heads", True, "must be a positive int"),
        ("head_dim", 0, "must be a positive int"),
        ("head_dim", 15, "must be even"),
        ("vocab_size", 0, "must be a positive int"),
        ("num_local_experts", 0, "must be a positive int"),
        ("num_experts_per_tok", 5, "with 4 experts"),
        ("attention_chunk_size", 0, "must be a positive int"),
        ("interleave_moe_layer_step", 0, "must be a positive int"),
        ("rope_theta", NAN, "finite"),
        ("rope_theta", -1.0, "positive finite number"),
        ("rms_norm_eps", NAN, "finite"),
        ("rms_norm_eps", INF, "finite"),
        ("rms_norm_eps", 0.0, "positive finite number"),
        ("attn_scale", NAN, "finite"),
        (
            "rope_scaling",
            {
                "rope_type": "llama3",
                "factor": NAN,
                "low_freq_factor": 1.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8,
            },
            "finite",
        ),
        ("rope_scaling", {"rope_type": "llama3", "factor": 0}, "factor must be a positive number"),
        ("rope_scaling", "llama3", "must be a dict or null"),
        ("moe_layers", [0, 9], "out of range"),
        ("moe_layers", [1, 1], "lists a layer twice"),
        ("moe_layers", ["1"], "list of ints"),
        ("no_rope_layers", [1, 1, 2, 0], "entries must be 0"),
        ("no_rope_layers", [1, 0], "has 2 entries for 4 layers"),
        ("eos_token_id", [], "non-empty list"),
        ("bos_token_id", -1, "token id"),
        ("tie_word_embeddings", "yes", "true or false"),
    ],
)
def test_untrusted_config_values_are_refused_naming_the_field(tmp_path, field, value, why):
    """A config.json is untrusted input: every bad type, range or non-finite value is a
    ConfigError naming the field, raised before anything is derived or allocated."""
    cfg = ModelConfig.preset("tiny").to_hf()
    cfg[field] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))  # NaN and Infinity as Python's json writes (and reads) them
    with pytest.raises(ConfigError, match=rf"{path}: ModelConfig\.{field}: .*{why}"):
        ModelConfig.from_file(path)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "\udcff"])
def test_a_config_that_is_not_a_json_object_is_a_config_error(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=str(path)):
        ModelConfig.from_file(path)


@pytest.mark.parametrize(
    "field, value",
    [("num_hidden_layers", 5000), ("head_dim", 10**9), ("num_local_experts", 100_000), ("vocab_size", 10**8)],
)
def test_a_config_implying_more_weights_than_the_files_hold_is_refused_before_allocation(tmp_path, field, value):
    save_model(random_model(tiny_config()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update({field: value, "no_rope_layers": [], "moe_layers": None})  # per-layer lists derived anew
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"config\.json: describes [\d,]+ parameters .* but the weight files "
        rf"hold [\d,]+ B.*{field}={value}",
    ):
        load_model(tmp_path)


def test_a_nan_norm_epsilon_in_a_checkpoint_is_a_config_error(tmp_path):
    save_model(random_model(tiny_config()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rms_norm_eps"] = NAN
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"rms_norm_eps: must be finite"):
        load_model(tmp_path)


def test_key_mapping_round_trip():
    model = random_model(tiny_config(interleave_moe_layer_step=2))
    for name in model.state_dict():
        assert hf_to_longctx(longctx_to_hf(name)) == name
        assert hf_to_longctx("language_model." + longctx_to_hf(name)) == name
    assert hf_to_longctx("vision_model.layers.0.mlp.fc1.weight") is None
    assert hf_to_longctx("multi_modal_projector.linear_1.weight") is None


def test_save_model_reloads_in_transformers_and_ours(tmp_path):
    model = random_model(tiny_config(interleave_moe_layer_step=2))
    save_model(model, tmp_path)
    tokens = torch.randint(0, 97, (1, 19))
    with torch.no_grad():
        ours = load_model(tmp_path)(tokens)
        ref = transformers.Llama4ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")(tokens).logits
        want = model(tokens)
    assert torch.equal(ours, want)
    assert (ref - want).abs().max() <= 1e-4 * want.abs().max()


# ---- corrupt checkpoints ------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path):
    hf_model(0).save_pretrained(tmp_path)
    add_prefix(tmp_path, shards=3)
    return tmp_path


def test_missing_shard_is_named(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load_model(sharded)


def test_wrong_shape_is_named(sharded):
    path = sharded / "model-00001-of-00003.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key] = state[key][:-1]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=f"{key}.*shape"):
        load_model(sharded)


def test_missing_tensor_is_named(tmp_path):
    hf_model(0).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.2.feed_forward.experts.down_proj"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.2\.feed_forward\.experts\.down_proj"):
        load_model(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    hf_model(0).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*: model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_model(tmp_path)


def test_tensor_listed_in_index_but_absent_is_named(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.model.extra.weight"] = "model-00001-of-00003.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="language_model.model.extra.weight"):
        load_model(sharded)


def test_pickles_and_garbage_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="unpickling"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(tmp_path)


def test_triton_kernels_inside_the_model_match_the_reference(monkeypatch):
    """The whole model (prefill + decode over segments) on the Triton kernels, run by the
    interpreter on CPU, against the PyTorch reference path."""
    pytest.importorskip("triton")
    from longctx.cache import OffloadPolicy
    from longctx.generate import prefill

    model = random_model(tiny_config(head_dim=16, interleave_moe_layer_step=2))
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(4))

    def run():
        cache = model.new_cache(offload=OffloadPolicy(segment_tokens=8))
        with torch.no_grad():
            first = prefill(model, tokens[:, :21], cache, 17)  # 17 > the 16-query decode cut-off
            rest = [model(tokens[:, i : i + 1], cache)[:, -1] for i in range(21, 40)]
        return torch.cat([first, *rest])

    want = run()
    from longctx.kernels import attention as kernels

    launches = []
    real_launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda *a, **kw: launches.append(1) or real_launch(*a, **kw))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got = run()
    assert len(launches) > 19 * len(model.layers)  # every attention call ran the Triton kernel
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_training_path_equals_inference_path_and_has_gradients():
    model = random_model(tiny_config(interleave_moe_layer_step=2))
    tokens = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(tokens)
    got = model(tokens)  # grad enabled: dense SDPA attention
    assert got.requires_grad
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    got.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" not in n)


@pytest.mark.parametrize("T,chunk,start", [(23, None, 0), (23, 5, 0), (16, 8, 0), (7, 16, 0), (23, 5, 3), (4, 5, 3)])
def test_training_attention_equals_masked_reference(T, chunk, start):
    """dense_attention (the differentiable path: SDPA causal, chunks as a batch dimension) against
    an explicit float64 masked softmax, values and gradients; GQA 4:2, T not a multiple of the chunk."""
    from longctx.attention import dense_attention

    gen = torch.Generator().manual_seed(T * 7 + start)
    q, k, v = (torch.randn(2, h, T, 8, generator=gen, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    pos = torch.arange(start, start + T)
    mask = pos[None, :] <= pos[:, None]
    if chunk is not None:
        mask &= (pos[None, :] // chunk) == (pos[:, None] // chunk)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    want = ((q @ kk.transpose(-1, -2)) * 0.3).masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    got = dense_attention(q, k, v, start, chunk, 0.3)
    torch.testing.assert_close(got, want)
    w = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    grads_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    grads_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b)
