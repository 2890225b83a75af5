"""Tier placement, disk tensors and the host-to-device staging of KV segments (longctx.offload)."""

from __future__ import annotations

import gc

import pytest
import torch

from longctx import offload
from longctx.offload import CacheError, OffloadPolicy, Placer, disk_tensor, kv_to, stage


def test_policy_refuses_bad_values():
    with pytest.raises(ValueError, match="segment_tokens"):
        OffloadPolicy(segment_tokens=0)
    with pytest.raises(ValueError, match="cpu_bytes"):
        OffloadPolicy(cpu_bytes=-1)


def test_placer_fills_tiers_in_order_and_refuses_without_disk(tmp_path):
    kv = torch.randn(2, 1, 2, 4, 8)  # 512 bytes
    placer = Placer(OffloadPolicy(device_bytes=600, cpu_bytes=600, disk_dir=tmp_path), "cpu")
    stored = [placer.place(kv) for _ in range(3)]
    assert [tier for _, tier in stored] == ["device", "cpu", "disk"]
    assert placer.used == {"device": 512, "cpu": 512, "disk": 512}
    for t, _ in stored:
        assert torch.equal(t, kv) and t.data_ptr() != kv.data_ptr()  # copies, not views
    fork = placer.copy()
    fork.place(kv)
    assert placer.used["disk"] == 512 and fork.used["disk"] == 1024  # accounts are independent
    with pytest.raises(CacheError, match="disk_dir"):
        Placer(OffloadPolicy(device_bytes=0, cpu_bytes=0), "cpu").place(kv)


def test_disk_tensor_is_a_file_that_goes_with_the_tensor(tmp_path):
    t = torch.randn(3, 5, dtype=torch.bfloat16)
    d = disk_tensor(tmp_path / "kv", t)
    files = list((tmp_path / "kv").glob("kv-*.bin"))
    assert torch.equal(d, t) and len(files) == 1 and files[0].stat().st_size == t.numel() * 2
    del d
    gc.collect()
    assert list((tmp_path / "kv").glob("kv-*.bin")) == []


def test_kv_to_moves_a_sealed_block_in_one_piece():
    """K and V that are the halves of one (2, B, H, n, D) block (a sealed segment, here at an
    offset inside a larger storage) come out equal to the halves; separate tensors too."""
    big = torch.randn(3, 2, 2, 3, 5, 4)
    block = big[1]
    k, v = kv_to(block[0], block[1], torch.device("cpu"))
    assert torch.equal(k, block[0]) and torch.equal(v, block[1])
    a, b = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    k, v = kv_to(a, b, torch.device("cpu"))
    assert torch.equal(k, a) and torch.equal(v, b)


def segments(n: int, device="cpu") -> list:
    return [(torch.randn(1, 2, 4, 8, device=device), torch.randn(1, 2, 4, 8, device=device), 4 * i) for i in range(n)]


def test_stage_off_cuda_uses_segments_where_they_are(tmp_path):
    """Off CUDA nothing is copied: CPU and memory-mapped segments come back as one list, as is."""
    segs = segments(3)
    segs[1] = (disk_tensor(tmp_path, segs[1][0]), disk_tensor(tmp_path, segs[1][1]), segs[1][2])
    groups = list(stage(segs, torch.device("cpu")))
    assert len(groups) == 1 and all(a is b for x, y in zip(groups[0], segs) for a, b in zip(x, y))
    assert list(stage([], torch.device("cpu"))) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("stage_bytes", [offload._STAGE_BYTES, 1, 2 * 2 * 4 * 8 * 4 * 2])
def test_stage_on_cuda_copies_lower_tiers_in_groups(monkeypatch, stage_bytes):
    """Resident segments first, as one group; then the others copied up in groups of at most
    _STAGE_BYTES (at least one segment each), every tensor equal to its source."""
    monkeypatch.setattr(offload, "_STAGE_BYTES", stage_bytes)
    dev = torch.device("cuda", torch.cuda.current_device())
    resident, away = segments(2, dev), segments(5)
    groups = list(stage(away[:2] + resident + away[2:], dev))
    assert [s[2] for s in groups[0]] == [s[2] for s in resident]
    staged = [s for g in groups[1:] for s in g]
    assert [s[2] for s in staged] == [s[2] for s in away]
    per_group = max(1, stage_bytes // (2 * away[0][0].numel() * 4))
    assert all(len(g) <= per_group for g in groups[1:])
    for (k, v, _), (k0, v0, _) in zip(staged, away):
        assert k.device == dev and torch.equal(k.cpu(), k0) and torch.equal(v.cpu(), v0)
