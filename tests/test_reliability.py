"""Saved KV caches against damage and killed or starved writers (issue 26's bar 3 and 4).

A bit flipped anywhere in any saved file is a ``CacheError`` naming that file; a save killed
after any of its writes, syncs or renames leaves the old or the new copy, complete, and the
next open removes what the kill left; a save past the file-size limit is a ``CacheError``
with the old copy intact and nothing left behind.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_model, tiny_config
from longctx import offload, storage
from longctx.cache import CacheError, KVCache, OffloadPolicy
from longctx.generate import prefill
from longctx.storage import MANIFEST, recover, write_manifest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config())


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))


def built(model, tokens, n: int) -> KVCache:
    cache = model.new_cache(2, OffloadPolicy(segment_tokens=8))
    prefill(model, tokens[:, :n], cache, None)
    return cache


def same_kv(a: KVCache, b: KVCache) -> bool:
    return all(
        ta.keys() == tb.keys() and all(torch.equal(ta[k].cpu(), tb[k].cpu()) for k in ta)
        for ta, tb in ((x.tensors(), y.tensors()) for x, y in zip(a.layers, b.layers))
    )


@pytest.fixture(scope="module")
def saved(model, tokens, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "c"
    built(model, tokens, 20).save(folder)
    return folder


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(0, 1 << 30), offset=st.integers(0, 1 << 30), bit=st.integers(0, 7))
def test_a_bit_flip_anywhere_is_a_cache_error_naming_the_file(model, tokens, saved, pick, offset, bit):
    files = sorted(p.name for p in saved.iterdir())
    name = files[pick % len(files)]
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "c"
        shutil.copytree(saved, copy)
        data = bytearray((copy / name).read_bytes())
        data[offset % len(data)] ^= 1 << bit
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(CacheError, match=name.replace(".", r"\.")):
            KVCache.load(copy, model, tokens=tokens[:, :20])


def test_undamaged_copy_loads_and_equals_the_saved_cache(model, tokens, saved):
    loaded = KVCache.load(saved, model, tokens=tokens[:, :20])
    assert loaded.length == 20 and same_kv(loaded, built(model, tokens, 20))


def test_a_renamed_or_missing_tensor_is_refused_even_with_a_matching_manifest(model, tokens, saved, tmp_path):
    """The manifest guards against damage; the tensor check against a forger who rewrites it."""
    from safetensors.torch import load_file, save_file

    for change in ("rename", "drop"):
        copy = tmp_path / change
        shutil.copytree(saved, copy)
        path = copy / "layer003.safetensors"  # a global layer (NoPE every 4th)
        tensors = load_file(path)
        t = tensors.pop("seg0")
        if change == "rename":
            tensors["seg9"] = t
        save_file(tensors, str(path))
        (copy / MANIFEST).unlink()
        write_manifest(copy)
        want = r"layer003\.safetensors: holds tensors .* needs \['seg0', 'seg1', 'tail'\]"
        with pytest.raises(CacheError, match=want):
            KVCache.load(copy, model)


def test_unchecksummed_or_malformed_saves_are_cache_errors(model, saved, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(saved, old)
    (old / MANIFEST).unlink()  # as format-1 saves were
    with pytest.raises(CacheError, match=r"manifest\.json: missing"):
        KVCache.load(old, model)
    forged = tmp_path / "forged"
    shutil.copytree(saved, forged)
    (forged / "cache.json").write_text('{"format": "longctx-kvcache-2"}')
    (forged / MANIFEST).unlink()
    write_manifest(forged)
    with pytest.raises(CacheError, match=r"cache\.json: malformed \(KeyError"):
        KVCache.load(forged, model)


def _in_child(fn) -> int:
    """Run fn() in a forked child; return its wait status. The child never returns to pytest."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def test_a_save_killed_at_every_step_leaves_old_or_new_and_no_strays(model, tokens, saved, tmp_path):
    old, new = built(model, tokens, 20), built(model, tokens, 30)
    outcomes = []
    for k in range(1, 40):
        target = tmp_path / f"run{k}" / "c"
        shutil.copytree(saved, target)

        def save_and_die_at_step_k(k=k, target=target):
            steps = []

            def step(name):
                steps.append(name)
                if len(steps) == k:
                    os.kill(os.getpid(), signal.SIGKILL)

            storage.step = step
            new.save(target)
            return 0

        status = _in_child(save_and_die_at_step_k)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or os.WEXITSTATUS(status) == 0, status
        loaded = KVCache.load(target, model)  # recovers, then verifies every file
        want = old if loaded.length == 20 else new
        assert loaded.length in (20, 30) and same_kv(loaded, want)
        assert loaded.token_hash() == want.token_hash()
        assert sorted(p.name for p in target.parent.iterdir()) == ["c"]  # no strays
        outcomes.append(loaded.length)
        if not killed:
            break
    else:
        pytest.fail("the save never finished")
    # Kills before the new folder is renamed in keep the old copy; later ones give the new.
    assert outcomes[0] == 20 and outcomes[-1] == 30 and outcomes == sorted(outcomes)
    assert len(outcomes) >= 9  # 4 layer files, cache.json, manifest, sync, 2 renames, ...


def test_recover_puts_the_old_copy_back_after_a_kill_between_the_renames(saved, model, tmp_path):
    target = tmp_path / "c"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    shutil.copytree(saved, tmp_path / f".c.old-{dead}-abcd")
    (tmp_path / f".c.tmp-{dead}-abcd").mkdir()
    (tmp_path / f".c.tmp-{dead}-abcd" / "layer000.safetensors").write_bytes(b"partial")
    live = tmp_path / f".c.tmp-{os.getpid()}-beef"  # a save still running: left alone
    live.mkdir()
    recover(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "c"]
    assert KVCache.load(target, model).length == 20


def test_saving_past_the_file_size_limit_is_a_cache_error_and_keeps_the_old_copy(model, tokens, saved, tmp_path):
    target = tmp_path / "c"
    shutil.copytree(saved, target)
    new = built(model, tokens, 30)
    report = tmp_path / "report.txt"

    def save_under_rlimit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            new.save(target)
        except CacheError as e:
            report.write_text(str(e)[:3000])  # under the limit itself
            return 0
        return 1

    assert _in_child(save_under_rlimit) == 0
    msg = report.read_text()
    assert msg.startswith(f"{target}: cannot save the KV cache") and "needs about" in msg and "B free" in msg
    assert "too large" in msg.lower()
    report.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    loaded = KVCache.load(target, model, tokens=tokens[:, :20])
    assert same_kv(loaded, built(model, tokens, 20))


def test_a_full_disk_refuses_the_save_before_writing(model, tokens, saved, tmp_path, monkeypatch):
    target = tmp_path / "c"
    shutil.copytree(saved, target)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(
        CacheError,
        match=rf"{target}: cannot save the KV cache \(not enough free space\); "
        r"it needs about \d+ B, 100 B free",
    ):
        built(model, tokens, 30).save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    monkeypatch.undo()
    assert KVCache.load(target, model).length == 20


def test_offload_disk_tier_checks_free_space_before_a_prefill(model, tokens, tmp_path, monkeypatch):
    policy = OffloadPolicy(device_bytes=0, cpu_bytes=0, disk_dir=tmp_path / "kv", segment_tokens=8)
    cache = model.new_cache(2, policy)
    per_token = model.config.kv_bytes_per_token(4)["global"]
    cache.check_room(30, per_token)  # plenty of room
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(
        CacheError,
        match=rf"{tmp_path / 'kv'}: not enough free space for the KV disk tier: "
        rf"needs {30 * 2 * per_token} B, 1000 B free",
    ):
        cache.check_room(30, per_token)
    # Room on the device and CPU budgets is counted first.
    roomy = model.new_cache(
        2, OffloadPolicy(device_bytes=30 * 2 * per_token, cpu_bytes=0, disk_dir=tmp_path / "kv", segment_tokens=8)
    )
    roomy.check_room(30, per_token)
    # A segment that no longer fits is refused when it is placed, not by a SIGBUS mid-write.
    with pytest.raises(CacheError, match="not enough free space for the KV disk tier"):
        offload.disk_tensor(tmp_path / "kv", torch.zeros(1000))
    assert list((tmp_path / "kv").glob("kv-*.bin")) == []
