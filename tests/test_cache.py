"""Chunked prefill, the bounded chunked-local cache, offload tiers, fork, save/load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import random_model, tiny_config
from longctx import offload
from longctx.cache import (
    AttentionMass,
    CacheError,
    ChunkedCache,
    GlobalCache,
    KVCache,
    OffloadPolicy,
    atomic_folder,
    token_hash,
)
from longctx.generate import generate, prefill, sample

T = 47  # > 9 attention chunks of 5; temperature tuning active (floor_scale 3)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(interleave_moe_layer_step=2))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(5))


def layer_kv(cache: KVCache, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All K and V a layer cache holds, concatenated, and the first position."""
    segs = cache.layers[i].segments()
    k = torch.cat([s[0].cpu() for s in segs], 2)
    v = torch.cat([s[1].cpu() for s in segs], 2)
    return k, v, segs[0][2]


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_chunked_prefill_equals_full_forward(model, tokens, chunk_size):
    with torch.no_grad():
        full = model(tokens)[:, -1]
    whole = model.new_cache(batch=2)
    prefill(model, tokens, whole, None)
    cache = model.new_cache(batch=2, offload=OffloadPolicy(segment_tokens=8))
    last = prefill(model, tokens, cache, chunk_size)
    assert (last - full).abs().max() <= 1e-5 * full.abs().max()
    assert cache.length == T and cache.token_hash() == token_hash(tokens)
    for i in range(len(model.layers)):
        k, v, start = layer_kv(cache, i)
        k0, v0, start0 = layer_kv(whole, i)
        assert start == start0
        for got, want in ((k, k0), (v, v0)):
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_chunked_layers_hold_at_most_one_attention_chunk(model, tokens):
    cfg = model.config
    cache = model.new_cache(batch=2)
    with torch.no_grad():
        for lo, step in zip((0, 3, 10, 11, 23), (3, 7, 1, 12, 24)):
            model(tokens[:, lo : lo + step], cache)
            L = cache.length
            for kind, layer in zip(cfg.layer_kinds, cache.layers):
                if kind == "chunked":
                    assert isinstance(layer, ChunkedCache)
                    assert layer.start == (L // cfg.attention_chunk_size) * cfg.attention_chunk_size
                    assert layer.k.shape[2] == L - layer.start < cfg.attention_chunk_size
                else:
                    assert isinstance(layer, GlobalCache)
                    assert sum(s[0].shape[2] for s in layer.segments()) == L


def decode_logits(model, tokens, cache, n_prompt):
    tokens = tokens.to(model.device)
    with torch.no_grad():
        out = [prefill(model, tokens[:, :n_prompt], cache, 6)]
        for i in range(n_prompt, tokens.shape[1]):
            out.append(model(tokens[:, i : i + 1], cache)[:, -1].float())
    return torch.stack(out, 1)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_results_equal_on_every_tier(model, tokens, tmp_path, device, monkeypatch):
    """Device-resident, CPU and disk segments give the same logits. On CPU every tier takes the
    same code path, so the logits are bit-equal. On CUDA, lower tiers are copied up in staged
    groups on a side stream and their results merged by LSE group by group, where resident ones
    go in one decode call: equal to fp32 rounding, and equal to the CPU run within that tolerance."""
    seg = 8
    on_cpu = decode_logits(model, tokens, model.new_cache(2, OffloadPolicy(segment_tokens=seg)), 30)
    if device == "cuda":
        model = copy.deepcopy(model).to(device)
    resident = decode_logits(model, tokens, model.new_cache(2, OffloadPolicy(segment_tokens=seg)), 30)
    policies = {
        "cpu": OffloadPolicy(device_bytes=0, segment_tokens=seg),
        "disk": OffloadPolicy(device_bytes=0, cpu_bytes=0, disk_dir=tmp_path / "kv", segment_tokens=seg),
    }
    tol = 1e-5 * resident.abs().max()
    for tier, policy in policies.items():
        # On CUDA also with one segment per staged group (many groups in flight, as at long contexts).
        for stage_bytes in (offload._STAGE_BYTES, 1) if device == "cuda" else (offload._STAGE_BYTES,):
            monkeypatch.setattr(offload, "_STAGE_BYTES", stage_bytes)
            cache = model.new_cache(2, policy)
            got = decode_logits(model, tokens, cache, 30)
            if device == "cpu":
                assert torch.equal(got, resident), tier
            else:
                assert (got - resident).abs().max() <= tol, (tier, stage_bytes)
            used = cache.tier_bytes()
            assert used[tier] > 0 and all(used[t] == 0 for t in ("cpu", "disk") if t != tier)
    assert (resident.cpu() - on_cpu).abs().max() <= tol.cpu()


def test_kv_larger_than_ram_budget_completes_through_disk(model, tokens, tmp_path):
    cfg = model.config
    per_token = 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # batch 2, K+V, fp32
    budget = 10 * per_token  # the global layer alone needs T tokens
    with pytest.raises(CacheError, match="disk_dir"):
        prefill(model, tokens, model.new_cache(2, OffloadPolicy(device_bytes=budget, cpu_bytes=0, segment_tokens=4)), 8)
    cache = model.new_cache(2, OffloadPolicy(device_bytes=budget, cpu_bytes=0, disk_dir=tmp_path, segment_tokens=4))
    last = prefill(model, tokens, cache, 8)
    used = cache.tier_bytes()
    chunked_bytes = sum(layer.nbytes for layer in cache.layers if isinstance(layer, ChunkedCache))
    assert used["disk"] > budget and used["device"] - chunked_bytes <= budget + 4 * per_token
    assert len(list(tmp_path.glob("kv-*.bin"))) > 0
    with torch.no_grad():
        assert torch.allclose(last, model(tokens)[:, -1], rtol=1e-5, atol=1e-5)
    del cache
    import gc

    gc.collect()
    assert list(tmp_path.glob("kv-*.bin")) == []  # segment files go with the cache


def test_fork_is_independent(model, tokens):
    cache = model.new_cache(2, OffloadPolicy(segment_tokens=8))
    prefill(model, tokens[:, :30], cache, 10)
    fork = cache.fork()
    with torch.no_grad():
        a = model(tokens[:, 30:], fork)[:, -1]
        b = model(tokens[:, 30:], cache.fork())[:, -1]
        direct = model(tokens)[:, -1]
    assert cache.length == 30 and fork.length == T
    assert torch.equal(a, b)
    assert torch.allclose(a, direct, rtol=1e-5, atol=1e-5)
    assert cache.token_hash() == token_hash(tokens[:, :30])


def test_save_load_round_trip_and_refusals(model, tokens, tmp_path):
    cache = model.new_cache(2, OffloadPolicy(segment_tokens=8))
    prefill(model, tokens[:, :30], cache, 10)
    cache.save(tmp_path / "c")
    loaded = KVCache.load(
        tmp_path / "c", model, tokens=tokens[:, :30], offload=OffloadPolicy(device_bytes=0, segment_tokens=8)
    )
    with torch.no_grad():
        want = model(tokens[:, 30:], cache.fork())
        got = model(tokens[:, 30:], loaded)
    assert torch.equal(got, want)
    other = random_model(tiny_config(interleave_moe_layer_step=2), seed=1)
    with pytest.raises(CacheError, match="another model"):
        KVCache.load(tmp_path / "c", other)
    with pytest.raises(CacheError, match="another text"):
        KVCache.load(tmp_path / "c", model, tokens=tokens[:, 1:31])
    with pytest.raises(CacheError, match="no cache.json"):
        KVCache.load(tmp_path / "missing", model)


def test_save_is_atomic(model, tokens, tmp_path, monkeypatch):
    cache = model.new_cache(2)
    prefill(model, tokens[:, :12], cache, None)
    cache.save(tmp_path / "c")
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    import safetensors.torch

    calls = []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(tensors, path)

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    prefill(model, tokens[:, 12:20], cache, None)
    with pytest.raises(CacheError, match=r"c: cannot save the KV cache \(OSError: disk full\); it needs about \d+ B"):
        cache.save(tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary left behind
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before
    assert KVCache.load(tmp_path / "c", model, tokens=tokens[:, :12]).length == 12  # old save intact


def test_atomic_folder_keeps_the_old_folder_when_the_final_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename = Path.rename

    def rename(self, dest):
        if self.name.startswith(".f.tmp-"):
            raise OSError("rename refused")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        with atomic_folder(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temporary or moved-aside folder left
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_attention_mass_shares_sum_to_one_per_query(model, tokens):
    cache = model.new_cache(2)
    prefill(model, tokens[:, :40], cache, None)
    cache.record_attention()
    with torch.no_grad():
        model(tokens[:, 40:43], cache)  # 3 queries
        model(tokens[:, 43:44], cache)  # 1 more
    mass = cache.attention_mass()
    cfg = model.config
    rows = 4 * cfg.num_attention_heads * cfg.layer_kinds.count("global")
    assert mass.shape == (2, 44)
    torch.testing.assert_close(mass.sum(1), torch.full((2,), float(rows)))
    assert (mass >= 0).all() and mass[:, :40].sum() > 0


def test_sampling_is_reproducible_and_top_p_keeps_the_top_token():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    draws = [sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), logits.argmax(-1))
    assert torch.equal(sample(logits), logits.argmax(-1))


def test_generate_greedy_matches_stepwise_argmax_and_stops(model, tokens):
    prompt = tokens[:1, :20]
    out = generate(model, prompt, max_new_tokens=6, stop_ids=[])
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tokens[0] == ids[0, 20:].tolist() and out.stopped == ["length"]
    first = out.tokens[0][0]
    stopped = generate(model, prompt, max_new_tokens=6, stop_ids=[first])
    assert stopped.tokens == [[]] and stopped.stopped == ["stop"]


def test_attention_mass_is_the_same_on_every_tier_and_in_a_fork(model, tokens, tmp_path):
    """The citation statistic reads offloaded segments through the same staging as attention:
    CPU and disk segments give the mass of device-resident ones, bit for bit on CPU. A fork
    records independently of its parent, and ``record_attention(False)`` stops recording."""
    policies = [
        OffloadPolicy(segment_tokens=8),
        OffloadPolicy(device_bytes=0, segment_tokens=8),
        OffloadPolicy(device_bytes=0, cpu_bytes=0, disk_dir=tmp_path, segment_tokens=8),
    ]
    masses = []
    for policy in policies:
        cache = model.new_cache(2, policy)
        prefill(model, tokens[:, :40], cache, 16)
        cache.record_attention()
        fork = cache.fork()
        with torch.no_grad():
            model(tokens[:, 40:44], fork)
        assert cache.attention_mass().sum() == 0  # the parent saw no queries since recording began
        masses.append(fork.attention_mass())
        fork.record_attention(False)
        assert fork.attention_mass().sum() == 0
    assert masses[0].sum() > 0
    for got in masses[1:]:
        assert torch.equal(got, masses[0])


def test_attention_calls_the_global_layers_stats_recorder(model, tokens):
    """The statistics hook is explicit: attention calls ``stats.record`` of a layer cache that
    has a recorder, once per forward, with the queries' start and every key it attended to."""
    calls = []

    class Spy(AttentionMass):
        def record(self, q, q_start, segments, lse, scale):
            calls.append((q.shape, q_start, sum(s[0].shape[2] for s in segments), lse.shape))
            super().record(q, q_start, segments, lse, scale)

    cache = model.new_cache(2, OffloadPolicy(segment_tokens=8))
    prefill(model, tokens[:, :20], cache, None)
    cache.record_attention()
    globals_ = [layer for layer in cache.layers if isinstance(layer, GlobalCache)]
    assert globals_ and all(layer.stats is None for layer in cache.layers if isinstance(layer, ChunkedCache))
    for layer in globals_:
        layer.stats = Spy(torch.zeros(2, 20))
    with torch.no_grad():
        model(tokens[:, 20:23], cache)
    Hq, D = model.config.num_attention_heads, model.config.head_dim
    assert calls == [((2, Hq, 3, D), 20, 23, (2, Hq, 3))] * len(globals_)
    torch.testing.assert_close(cache.attention_mass().sum(1), torch.full((2,), 3.0 * Hq * len(globals_)))
