"""Monitoring a run: expert load per MoE layer, time per forward split by part, memory per tier.

    with longctx.Monitor(model) as mon:
        answer = session.ask("...")          # any prefill, generate, Session.ask, niah.run
    report = mon.report()                    # a plain dataclass; report.to_dict() is JSON-ready
    mon.plot("run.png")                      # needs the ``plot`` extra (matplotlib)

How: PyTorch module hooks, installed on entry and removed on exit (also when the block raises),
so the model code stays as it is and the outputs are bit-identical with or without a monitor.

* **experts**: a forward hook on each MoE layer's ``router`` (an ``nn.Linear`` whose output
  are the routing logits) takes their top-k exactly as ``MoE.route`` does and adds the
  expert ids to a counter that lives on the model's device: nothing is read back to the host
  until ``report()``.
* **timings**: a pre/post hook pair on the model's forward marks each call as a prefill chunk
  (T > 1) or a decode step (T == 1) at its context position (``cache.length`` before it);
  pairs on each block's attention (by layer kind), feed-forward (MoE or dense MLP) and the
  remaining modules (embedding, norms, head: "other") time the parts. KV staging and copies
  ("kv_staging": sealed segments copied to their tier by ``Placer.place``, and on CUDA
  lower-tier segments streamed up by ``offload.stage``, which on other devices copies
  nothing) are timed by wrappers that replace the ``Placer.place`` method and the ``stage``
  name in ``longctx.attention`` and ``longctx.stats`` while the monitor is active, and are
  restored on exit (these are functions, not modules, so they have no hooks). Both run
  inside attention, so their time is taken out of the attention part: the parts are
  disjoint, and what no part covers (residual additions, RoPE angles, the cache's
  bookkeeping, the hooks' own cost) is the forward's ``unaccounted`` time. On the CPU the
  marks are ``time.perf_counter()``; on CUDA they are ``torch.cuda.Event`` pairs recorded
  on the current stream and turned into seconds only when they have completed (polled
  without waiting, or at ``report()``), so monitoring adds no host-device synchronisation
  per token; there "kv_staging" is the time the compute stream spends on staging, i.e.
  waiting for copies that compute did not hide.
* **memory**: after each forward, the KV bytes per tier of the cache that forward was given
  (``KVCache.tier_bytes``), the device memory allocated (CUDA) and the process's peak
  resident set so far; at ``report()`` the device's peak allocation since entry and the
  process's peak RSS.

A ``RoutingCollapse`` warning is issued on a clean exit when a MoE layer that routed at least
``min_tokens`` tokens sent more than a threshold share of them to one expert (``Monitor``).
"""

from __future__ import annotations

import resource
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from . import attention as _attention_module
from . import stats as _stats_module
from .moe import MLP, MoE
from .monitor_report import PHASES, ExpertLoad, Phase, Report, RoutingCollapse, Step
from .offload import Placer


@dataclass
class _Forward:
    """A model forward in flight or waiting for its CUDA events: marks are floats (CPU) or
    events (CUDA); intervals (part, start mark, end mark)."""

    phase: str
    tokens: int
    batch: int
    position: int
    cache: object
    start: object
    end: object = None
    intervals: list = field(default_factory=list)
    kv_bytes: dict = field(default_factory=dict)
    device_bytes: int | None = None
    peak_host_rss_bytes: int = 0


class Monitor:
    """Context manager that records expert load, timings and memory of ``model``'s forwards.

    collapse_share: the busiest expert's share of a layer's tokens above which the layer counts
    as collapsed. By default (None) it is halfway between the share every expert gets when
    routing is balanced (top_k / E) and 1 (all tokens to one expert): 0.53 for Scout's top-1
    over 16 experts, where that is 8.5 times an expert's fair share and leaves the other
    fifteen less than half of the work between them, far beyond the unevenness of a working
    router; the midpoint keeps the test meaningful for few experts or top_k > 1, where a fixed
    0.5 would flag a balanced layer (top-2 over 4 experts gives every expert 0.5). min_tokens:
    layers that routed fewer tokens are not judged (a handful of decode tokens says nothing).

    Each entry starts a new record; ``report()`` and ``plot()`` read the latest one (inside the
    block or after it).
    """

    def __init__(self, model: nn.Module, *, collapse_share: float | None = None, min_tokens: int = 256):
        if not (isinstance(model, nn.Module) and hasattr(model, "layers") and hasattr(model, "embed_tokens")):
            raise TypeError(f"Monitor needs a longctx Model, got {type(model).__name__}")
        if collapse_share is not None and (
            isinstance(collapse_share, bool)
            or not isinstance(collapse_share, (int, float))
            or not 0 < collapse_share <= 1
        ):
            raise ValueError(f"collapse_share must be None or a number in (0, 1], got {collapse_share!r}")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {min_tokens!r}")
        self.model, self.collapse_share, self.min_tokens = model, collapse_share, min_tokens
        self.moe_layers = [i for i, b in enumerate(model.layers) if isinstance(b.feed_forward, MoE)]
        self._handles: list = []
        self._patched: list[tuple[object, str, object]] = []
        self._active = False
        self._reset()

    # ---- recording ----------------------------------------------------------------------------
    def _reset(self) -> None:
        self.device = self.model.embed_tokens.weight.device
        self._cuda = self.device.type == "cuda"
        n_experts = max((self.model.layers[i].feed_forward.n_experts for i in self.moe_layers), default=0)
        self._counts = torch.zeros(len(self.moe_layers), n_experts, dtype=torch.long, device=self.device)
        self._fwd: _Forward | None = None
        self._waiting: deque[_Forward] = deque()
        self._steps: list[Step] = []
        self._attn_kind: str | None = None

    def __enter__(self) -> Monitor:
        if self._active:
            raise RuntimeError("this Monitor is already active; make a new one to nest monitors")
        self._reset()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._active = True
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._uninstall()
        if exc_type is None:
            rep = self.report()
            for e in rep.experts:
                if e.layer in rep.collapsed:
                    warnings.warn(
                        f"routing collapse in MoE layer {e.layer}: expert {e.busiest} received "
                        f"{e.busiest_share:.1%} of {e.tokens} tokens (threshold "
                        f"{rep.threshold(e):.1%})",
                        RoutingCollapse,
                        stacklevel=2,
                    )
        return False

    def _install(self) -> None:
        m = self.model
        self._handles.append(m.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(m.register_forward_hook(self._model_post, with_kwargs=True))
        self._time(m.embed_tokens, "other")
        self._time(m.norm, "other")
        self._time(m.lm_head, "other")
        for i, block in enumerate(m.layers):
            self._time(block.input_layernorm, "other")
            self._time(block.post_attention_layernorm, "other")
            kind = "chunked" if block.self_attn.chunked else "global"
            self._time(block.self_attn, f"attention.{kind}", kind)
            ff = block.feed_forward
            self._time(ff, "moe" if isinstance(ff, MoE) else "mlp" if isinstance(ff, MLP) else "other")
            if isinstance(ff, MoE):
                self._handles.append(ff.router.register_forward_hook(self._counter(self.moe_layers.index(i), ff.top_k)))
        patches = [(Placer, "place", self._timed_place)]
        if self._cuda:  # elsewhere ``stage`` copies nothing: segments are read where they are
            patches += [(_attention_module, "stage", self._timed_stage), (_stats_module, "stage", self._timed_stage)]
        for owner, name, wrap in patches:
            original = getattr(owner, name)
            self._patched.append((owner, name, original))
            setattr(owner, name, wrap(original))

    def _uninstall(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._patched:
            module, name, original = self._patched.pop()
            setattr(module, name, original)
        self._active = False

    def _mark(self):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _time(self, module: nn.Module, part: str, attention_kind: str | None = None) -> None:
        """Pre/post hooks that add (part, start, end) to the forward in flight."""
        starts = []

        def pre(mod, args):
            if self._fwd is not None:
                starts.append(self._mark())
                if attention_kind:
                    self._attn_kind = attention_kind

        def post(mod, args, out):
            if starts and self._fwd is not None:
                self._fwd.intervals.append((part, starts.pop(), self._mark()))
            if attention_kind:
                self._attn_kind = None

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def _timed_stage(self, original):
        """``offload.stage`` with each step of its iteration timed as KV staging (within the
        attention of the current layer kind, so that part's time excludes it)."""

        def stage(segments, device):
            groups = original(segments, device)
            while True:
                fwd = self._fwd
                start = None if fwd is None else self._mark()
                try:
                    group = next(groups)
                except StopIteration:
                    return
                finally:
                    if fwd is not None:
                        fwd.intervals.append((f"kv_staging.{self._attn_kind}", start, self._mark()))
                yield group

        return stage

    def _timed_place(self, original):
        """``Placer.place`` (a sealed segment copied to its tier) timed as KV staging too."""

        def place(placer, kv):
            fwd = self._fwd
            if fwd is None:
                return original(placer, kv)
            start = self._mark()
            try:
                return original(placer, kv)
            finally:
                fwd.intervals.append((f"kv_staging.{self._attn_kind}", start, self._mark()))

        return place

    def _counter(self, row: int, top_k: int):
        """Router forward hook: add this call's top-k expert ids to row ``row`` of the counts.
        index_add_ rather than bincount: CUDA's bincount reads the ids' maximum back to the host."""
        counts = self._counts[row]
        ones = torch.ones(0, dtype=torch.long, device=counts.device)  # kept: decode steps are small, calls many

        def hook(mod, args, logits):
            nonlocal ones
            ids = torch.topk(logits, top_k, dim=-1).indices.flatten()
            if ones.numel() < ids.numel():
                ones = torch.ones(ids.numel(), dtype=torch.long, device=counts.device)
            counts.index_add_(0, ids, ones[: ids.numel()])

        return hook

    def _model_pre(self, mod, args, kwargs) -> None:
        tokens = args[0] if args else kwargs.get("tokens")
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            self._fwd = None  # the model raises its own error
            return
        B, T = tokens.shape
        self._fwd = _Forward(
            "prefill" if T > 1 else "decode", T, B, 0 if cache is None else cache.length, cache, self._mark()
        )

    def _model_post(self, mod, args, kwargs, out) -> None:
        fwd, self._fwd = self._fwd, None
        if fwd is None:
            return
        fwd.end = self._mark()
        fwd.kv_bytes = _tier_bytes(fwd.cache)
        fwd.cache = None  # don't keep the cache alive
        fwd.device_bytes = torch.cuda.memory_allocated(self.device) if self._cuda else None
        fwd.peak_host_rss_bytes = _peak_rss()
        self._waiting.append(fwd)
        # Turn finished forwards into steps as we go (CUDA: without waiting), so that the
        # number of live events stays bounded over long runs.
        while self._waiting and (not self._cuda or self._waiting[0].end.query()):
            self._steps.append(self._resolve(self._waiting.popleft()))

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self._cuda else b - a

    def _resolve(self, fwd: _Forward) -> Step:
        parts: dict[str, float] = {}
        for part, a, b in fwd.intervals:
            parts[part] = parts.get(part, 0.0) + self._seconds(a, b)
        for kind in ("chunked", "global", "None"):
            staged = parts.pop(f"kv_staging.{kind}", None)
            if staged is not None:
                parts["kv_staging"] = parts.get("kv_staging", 0.0) + staged
                if f"attention.{kind}" in parts:
                    parts[f"attention.{kind}"] -= staged
        return Step(
            fwd.phase,
            fwd.tokens,
            fwd.batch,
            fwd.position,
            self._seconds(fwd.start, fwd.end),
            parts,
            fwd.kv_bytes,
            fwd.device_bytes,
            fwd.peak_host_rss_bytes,
        )

    # ---- reading ------------------------------------------------------------------------------
    def report(self) -> Report:
        """The figures recorded since entry (reads the expert counters and, on CUDA, waits for
        the recorded events: one synchronisation per report)."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
        while self._waiting:
            self._steps.append(self._resolve(self._waiting.popleft()))
        counts = self._counts.cpu().tolist()
        experts = [
            ExpertLoad.of(
                layer,
                self.model.layers[layer].feed_forward.top_k,
                row[: self.model.layers[layer].feed_forward.n_experts],
            )
            for layer, row in zip(self.moe_layers, counts)
        ]
        steps = list(self._steps)
        phases = {}
        for name in PHASES:
            mine = [s for s in steps if s.phase == name]
            if not mine:
                continue
            parts: dict[str, float] = {}
            for s in mine:
                for k, v in s.parts.items():
                    parts[k] = parts.get(k, 0.0) + v
            seconds, tokens = sum(s.seconds for s in mine), sum(s.batch * s.tokens for s in mine)
            phases[name] = Phase(
                name,
                len(mine),
                tokens,
                seconds,
                tokens / seconds if seconds > 0 else 0.0,
                parts,
                seconds - sum(parts.values()),
            )
        name = str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self._cuda else "")
        return Report(
            device=name,
            experts=experts,
            steps=steps,
            phases=phases,
            kv_bytes=steps[-1].kv_bytes if steps else _tier_bytes(None),
            peak_kv_bytes=max((sum(s.kv_bytes.values()) for s in steps), default=0),
            peak_device_bytes=torch.cuda.max_memory_allocated(self.device) if self._cuda else None,
            peak_host_rss_bytes=_peak_rss(),
            collapse_share=self.collapse_share,
            min_tokens=self.min_tokens,
        )

    def plot(self, path=None):
        """``self.report().plot(path)``: one figure of expert load, throughput and KV per tier."""
        return self.report().plot(path)


def _tier_bytes(cache) -> dict[str, int]:
    if cache is not None and hasattr(cache, "tier_bytes"):
        return dict(cache.tier_bytes())
    return {"device": 0, "cpu": 0, "disk": 0}


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


__all__ = ["PHASES", "ExpertLoad", "Monitor", "Phase", "Report", "RoutingCollapse", "Step"]
