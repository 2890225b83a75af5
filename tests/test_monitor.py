"""longctx.monitor: expert counts equal a recount from the router, collapse detection, timings
that match what prefill/decode did, KV bytes per tier equal the cache's, hooks gone after exit,
outputs unchanged."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from torch import nn

import longctx
from conftest import random_model, tiny_config
from longctx import attention, offload, stats
from longctx.generate import generate, prefill
from longctx.monitor import Monitor, RoutingCollapse
from longctx.offload import OffloadPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


def moe_model(**overrides):
    """Tiny random model, top-2 routing, MoE in layers 1 and 3 (dense MLPs in 0 and 2)."""
    return random_model(tiny_config(num_experts_per_tok=2, moe_layers=[1, 3], **overrides))


def tokens(n: int, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_expert_counts_equal_a_recount_from_the_router():
    model = moe_model()
    inputs = {i: [] for i, b in enumerate(model.layers) if hasattr(b.feed_forward, "router")}
    grab = [
        model.layers[i].feed_forward.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0])) for i in inputs
    ]
    with Monitor(model, min_tokens=10**9) as mon:
        gen = generate(model, tokens(50), max_new_tokens=6, chunk_size=16, stop_ids=[])
    for h in grab:
        h.remove()
    rep = mon.report()
    n_tokens = 50 + len(gen.tokens[0]) - 1  # the last sampled token is never fed back
    assert [e.layer for e in rep.experts] == [1, 3]
    for e in rep.experts:
        moe = model.layers[e.layer].feed_forward
        recount = torch.zeros(moe.n_experts, dtype=torch.long)
        for x in inputs[e.layer]:
            with torch.inference_mode():
                idx, _ = moe.route(x.reshape(-1, x.shape[-1]))
            recount += torch.bincount(idx.flatten(), minlength=moe.n_experts)
        assert e.counts == recount.tolist()
        assert sum(e.counts) == n_tokens * moe.top_k and e.tokens == n_tokens
        assert e.busiest_share == max(e.counts) / n_tokens
        assert e.max_over_mean == pytest.approx(max(e.counts) / (sum(e.counts) / moe.n_experts))


def test_outputs_identical_with_and_without_monitor():
    model, x = moe_model(), tokens(40, seed=1)

    def run():
        c = model.new_cache()
        with torch.inference_mode():
            first = model(x[:, :23], c)
            last = prefill(model, x[:, 23:], c, chunk_size=7)
        return first, last, generate(model, x, max_new_tokens=5, chunk_size=9, stop_ids=[]).tokens

    plain = run()
    with Monitor(model, min_tokens=10**9):
        watched = run()
    assert torch.equal(plain[0], watched[0]) and torch.equal(plain[1], watched[1]) and plain[2] == watched[2]
    assert torch.equal(run()[1], plain[1])  # and after it


PLACE = offload.Placer.place


def wrapped() -> list[bool]:
    """Which of the functions the monitor may wrap are replaced now (``stage`` only on CUDA)."""
    return [PLACE is not offload.Placer.place, attention.stage is not offload.stage, stats.stage is not offload.stage]


def test_hooks_and_wrappers_are_removed_after_exit_and_after_an_exception():
    model = moe_model()
    before = hook_counts(model)
    with Monitor(model) as mon:
        assert sum(hook_counts(model)) > sum(before)
        assert wrapped() == [True, False, False]
        model(tokens(8), model.new_cache())
    assert hook_counts(model) == before
    assert wrapped() == [False, False, False]
    assert len(mon.report().steps) == 1

    with pytest.raises(ValueError, match="tokens must be"), Monitor(model):
        model(tokens(8), model.new_cache())
        model(torch.zeros(5, dtype=torch.long))  # the model's own error, mid-block
    assert hook_counts(model) == before
    assert wrapped() == [False, False, False]


def test_forced_collapse_warns_and_balanced_routing_does_not():
    model = moe_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoutingCollapse)
        with Monitor(model, min_tokens=200) as mon:
            prefill(model, tokens(300), model.new_cache(), chunk_size=64)
    assert mon.report().collapsed == []
    # Force layer 3's router onto expert 2: a bias that outweighs any logit the weights give.
    moe = model.layers[3].feed_forward
    forced = nn.Linear(moe.router.in_features, moe.n_experts, bias=True)
    with torch.no_grad():
        forced.weight.copy_(moe.router.weight)
        forced.bias.copy_(torch.tensor([0.0, 0.0, 1e4, 0.0]))
    moe.router = forced
    with pytest.warns(RoutingCollapse, match="MoE layer 3: expert 2 received 100.0% of 300 tokens") as seen:
        with Monitor(model, min_tokens=200) as mon:
            prefill(model, tokens(300), model.new_cache(), chunk_size=64)
    assert len(seen) == 1
    rep = mon.report()
    assert rep.collapsed == [3]
    assert rep.experts[1].counts[2] == 300 and rep.experts[1].busiest_share == 1.0
    # Too few tokens to judge: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoutingCollapse)
        with Monitor(model, min_tokens=200):
            prefill(model, tokens(100), model.new_cache(), chunk_size=64)


def test_default_threshold_is_halfway_between_balanced_and_one():
    model = moe_model()  # top-2 over 4 experts: a balanced layer gives each expert half the tokens
    with Monitor(model) as mon:
        prefill(model, tokens(300), model.new_cache(), chunk_size=64)
    rep = mon.report()
    assert all(rep.threshold(e) == 0.75 for e in rep.experts)
    assert all(e.busiest_share > 0.5 for e in rep.experts) and rep.collapsed == []
    with pytest.warns(RoutingCollapse), Monitor(model, collapse_share=0.5) as mon:
        prefill(model, tokens(300), model.new_cache(), chunk_size=64)
    assert mon.report().collapsed == [1, 3]


@pytest.mark.usefixtures("one_thread")
def test_embedded_model_routing_is_not_collapsed_on_its_text():
    """The shipped model trains its last stages with the router load-balancing loss: over 4K
    tokens of the English prose it reads (the NIAH haystack, three seeds) no MoE layer sends
    more than the threshold to one expert (measured busiest shares 29-55 %; the vocab-key model
    it replaced sent 100 % in three layers). On text unlike its training prose (this README,
    markdown and code, and the example documents) layers 0, 2 and 3 still lean on one expert
    (64-89 %): the monitor warns there."""
    model = longctx.load_model()
    for seed in (0, 1, 2):
        ids = longctx.niah.make_haystack(model.tokenizer, min_tokens=4096, seed=seed).ids[:4096]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RoutingCollapse)
            with Monitor(model) as mon:
                prefill(model, torch.as_tensor(ids.astype("int64"))[None], model.new_cache(), chunk_size=1024)
        rep = mon.report()
        assert rep.collapsed == [] and sum(rep.experts[0].counts) == 4096
        assert all(e.busiest_share < rep.threshold(e) for e in rep.experts)


def test_timings_follow_prefill_and_decode_and_parts_add_up():
    model = moe_model()
    with Monitor(model, min_tokens=10**9) as mon:
        generate(model, tokens(600), max_new_tokens=5, chunk_size=128, stop_ids=[])
    rep = mon.report()
    assert [(s.phase, s.tokens, s.position) for s in rep.steps] == (
        [("prefill", 128, p) for p in (0, 128, 256, 384)]
        + [("prefill", 88, 512)]
        + [("decode", 1, p) for p in (600, 601, 602, 603)]
    )
    assert rep.phases["prefill"].forwards == 5 and rep.phases["prefill"].tokens == 600
    assert rep.phases["decode"].forwards == 4 and rep.phases["decode"].tokens == 4
    for s in rep.steps:
        assert set(s.parts) == {"attention.chunked", "attention.global", "moe", "mlp", "other"}  # nothing sealed
        assert all(v >= 0 for v in s.parts.values())
        assert sum(s.parts.values()) <= s.seconds  # disjoint intervals inside the forward
        assert s.tokens_per_s == pytest.approx(s.tokens / s.seconds)
    pre = rep.phases["prefill"]
    assert pre.unaccounted == pytest.approx(pre.seconds - sum(pre.parts.values()))
    # Bar 3: the parts cover the wall time. A moment the process is descheduled between two parts
    # counts as unaccounted, so on a busy machine one 0.1 s prefill can fall short: best of three.
    coverage = [sum(pre.parts.values()) / pre.seconds]
    while max(coverage) < 0.9 and len(coverage) < 3:
        with Monitor(model, min_tokens=10**9) as mon:
            generate(model, tokens(600), max_new_tokens=5, chunk_size=128, stop_ids=[])
        pre = mon.report().phases["prefill"]
        coverage.append(sum(pre.parts.values()) / pre.seconds)
    assert max(coverage) >= 0.9, coverage


def test_kv_bytes_per_tier_equal_the_cache(tmp_path):
    model = moe_model()
    per_segment = 2 * 2 * 32 * 16 * 4  # k and v, 2 KV heads, 32 tokens, head_dim 16, fp32
    policy = OffloadPolicy(segment_tokens=32, device_bytes=0, cpu_bytes=2 * per_segment, disk_dir=tmp_path)
    c = model.new_cache(offload=policy)
    with Monitor(model, min_tokens=10**9) as mon:
        generate(model, tokens(200), max_new_tokens=3, cache=c, chunk_size=50, stop_ids=[])
    rep = mon.report()
    tiers = c.tier_bytes()
    assert rep.kv_bytes == rep.steps[-1].kv_bytes == tiers and sum(tiers.values()) == c.nbytes
    assert tiers["cpu"] == 2 * per_segment and tiers["disk"] == 4 * per_segment and tiers["device"] > 0
    assert rep.peak_kv_bytes == c.nbytes
    # Every prefill chunk of 50 seals a 32-token segment: its copy to the CPU or disk tier is timed.
    assert all(s.parts["kv_staging"] > 0 for s in rep.steps if s.phase == "prefill")
    assert [sum(s.kv_bytes.values()) for s in rep.steps] == sorted(sum(s.kv_bytes.values()) for s in rep.steps)
    assert rep.peak_device_bytes is None and rep.peak_host_rss_bytes >= rep.steps[-1].peak_host_rss_bytes > 0


def test_report_exports_round_trip():
    model = moe_model()
    with Monitor(model) as mon:
        generate(model, tokens(300), max_new_tokens=3, chunk_size=100, stop_ids=[])
    rep = mon.report()
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["experts"][0]["counts"] == rep.experts[0].counts and len(d["steps"]) == len(rep.steps)
    assert d["steps"][0]["tokens_per_s"] == rep.steps[0].tokens_per_s
    prom = rep.to_prometheus()
    for e in rep.experts:
        for i, c in enumerate(e.counts):
            assert f'longctx_expert_tokens_total{{layer="{e.layer}",expert="{i}"}} {c}\n' in prom
    assert 'longctx_tokens_total{phase="prefill"} 300\n' in prom
    assert all(line.startswith("#") or line.startswith("longctx_") for line in prom.splitlines())
    page = rep._repr_html_()
    assert page.count("<table>") == 3 and "tok/s" in page
    assert "prefill: 3 forwards, 300 tokens" in rep.summary()


def test_plot_is_one_figure_with_three_panels(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    model = moe_model()
    with Monitor(model) as mon:
        generate(model, tokens(200), max_new_tokens=3, chunk_size=50, stop_ids=[])
    fig = mon.plot(tmp_path / "run.png")
    assert isinstance(fig, Figure) and (tmp_path / "run.png").stat().st_size > 0
    heat, speed, memory = fig.axes[:3]
    assert heat.images[0].get_array().shape == (2, 4)  # MoE layers × experts
    assert [len(line.get_xdata()) for line in speed.lines] == [4, 2]  # prefill chunks, decode steps
    assert memory.lines


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    model = moe_model()
    with Monitor(model) as mon:
        model(tokens(4))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"longctx\[plot\]"):
        mon.plot()


def test_arguments_are_checked():
    model = moe_model()
    with pytest.raises(TypeError, match="longctx Model"):
        Monitor(nn.Linear(2, 2))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="collapse_share"):
            Monitor(model, collapse_share=bad)
    with pytest.raises(ValueError, match="min_tokens"):
        Monitor(model, min_tokens=-1)
    mon = Monitor(model)
    with mon, pytest.raises(RuntimeError, match="already active"):
        mon.__enter__()
