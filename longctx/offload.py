"""Where global-layer KV segments live, and how off-device ones reach the device.

* ``OffloadPolicy``: the budgets of the three tiers, filled in order device → cpu → disk.
* ``Placer``: byte accounting per tier for one cache; stores each sealed segment on the first
  tier with room (device memory, CPU memory pinned when CUDA is present, or a memory-mapped
  file that is deleted with its tensor).
* ``stage``: the one host-to-device path for KV segments. Attention and the statistics
  recorded beside it both read segments through it.

A segment is a triple ``(k, v, k_start)``: k and v (B, Hkv, n, D) on any device, and the
absolute position of their first key.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

TIERS = ("device", "cpu", "disk")

Segment = tuple[torch.Tensor, torch.Tensor, int]


class CacheError(RuntimeError):
    """A cache that can't be used: wrong model or text, missing files, no room on any tier."""


@dataclass
class OffloadPolicy:
    """Where global-layer KV segments go, filled in tier order device → cpu → disk.

    device_bytes / cpu_bytes: budgets in bytes for sealed segments of the whole cache
    (None = unlimited). disk_dir: folder for memory-mapped segment files (needed only when the
    budgets above run out). segment_tokens: tokens per segment (the unit of offloading).

    Attention costs some host work per segment (a copy, a kernel launch, its share of a
    merge), so larger segments decode faster; 16,384 tokens keeps that work small beside the
    attention itself at long contexts while a segment stays a modest transfer. The open tail,
    up to one segment per global layer, stays on the device.
    """

    device_bytes: int | None = None
    cpu_bytes: int | None = None
    disk_dir: str | os.PathLike | None = None
    segment_tokens: int = 16384

    def __post_init__(self) -> None:
        if self.segment_tokens < 1:
            raise ValueError(f"OffloadPolicy.segment_tokens must be >= 1, got {self.segment_tokens}")
        for name in ("device_bytes", "cpu_bytes"):
            val = getattr(self, name)
            if val is not None and val < 0:
                raise ValueError(f"OffloadPolicy.{name} must be >= 0 or None, got {val}")


class Placer:
    """Byte accounting per tier for one cache; decides where the next sealed segment goes."""

    def __init__(self, policy: OffloadPolicy, device: torch.device | str):
        self.policy, self.device = policy, torch.device(device)
        self.used = dict.fromkeys(TIERS, 0)

    def copy(self) -> Placer:
        """An independent account with the same policy, device and bytes used (for forks)."""
        p = Placer(self.policy, self.device)
        p.used = dict(self.used)
        return p

    def tier_for(self, nbytes: int) -> str:
        pol = self.policy
        for tier, budget in (("device", pol.device_bytes), ("cpu", pol.cpu_bytes)):
            if budget is None or self.used[tier] + nbytes <= budget:
                return tier
        if pol.disk_dir is None:
            raise CacheError(
                f"KV cache is over its memory budgets (device {pol.device_bytes} B, cpu {pol.cpu_bytes} B) "
                "and OffloadPolicy.disk_dir is not set; give a folder for the disk tier or raise a budget"
            )
        return "disk"

    def check_room(self, nbytes: int) -> None:
        """Refuse, before any work, ``nbytes`` more of sealed KV that would not fit: the part of
        it beyond the device and CPU budgets goes to the disk tier, whose folder must have that
        much free (``shutil.disk_usage``). Callers that know the total of a prefill (tokens ×
        bytes per token of the global layers) call this before it starts, so that a long
        prefill does not fail at its end. Raises ``CacheError`` naming the folder, the bytes
        needed and the bytes free."""
        pol, left = self.policy, nbytes
        for tier, budget in (("device", pol.device_bytes), ("cpu", pol.cpu_bytes)):
            left = 0 if budget is None else max(0, left - max(0, budget - self.used[tier]))
        if left and pol.disk_dir is None:
            self.tier_for(nbytes)  # raises: no disk tier
        if left:
            check_disk(Path(pol.disk_dir), left)

    def place(self, kv: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Store kv (2, B, H, n, D) on the next tier with room; returns (stored copy, tier)."""
        nbytes = kv.numel() * kv.element_size()
        tier = self.tier_for(nbytes)
        if tier == "device":
            out = kv.to(self.device, copy=True)
        elif tier == "cpu":
            out = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=torch.cuda.is_available())
            out.copy_(kv)
        else:
            out = disk_tensor(Path(self.policy.disk_dir), kv)
        self.used[tier] += nbytes
        return out, tier


def check_disk(folder: Path, nbytes: int) -> None:
    """Raise ``CacheError`` unless ``folder`` (or its nearest existing parent) has ``nbytes`` free."""
    from .storage import existing  # storage imports CacheError from here

    try:
        free = shutil.disk_usage(existing(folder)).free
    except OSError as e:
        raise CacheError(f"{folder}: cannot use as the KV disk tier ({e.strerror or e})") from None
    if free < nbytes:
        raise CacheError(f"{folder}: not enough free space for the KV disk tier: needs {nbytes} B, {free} B free")


def disk_tensor(folder: Path, t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in a new memory-mapped file in ``folder``; the file is deleted with the
    tensor's storage, or at interpreter exit (a killed process leaves its ``kv-*.bin`` files).

    The file's blocks are allocated before it is mapped (``posix_fallocate``): a full disk is
    then a ``CacheError`` naming the folder and the bytes, where writing through the mapping
    of a sparse file would kill the process with SIGBUS."""
    nbytes = t.numel() * t.element_size()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"{folder}: cannot use as the KV disk tier ({e.strerror or e})") from None
    check_disk(folder, nbytes)
    path = folder / f"kv-{uuid.uuid4().hex}.bin"
    try:
        with open(path, "wb") as f:
            f.truncate(nbytes)
            if nbytes and hasattr(os, "posix_fallocate"):  # not on macOS: sparse there
                try:
                    os.posix_fallocate(f.fileno(), 0, nbytes)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without it: sparse
                        raise
    except OSError as e:
        _unlink(str(path))
        raise CacheError(f"{folder}: cannot write a {nbytes} B KV segment file ({e.strerror or e})") from None
    out = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
    out.copy_(t)
    weakref.finalize(out.untyped_storage(), _unlink, str(path))
    return out


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# Off-device KV bytes staged on the GPU per group. A group is used while the next one is
# copied, so about two groups sit on the device at once beside the resident KV.
_STAGE_BYTES = 256 << 20


def stage(segments: Sequence[Segment], device: torch.device) -> Iterator[list[Segment]]:
    """Yield the segments, in lists, ready to use on ``device``: those already there as one
    list, then the others in groups of about ``_STAGE_BYTES``.

    On CUDA each group is copied on a side stream while the caller works on the previous one
    (double buffering), so host-to-device transfer overlaps compute. Grouping keeps the host's
    work per segment small: one copy each, and one kernel launch and merge per group rather
    than per segment. Elsewhere segments are used where they are (CPU memory or memory-mapped
    files), as one list. Order within the result is not the input order; callers merge by LSE
    or sum, which are order-independent."""
    here = [seg for seg in segments if seg[0].device == device]
    away = [seg for seg in segments if seg[0].device != device]
    if device.type != "cuda":
        here, away = here + away, []
    if here:
        yield here
    if not away:
        return
    groups, size = [[]], 0
    for seg in away:
        nbytes = 2 * seg[0].numel() * seg[0].element_size()
        if groups[-1] and size + nbytes > _STAGE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(seg)
        size += nbytes
    copy_stream = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def issue(group: list[Segment]) -> tuple[list[Segment], torch.cuda.Event]:
        with torch.cuda.stream(copy_stream):
            moved = [(*kv_to(k, v, device), k_start) for k, v, k_start in group]
            done = torch.cuda.Event()
            done.record(copy_stream)
        return moved, done

    pending = issue(groups[0])
    for i in range(len(groups)):
        moved, done = pending
        if i + 1 < len(groups):
            pending = issue(groups[i + 1])
        main.wait_event(done)
        for k, v, _ in moved:  # allocated on the copy stream, used (and freed) on main
            k.record_stream(main)
            v.record_stream(main)
        yield moved


def kv_to(k: torch.Tensor, v: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v (B, H, n, D) copied to ``device`` without blocking the host; in one transfer
    when they are the two halves of one block, as a sealed segment's (2, B, H, n, D) storage is."""
    if (
        k.is_contiguous()
        and v.is_contiguous()
        and k.shape == v.shape
        and v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        and v.storage_offset() == k.storage_offset() + k.numel()
    ):
        kv = torch.as_strided(k, (2, *k.shape), (k.numel(), *k.stride()), k.storage_offset())
        kv = kv.to(device, non_blocking=True)
        return kv[0], kv[1]
    return k.to(device, non_blocking=True), v.to(device, non_blocking=True)
