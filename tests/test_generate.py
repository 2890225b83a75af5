"""The one decode loop: decode() equals full-forward argmax, the token-by-token loop it
replaced (greedy and sampled), and generate() is prefill + decode; TextStream's pieces join
to the one-shot decode; the thread rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_model, tiny_config
from longctx.generate import TextStream, decode, generate, prefill, sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config())


@pytest.fixture(scope="module")
def prompt(model):
    return torch.randint(3, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))


def stepwise(model, prompt, steps, stops, temperature=0.0, top_p=1.0, seed=None):
    """The loop decode() replaced: per row, feed each sampled token back (a fresh cache), keep
    it unless it is a stop token, stop the row there."""
    cache = model.new_cache(batch=prompt.shape[0])
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = model(prompt, cache)[:, -1].float()
        out, done = [[] for _ in range(prompt.shape[0])], [False] * prompt.shape[0]
        for _ in range(steps):
            nxt = sample(logits, temperature=temperature, top_p=top_p, generator=gen)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    if t in stops:
                        done[b] = True
                    else:
                        out[b].append(t)
            if all(done):
                break
            logits = model(nxt[:, None], cache)[:, -1].float()
    return out, ["stop" if d else "length" for d in done]


def test_greedy_decode_equals_full_forward_argmax(model, prompt):
    cache = model.new_cache(batch=2)
    got = decode(model, cache, prefill(model, prompt, cache, chunk_size=4), max_new_tokens=7, stop_ids=[])
    ids = prompt
    with torch.no_grad():
        for _ in range(7):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert got.tokens == ids[:, 13:].tolist() and got.stopped == ["length", "length"]
    assert cache.length == 13 + 6  # the last token is never fed: nobody reads its logits
    assert got.prefill_s == 0.0 and got.decode_s > 0


@pytest.mark.parametrize("temperature, top_p, seed", [(0.0, 1.0, None), (1.0, 1.0, 5), (0.8, 0.9, 11)])
def test_decode_equals_the_token_by_token_loop_with_per_row_stops(model, prompt, temperature, top_p, seed):
    free, _ = stepwise(model, prompt, 8, set(), temperature, top_p, seed)
    stops = {free[0][2]}  # row 0 stops at its third token; row 1 only if it draws the same token
    want, why = stepwise(model, prompt, 8, stops, temperature, top_p, seed)
    cache = model.new_cache(batch=2)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    seen = []
    got = decode(
        model,
        cache,
        prefill(model, prompt, cache),
        max_new_tokens=8,
        stop_ids=stops,
        temperature=temperature,
        top_p=top_p,
        generator=gen,
        on_token=lambda step, new: seen.append(new),
    )
    assert got.tokens == want and got.stopped == why and why[0] == "stop"
    # The callback saw each kept token once, in order, and None for a row once it has stopped.
    for b in range(2):
        assert [new[b] for new in seen if new[b] is not None] == want[b]
    assert seen[2][0] is None and all(new[0] is None for new in seen[2:])


def test_generate_is_prefill_then_decode(model, prompt):
    a = generate(model, prompt, max_new_tokens=5, chunk_size=3, stop_ids=[])
    cache = model.new_cache(batch=2)
    b = decode(model, cache, prefill(model, prompt, cache, chunk_size=3), max_new_tokens=5, stop_ids=[])
    assert (a.tokens, a.stopped) == (b.tokens, b.stopped) and a.prefill_s > 0
    # Default stops: the config's eos ids; zero new tokens: nothing decoded, nothing fed.
    eos = a.tokens[0][1]
    model.config.eos_token_id = [eos]
    try:
        c = generate(model, prompt[:1], max_new_tokens=5)
    finally:
        model.config.eos_token_id = tiny_config().eos_token_id
    assert c.tokens == [a.tokens[0][:1]] and c.stopped == ["stop"]
    cache = model.new_cache()
    none = generate(model, prompt[:1], max_new_tokens=0, cache=cache)
    assert none.tokens == [[]] and none.stopped == ["length"] and cache.length == 13


# ---- TextStream: text pieces as tokens arrive ---------------------------------------------


def stream_pieces(chunks: list[bytes]) -> list[str]:
    """TextStream over tokens whose bytes are ``chunks`` (token id = index)."""
    s = TextStream(lambda i: chunks[i])
    return [s.push(i) for i in range(len(chunks))] + [s.close()]


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.lists(st.integers(0, 200), max_size=12),
    st.integers(0, 3),
)
def test_text_stream_joins_to_the_one_shot_decode(text, cuts, drop):
    """Any cutting of any text's bytes into tokens (cuts inside characters included), also with
    the last character left unfinished: joined pieces == decode(errors="replace").strip()."""
    raw = text.encode()
    raw = raw[: max(0, len(raw) - drop)]  # maybe cut inside the last character
    bounds = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    chunks = [raw[a:b] for a, b in zip(bounds, bounds[1:])]
    pieces = stream_pieces(chunks)
    assert "".join(pieces) == raw.decode("utf-8", errors="replace").strip()


def test_text_stream_holds_a_split_character_until_it_is_whole():
    pieces = stream_pieces([b" caf", b"\xc3", b"\xa9 ", b"\xe6\x97", b"\xa5 ", b" "])
    assert pieces == ["caf", "", "é", "", " 日", "", ""]  # no U+FFFD piece, whitespace held until text


def test_default_threads_rule():
    from longctx.generate import SMALL_MODEL_PARAMETERS, default_threads

    small = random_model(tiny_config())
    assert sum(p.numel() for p in small.parameters()) < SMALL_MODEL_PARAMETERS
    assert default_threads(None) is None
    assert default_threads(small) in (1, None)  # None only when OMP_NUM_THREADS is set


def test_prefill_refuses_a_disk_tier_too_small_before_any_work(model, prompt, tmp_path, monkeypatch):
    """With no device or CPU budget every sealed KV byte goes to the disk tier: prefill checks
    its free space first (cache.check_room), so a tier too small is a CacheError naming the
    folder and the bytes before the model runs once; with room, the same prefill gives the
    logits of an all-in-memory one (to rounding)."""
    import shutil
    from collections import namedtuple

    from longctx.cache import CacheError
    from longctx.offload import OffloadPolicy

    policy = OffloadPolicy(device_bytes=0, cpu_bytes=0, disk_dir=tmp_path / "kv", segment_tokens=4)
    forwards = []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
        need = prompt.shape[0] * prompt.shape[1] * model.config.kv_bytes_per_token(4)["global"]
        with pytest.raises(CacheError, match=rf"kv: not enough free space .* needs {need} B, 100 B free"):
            prefill(model, prompt, model.new_cache(batch=2, offload=policy), chunk_size=4)
        assert forwards == [] and not (tmp_path / "kv").exists()
        monkeypatch.undo()
        on_disk = prefill(model, prompt, model.new_cache(batch=2, offload=policy), chunk_size=4)
    finally:
        hook.remove()
    in_memory = prefill(model, prompt, model.new_cache(batch=2), chunk_size=4)
    assert forwards and torch.allclose(on_disk, in_memory, atol=1e-5)  # segments merge in another order
