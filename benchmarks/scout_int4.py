"""Scout's text model with random int4 weights on one device: memory, prefill, decode (issue 31, target 1).

The model is built on the meta device, ``longctx.quant.prepare`` swaps the routed experts and
shared experts for empty int4 modules, and only then are tensors allocated, on the target device
(``to_empty``) and filled with random values in place: no bf16 copy of the experts ever exists
(Scout's are 193 GB in bf16, 50 GB in int4). Weights are random, so only speed and memory mean
anything: int4 words are uniform random bits (values -8..7), scales make each weight's spread
about 0.02, other weights are N(0, 0.02), norms ones.

Phases, in order (each figure is kept as soon as it is measured; a failure, an out-of-memory
error or a SIGTERM from ``timeout`` stops the run, and what was measured is still printed and
recorded, with the error):

1. build: stored bytes per part (checked against ``memory.memory_plan``), device memory after it;
2. check: the MoE matmul in the model dtype against dequantize + matmul in fp32, layer 0's
   experts (1, 0, 5 and 33 tokens per expert: the decode and prefill tile sizes);
3. moe: one token through every MoE layer's routed expert and shared expert (what decode reads
   of them), median of ``--moe-reps`` passes, and on CUDA the device time of the grouped-matmul
   kernel alone (profiler): the share of the bandwidth bound with and without the host's work;
4. prefill: a warm-up (compiles kernels), then each of ``--lengths`` from an empty cache in
   chunks of ``--chunk`` (``longctx.generate.prefill``): tokens/s;
5. decode: after the longest prefill plus ``--decode-extra`` tokens (default half an attention
   chunk, so chunked layers hold what they hold on average, not the empty chunk that starts at
   a multiple of 8192), ``--decode-steps`` greedy steps: median ms/token.

Derived: peak device memory (``torch.cuda.max_memory_allocated``); tokens of KV that fit on a
``--card-gb`` card: the context held at the peak plus (card - peak) / (global-layer KV bytes
per token); the decode step's share of the HBM bound: weight bytes read per token (one routed
expert per MoE layer, everything else but the embedding, one embedding row) / (ms/token x
bandwidth), with ``--bandwidth`` (B/s) or, by default, the datasheet figure of the card found
(H100 SXM 3.35e12, H200 4.8e12; 3.35e12 if unknown), and beside it the device-to-device copy
rate measured in the same run. ``--profile`` prints the top operators of two decode steps and
records their device-busy and wall time. Targets (issue 31): peak <= 72 GB, decode >= 0.5 of the bound.

    python benchmarks/scout_int4.py --record            # on the GPU: Scout, 8K and 32K
    python benchmarks/scout_int4.py --device cpu --preset tiny --group-size 32 --lengths 48,96 \\
        --chunk 32 --decode-extra 8 --decode-steps 2 --moe-reps 1   # seconds, on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shlex
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import gpu_record
from longctx import memory, quant
from longctx.config import ModelConfig
from longctx.generate import prefill
from longctx.kernels.quant import dequantize, moe_matmul
from longctx.model import Model
from longctx.moe import MoE
from longctx.offload import OffloadPolicy
from records import write_record

GB = 10**9
PEAK_TARGET = 72 * GB
FRACTION_TARGET = 0.5
KERNEL_TOLERANCE = 1e-2  # relative error of the model-dtype MoE matmul against the fp32 reference
# Datasheet HBM bandwidths (B/s) by a substring of torch.cuda.get_device_name, first match wins.
BANDWIDTHS = (("H100 PCIe", 2.0e12), ("H200", 4.8e12), ("H100", 3.35e12))
DEFAULT_BANDWIDTH = 3.35e12
WEIGHT_STD = 0.02
PARTS = ("experts", "shared", "attention", "router", "norms", "embeddings/head")


class Stopped(Exception):
    """SIGTERM arrived (``timeout`` ran out): stop measuring, record what was measured."""


def _on_sigterm(signum, frame):
    raise Stopped("SIGTERM (time limit)")


def tokens(text: str) -> int:
    """``"8k"`` -> 8192, ``"1m"`` -> 1048576, ``"300"`` -> 300; ValueError naming the text otherwise."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", text.strip())
    if not m:
        raise ValueError(f"token count must be a number with an optional k or m suffix, got {text!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20}[m.group(2).lower()]


def config(preset: str, layers: int | None) -> ModelConfig:
    """``ModelConfig.preset(preset)``, with ``layers`` layers if given (layer kinds re-derived)."""
    cfg = ModelConfig.preset(preset)
    if layers is None:
        return cfg
    return ModelConfig(
        **{**dataclasses.asdict(cfg), "num_hidden_layers": layers, "moe_layers": None, "no_rope_layers": []}
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- build


@torch.no_grad()
def build(
    cfg: ModelConfig, scheme: str, group_size: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> Model:
    """A ``scheme``-quantized ``Model(cfg)`` with random weights, allocated on ``device`` only
    after quantization (no full-precision expert tensor is ever made)."""
    with torch.device("meta"):
        model = Model(cfg)
    quant.prepare(model, scheme, group_size)
    model = model.to(dtype)  # on meta: float parameters and the scale buffers take the model dtype
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    bits = quant.scheme_bits(scheme)
    # Random bits: int4 words hold 8 values uniform in -8..7 (std 4.6); int8 values -127..127 (std 73).
    q_std = 4.61 if bits == 4 else 73.6
    for m in quant.quantized_modules(model).values():
        for buf in m.buffers(recurse=False):
            if buf.dtype == torch.int32:
                buf.random_(-(2**31), 2**31, generator=g)
            elif buf.dtype == torch.int8:
                buf.random_(-127, 128, generator=g)
            else:  # scales: about WEIGHT_STD per weight, varied per group
                buf.uniform_(0.5 * WEIGHT_STD / q_std, 1.5 * WEIGHT_STD / q_std, generator=g)
    for name, p in model.named_parameters():  # the unquantized rest (quantized modules hold buffers)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, WEIGHT_STD, generator=g)
    return model.eval()


def part_of(name: str) -> str:
    """Which ``memory.memory_plan`` part a state-dict entry belongs to."""
    if ".feed_forward.experts." in name:
        return "experts"
    if ".feed_forward.router." in name:
        return "router"
    if ".feed_forward." in name:
        return "shared"
    if ".self_attn." in name:
        return "attention"
    if name.endswith("norm.weight"):
        return "norms"
    return "embeddings/head"


def weight_bytes(model: Model) -> dict[str, int]:
    """Stored bytes per part (tied tensors counted once)."""
    out, seen = dict.fromkeys(PARTS, 0), set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[part_of(name)] += t.numel() * t.element_size()
    return out


def decode_read_bytes(model: Model, parts: dict[str, int]) -> int:
    """Weight bytes one decode token reads: every weight once, except the routed experts (top-k
    of E per MoE layer) and the embedding (one row; all of it when tied to the head, which reads it)."""
    cfg = model.config
    routed = parts["experts"] * cfg.num_experts_per_tok / cfg.num_local_experts
    emb = model.embed_tokens.weight
    skipped_embedding = 0 if cfg.tie_word_embeddings else (emb.numel() - emb.shape[1]) * emb.element_size()
    return int(sum(parts.values()) - parts["experts"] + routed - skipped_embedding)


# ----------------------------------------------------------------------------- measurements


@torch.no_grad()
def kernel_error(model: Model) -> float:
    """max over layer 0's gate_up and down matmuls of ||out - ref|| / ||ref||: out in the model
    dtype through the dispatcher's own path, ref dequantized in fp32."""
    layer = next(b.feed_forward for b in model.layers if isinstance(b.feed_forward, MoE))
    ex = layer.experts
    counts = [(1, 0, 5, 33)[e % 4] for e in range(ex.n)]
    dtype, device = model.dtype, model.device
    worst = 0.0
    g = torch.Generator(device=device).manual_seed(1)
    for part, K in (("gate_up", ex.d), ("down", ex.hidden)):
        w, s = getattr(ex, f"{part}_q"), getattr(ex, f"{part}_scale")
        x = torch.randn(sum(counts), K, generator=g, device=device, dtype=torch.float32).to(dtype)
        out = moe_matmul(x, w, s, counts=counts, impl=ex.impl).float()
        lo = 0
        for e, n in enumerate(counts):
            if n:
                ref = x[lo : lo + n].float() @ dequantize(w[e], s[e], K=K, dtype=torch.float32).T
                err = float((out[lo : lo + n] - ref).norm() / ref.norm())
                worst = max(worst, err if math.isfinite(err) else math.inf)  # NaN must not vanish in max
            lo += n
    return worst


@torch.no_grad()
def moe_pass_ms(model: Model, reps: int) -> tuple[float, float | None, int]:
    """One decode token through every MoE layer's routed expert (layer i routes to expert i mod E,
    so a pass does not re-read one expert from cache) and shared expert: (median ms of ``reps``
    passes, host work included; ms inside the grouped-matmul kernel alone, from the profiler, on
    CUDA only; weight bytes read)."""
    device = model.device
    x = torch.randn(1, model.config.hidden_size, device=device, dtype=torch.float32).to(model.dtype)
    moes = [b.feed_forward for b in model.layers if isinstance(b.feed_forward, MoE)]
    nbytes = 0
    for i, ff in enumerate(moes):
        e = i % ff.n_experts
        nbytes += sum(t[e].numel() * t[e].element_size() for t in ff.experts.buffers(recurse=False))
        shared = [*ff.shared_expert.parameters(), *ff.shared_expert.buffers()]
        nbytes += sum(t.numel() * t.element_size() for t in shared)

    def one_pass():
        for i, ff in enumerate(moes):
            counts = [0] * ff.n_experts
            counts[i % ff.n_experts] = 1
            ff.experts.grouped(x, counts)
            ff.shared_expert(x)

    one_pass()  # compiles
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        one_pass()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), kernel_ms(one_pass, device, "_moe_mm"), nbytes


def kernel_ms(fn, device: torch.device, name: str) -> float | None:
    """Device milliseconds spent in kernels whose name contains ``name`` during one ``fn()``
    (torch.profiler); None off CUDA. Host work between launches is what this leaves out."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    us = 0.0
    for evt in prof.key_averages():
        if name in evt.key:
            us += getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
    return us / 1e3 if us else None


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float | None:
    """Device-to-device copy rate (bytes read + written per second) of an ``nbytes`` buffer; None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        b.copy_(a)
    end.record()
    end.synchronize()
    rate = 2 * nbytes * reps / (start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return rate


def bandwidth_for(device: torch.device, given: float | None) -> tuple[float, str]:
    """(B/s, where it came from): ``--bandwidth``, else the datasheet figure of the card's name."""
    if given is not None:
        return given, "--bandwidth"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    for key, bw in BANDWIDTHS:
        if key in name:
            return bw, f"datasheet ({key})"
    return DEFAULT_BANDWIDTH, f"default (H100 SXM datasheet; {name} not known)"


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- the run


class Run:
    """The phases in order; ``fig`` holds every figure measured so far (what gets recorded)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        self.cfg = config(args.preset, args.layers)
        self.model: Model | None = None
        self.cache = self.logits = None
        self.peaks: list[tuple[str, int, int]] = []  # (phase, peak bytes, context held at its end)
        cfg = self.cfg
        self.fig: dict = {
            "config": {
                "preset": args.preset,
                "layers": cfg.num_hidden_layers,
                "hidden": cfg.hidden_size,
                "experts": cfg.num_local_experts,
                "top_k": cfg.num_experts_per_tok,
                "expert_width": cfg.intermediate_size,
                "vocab": cfg.vocab_size,
                "scheme": args.scheme,
                "group_size": args.group_size,
                "dtype": args.dtype,
                "chunk": args.chunk,
            }
        }

    def gen(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def phase_build(self) -> None:
        a, fig = self.args, self.fig
        fig["copy_bandwidth"] = copy_bandwidth(self.device)
        reset_peak(self.device)
        t0 = time.perf_counter()
        self.model = build(self.cfg, a.scheme, a.group_size, self.dtype, self.device, a.seed)
        sync(self.device)
        fig["build_s"] = time.perf_counter() - t0
        parts = weight_bytes(self.model)
        plan = memory.memory_plan(self.cfg, a.scheme, context=0, group_size=a.group_size, dtype=self.dtype)
        fig["weight_bytes"] = parts
        fig["weight_bytes_total"] = sum(parts.values())
        fig["plan_weight_bytes"] = plan.weight_bytes
        fig["decode_read_bytes"] = decode_read_bytes(self.model, parts)
        fig["kv_bytes_per_token"] = self.cfg.kv_bytes_per_token(self.dtype.itemsize)["global"]
        if self.device.type == "cuda":
            fig["device_total_bytes"] = torch.cuda.get_device_properties(self.device).total_memory
            fig["allocated_after_build"] = torch.cuda.memory_allocated(self.device)
            self.peaks.append(("build", peak_bytes(self.device), 0))

    def phase_check(self) -> None:
        self.fig["kernel_rel_error"] = kernel_error(self.model)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the check's fp32 expert copies are not part of the workload

    def phase_moe(self) -> None:
        ms, kms, nbytes = moe_pass_ms(self.model, self.args.moe_reps)
        self.fig["moe"] = {"ms": ms, "kernel_ms": kms, "bytes": nbytes, "layers": sum(self.cfg.is_moe)}

    def _prefill(self, n: int, seed: int, cache=None):
        cache = self.model.new_cache(offload=OffloadPolicy()) if cache is None else cache
        ids = torch.randint(0, self.cfg.vocab_size, (1, n), generator=self.gen(seed), device=self.device)
        reset_peak(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        logits = prefill(self.model, ids, cache, self.args.chunk, progress=False)
        sync(self.device)
        return time.perf_counter() - t0, cache, logits

    def phase_prefill(self) -> None:
        a, fig = self.args, self.fig
        warm = min(a.warmup_tokens, max(a.lengths))
        took, cache, _ = self._prefill(warm, seed=2)
        fig["warmup"] = {"tokens": warm, "s": took}
        del cache
        fig["prefill_tok_s"] = {}
        for i, n in enumerate(a.lengths):
            self.cache = self.logits = cache = logits = None  # the previous KV is freed before the next is built
            took, cache, logits = self._prefill(n, seed=3 + i)
            fig["prefill_tok_s"][str(n)] = n / took
            fig["logits_finite"] = bool(torch.isfinite(logits).all())
            self.peaks.append((f"prefill {n}", peak_bytes(self.device), cache.length))
            self.cache, self.logits = cache, logits

    def phase_decode(self) -> None:
        a, fig = self.args, self.fig
        cache = self.cache
        if a.decode_extra:
            _, cache, self.logits = self._prefill(a.decode_extra, seed=9, cache=cache)
            self.peaks.append(("prefill extra", peak_bytes(self.device), cache.length))
        fig["decode_context"] = cache.length
        reset_peak(self.device)
        tok = self.logits.argmax(-1, keepdim=True)  # (1, 1)
        times = []
        with torch.inference_mode():
            for step in range(a.warmup_steps + a.decode_steps):
                sync(self.device)
                t0 = time.perf_counter()
                tok = self.model(tok, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
                sync(self.device)
                if step >= a.warmup_steps:
                    times.append((time.perf_counter() - t0) * 1e3)
        fig["decode_ms"] = statistics.median(times)
        fig["decode_ms_all"] = times
        fig["kv_bytes_at_decode"] = cache.nbytes
        self.peaks.append(("decode", peak_bytes(self.device), cache.length))
        if a.profile:
            fig["decode_profile"] = profile_step(self.model, cache, tok)

    def run(self) -> None:
        for name in ("build", "check", "moe", "prefill", "decode"):
            self.phase = name
            print(f"--- {name}", flush=True)
            getattr(self, f"phase_{name}")()
        self.phase = "done"

    def derive(self) -> None:
        """Figures computed from the measured ones (whatever subset was measured)."""
        a, fig = self.args, self.fig
        bw, source = bandwidth_for(self.device, a.bandwidth)
        fig["bandwidth"], fig["bandwidth_source"] = bw, source
        if "kernel_rel_error" in fig:  # bf16 operands: 1e-3 to 1e-2 is rounding; NaN fails
            fig["kernel_ok"] = fig["kernel_rel_error"] <= KERNEL_TOLERANCE
        if self.peaks and self.peaks[0][1] is not None:
            phase, peak, held = max(self.peaks, key=lambda p: p[1])
            card = int(a.card_gb * GB)
            fig["peak_bytes"], fig["peak_phase"] = peak, phase
            fig["card_bytes"] = card
            fig["kv_tokens_fit"] = held + max(0, card - peak) // fig["kv_bytes_per_token"] if peak <= card else 0
            fig["peak_target_met"] = peak <= PEAK_TARGET
        if "moe" in fig:
            moe = fig["moe"]
            moe["fraction"] = moe["bytes"] / (moe["ms"] / 1e3 * bw)
            if moe["kernel_ms"]:
                moe["kernel_fraction"] = moe["bytes"] / (moe["kernel_ms"] / 1e3 * bw)
            if fig.get("copy_bandwidth"):
                moe["fraction_of_copy"] = moe["bytes"] / (moe["ms"] / 1e3 * fig["copy_bandwidth"])
        if "decode_ms" in fig:
            s = fig["decode_ms"] / 1e3
            fig["hbm_fraction"] = fig["decode_read_bytes"] / (s * bw)
            fig["hbm_fraction_with_kv"] = (fig["decode_read_bytes"] + fig["kv_bytes_at_decode"]) / (s * bw)
            if fig.get("copy_bandwidth"):
                fig["hbm_fraction_of_copy"] = fig["decode_read_bytes"] / (s * fig["copy_bandwidth"])
            fig["decode_target_met"] = fig["hbm_fraction"] >= FRACTION_TARGET


def profile_step(model: Model, cache, tok: torch.Tensor, steps: int = 2) -> dict:
    """Print the top operators of ``steps`` decode steps by device time and by host time; return
    {"wall_ms", "device_ms"} per step (device_ms: summed kernel time, None off CUDA). Device time
    far under wall time says the step waits on the host (launches, syncs, copies), not on memory."""
    from torch.profiler import ProfilerActivity, profile

    cuda = model.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode(), profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        sync(model.device)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    table = prof.key_averages()
    if cuda:
        print(table.table(sort_by="device_time_total", row_limit=20))
    print(table.table(sort_by="cpu_time_total", row_limit=20))
    device = None
    if cuda:
        device = (
            sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0) for e in table)
            / 1e3
            / steps
        )
    return {"wall_ms": wall, "device_ms": device}


# ----------------------------------------------------------------------------- report


def _gib(n) -> str:
    """Bytes as GiB and GB (MiB / KiB for small models' parts)."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB ({n / GB:.2f} GB)"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def report(fig: dict) -> list[str]:
    """The figures as markdown lines (printed and recorded)."""
    out = []
    if "weight_bytes" in fig:
        out += [
            "| part | stored bytes |",
            "|---|---|",
            *(f"| {k} | {_gib(v)} |" for k, v in fig["weight_bytes"].items()),
            f"| **total** (memory plan: {_gib(fig['plan_weight_bytes'])}) | {_gib(fig['weight_bytes_total'])} |",
            "",
        ]
    rows = []
    if "peak_bytes" in fig:
        ok = "met" if fig["peak_target_met"] else "NOT met"
        rows.append(
            ("peak device memory", f"{_gib(fig['peak_bytes'])} in phase {fig['peak_phase']}; target <= 72 GB {ok}")
        )
        rows.append(
            (
                f"KV tokens that fit on a {fig['card_bytes'] / GB:.0f} GB card",
                f"{fig['kv_tokens_fit']:,} ({fig['kv_bytes_per_token']:,} B per token in the global layers)",
            )
        )
    if "kernel_rel_error" in fig:
        ok = "ok" if fig["kernel_ok"] else "TOO LARGE"
        rows.append(
            (
                "MoE matmul vs fp32 dequantize + matmul (rel. error)",
                f"{fig['kernel_rel_error']:.2e} ({ok}, tolerance {KERNEL_TOLERANCE:g})",
            )
        )
    if fig.get("copy_bandwidth"):
        rows.append(("device copy rate (read + write)", f"{fig['copy_bandwidth'] / 1e12:.2f} TB/s"))
    bw = f"{fig['bandwidth'] / 1e12:.2f} TB/s, {fig['bandwidth_source']}" if "bandwidth" in fig else "-"
    if "moe" in fig:
        m = fig["moe"]
        rows.append(
            (
                "MoE: 1 token through routed + shared experts of every MoE layer",
                f"{m['ms']:.3f} ms for {_gib(m['bytes'])}: {m['fraction']:.2f} of the HBM bound ({bw})",
            )
        )
        if m.get("kernel_fraction"):
            rows.append(
                (
                    "MoE kernel alone (device time of the grouped-matmul launches)",
                    f"{m['kernel_ms']:.3f} ms: {m['kernel_fraction']:.2f} of the HBM bound",
                )
            )
    for n, r in fig.get("prefill_tok_s", {}).items():
        rows.append((f"prefill {int(n):,} tokens", f"{r:,.0f} tokens/s"))
    if "decode_ms" in fig:
        ok = "met" if fig["decode_target_met"] else "NOT met"
        rows.append((f"decode at {fig['decode_context']:,} tokens", f"{fig['decode_ms']:.2f} ms/token"))
        rows.append(
            (
                "decode share of the HBM bound (weights read per token)",
                f"{fig['hbm_fraction']:.2f} ({_gib(fig['decode_read_bytes'])} per token, {bw}); "
                f"target >= {FRACTION_TARGET} {ok}; with KV ({_gib(fig['kv_bytes_at_decode'])}): "
                f"{fig['hbm_fraction_with_kv']:.2f}",
            )
        )
    prof = fig.get("decode_profile") or {}
    if prof.get("device_ms") is not None:
        rows.append(
            (
                "decode step under the profiler: device busy / wall",
                f"{prof['device_ms']:.2f} / {prof['wall_ms']:.2f} ms",
            )
        )
    if "error" in fig:
        rows.append(("stopped", fig["error"]))
        if fig.get("peak_at_error") is not None:
            rows.append(("peak device memory when stopped", _gib(fig["peak_at_error"])))
    return out + ["| quantity | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="scout", choices=["scout", "tiny"])
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--scheme", default="int4", choices=sorted(quant.SCHEMES))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--lengths", default="8k,32k", help="prefill lengths, comma-separated (k = 1024)")
    ap.add_argument("--chunk", type=tokens, default=8192, help="prefill chunk (tokens per forward)")
    ap.add_argument(
        "--warmup-tokens",
        type=tokens,
        default=17408,
        help="warm-up prefill (crosses a 16,384-token KV segment); at most the longest length",
    )
    ap.add_argument("--decode-extra", type=tokens, default=4096, help="tokens prefilled after the longest length")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--moe-reps", type=int, default=5)
    ap.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        help="HBM bytes/s for the bound (default: by card name: H100 SXM 3.35e12, H200 4.8e12)",
    )
    ap.add_argument("--card-gb", type=float, default=80.0, help="card size (1e9 bytes) for the KV that fits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="print the top operators of two decode steps")
    ap.add_argument("--record", action="store_true", help="write the markdown record and a gpu.jsonl line")
    ap.add_argument("--results", default=str(gpu_record.RESULTS), help="folder of the record and gpu.jsonl")
    args = ap.parse_args(argv)
    try:
        args.lengths = [tokens(x) for x in args.lengths.split(",")]
    except ValueError as e:
        ap.error(f"--lengths: {e}")
    if min(args.lengths) < 1 or args.chunk < 1 or args.decode_steps < 1 or args.moe_reps < 1:
        ap.error("--lengths, --chunk, --decode-steps and --moe-reps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _on_sigterm)
    run = Run(args)
    run.phase = "setup"
    status = 0
    t0 = time.perf_counter()
    try:
        run.run()
    except Exception as e:  # record what was measured, whatever stopped it (Stopped included)
        traceback.print_exc()
        run.fig["error"] = f"{run.phase}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        run.fig["peak_at_error"] = peak_bytes(run.device)  # an out-of-memory error's peak is the figure
        status = 1
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run.fig["wall_s"] = time.perf_counter() - t0
    run.derive()
    fig = run.fig
    body = report(fig)
    print("\n".join(body))
    print(
        "summary: "
        + json.dumps(
            {
                k: fig.get(k)
                for k in ("peak_bytes", "kv_tokens_fit", "prefill_tok_s", "decode_ms", "hbm_fraction", "error")
            }
        )
    )
    if args.record:
        cfg = run.cfg
        full = args.preset == "scout" and args.layers is None
        name = "scout_int4" if full else f"scout_int4_{args.preset}_l{cfg.num_hidden_layers}"
        device = gpu_record.device_name(run.device)
        command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
        facts = [
            f"model: `ModelConfig.preset({args.preset!r})`, {cfg.num_hidden_layers} layers, hidden "
            f"{cfg.hidden_size}, {cfg.num_local_experts} experts of width {cfg.intermediate_size} (top-"
            f"{cfg.num_experts_per_tok}) + shared expert; random {args.scheme} (group {args.group_size}) "
            f"routed and shared experts built on the device, the rest {args.dtype}",
            f"prefill in chunks of {args.chunk:,} tokens from an empty cache after a "
            f"{fig.get('warmup', {}).get('tokens', 0):,}-token warm-up; decode: median of {args.decode_steps} "
            f"greedy steps after {args.warmup_steps} warm-up steps",
            "bound: weight bytes read per decode token / bandwidth; the KV that fits: context at the peak + "
            "(card - peak) / global-layer KV bytes per token",
        ]
        path = write_record(
            args.results,
            f"{name}-{slug(device)}",
            "Scout int4 on one device",
            command,
            facts,
            body,
            device=str(run.device),
        )
        entry = gpu_record.append(name, fig, device=run.device, command=command, results=args.results)
        print(f"recorded {path} and a line in {Path(args.results) / gpu_record.JSONL} ({entry['date']})")
    return status


if __name__ == "__main__":
    sys.exit(main())
