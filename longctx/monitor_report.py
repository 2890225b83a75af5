"""What a ``Monitor`` reports: expert load per MoE layer, each forward's time by part, phase
totals and memory per tier, as plain dataclasses (``to_dict``, ``summary``, ``to_prometheus``,
``_repr_html_``, ``plot``)."""

from __future__ import annotations

import dataclasses
import html
import math
from dataclasses import dataclass, field

from .notebook import html_table

PHASES = ("prefill", "decode")


class RoutingCollapse(UserWarning):
    """A MoE layer sent more than the monitor's ``collapse_share`` of its tokens to one expert."""


@dataclass
class ExpertLoad:
    """Routing of one MoE layer over the monitored run.

    ``counts[e]``: tokens routed to expert e (each token counts once for each of its top_k
    experts, so ``sum(counts) == tokens * top_k``). The balance figures are None when the
    layer routed no token:

    * ``max_over_mean``: busiest expert's count / mean count (1 when balanced, E at worst);
    * ``entropy``: Shannon entropy (nats) of the load shares counts / sum(counts);
      ``entropy_normalised`` = entropy / ln E (1 when balanced, 0 when one expert takes all);
    * ``busiest_share``: fraction of the layer's *tokens* routed to the busiest expert
      (top_k / E when balanced, 1 when every token goes there);
    * ``cv``: coefficient of variation of the counts (population std / mean; 0 when balanced).
    """

    layer: int
    top_k: int
    counts: list[int]
    tokens: int
    max_over_mean: float | None
    entropy: float | None
    entropy_normalised: float | None
    busiest: int | None
    busiest_share: float | None
    cv: float | None

    @classmethod
    def of(cls, layer: int, top_k: int, counts: list[int]) -> ExpertLoad:
        total = sum(counts)
        if total == 0:
            return cls(layer, top_k, counts, 0, None, None, None, None, None, None)
        E, mean = len(counts), total / len(counts)
        shares = [c / total for c in counts]
        entropy = sum(p * math.log(1 / p) for p in shares if p > 0)
        busiest = max(range(E), key=counts.__getitem__)
        std = math.sqrt(sum((c - mean) ** 2 for c in counts) / E)
        tokens = total // top_k
        return cls(
            layer,
            top_k,
            counts,
            tokens,
            counts[busiest] / mean,
            entropy,
            entropy / math.log(E) if E > 1 else 1.0,
            busiest,
            counts[busiest] / tokens,
            std / mean,
        )


@dataclass
class Step:
    """One model forward: a prefill chunk (``tokens`` > 1) or a decode step (``tokens`` == 1).

    tokens: new positions per row; batch: rows; position: context length before the forward
    (0 without a cache); seconds: its wall time; parts: seconds per part ("attention.chunked",
    "attention.global", "kv_staging", "moe", "mlp", "other"), disjoint; kv_bytes: bytes per
    tier ("device", "cpu", "disk") of its cache after it (all 0 without a cache);
    device_bytes: CUDA memory allocated after it (None on CPU); peak_host_rss_bytes: the
    process's peak resident set so far (``getrusage``: one cheap system call)."""

    phase: str
    tokens: int
    batch: int
    position: int
    seconds: float
    parts: dict[str, float]
    kv_bytes: dict[str, int]
    device_bytes: int | None
    peak_host_rss_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def unaccounted(self) -> float:
        """Seconds of the forward that no part covers (may be slightly negative: clock noise)."""
        return self.seconds - sum(self.parts.values())


@dataclass
class Phase:
    """Totals of one phase ("prefill" or "decode"): forwards, tokens (rows × positions),
    seconds, tokens per second, seconds per part, and seconds no part covers."""

    phase: str
    forwards: int
    tokens: int
    seconds: float
    tokens_per_s: float
    parts: dict[str, float]
    unaccounted: float


@dataclass
class Report:
    """What a ``Monitor`` saw: see ``ExpertLoad``, ``Step`` and ``Phase``.

    kv_bytes: bytes per tier after the last forward; peak_kv_bytes: the largest total over the
    run; peak_device_bytes: the CUDA allocator's peak since the monitor was entered (None on
    CPU); peak_host_rss_bytes: the process's peak resident set (``getrusage``: since the
    process started, which the OS does not let us reset); collapsed: the MoE layers that
    routed at least ``min_tokens`` tokens and sent more than ``threshold(layer)`` of them to
    one expert (``collapse_share``, None for the default rule: see ``Monitor``)."""

    device: str
    experts: list[ExpertLoad]
    steps: list[Step]
    phases: dict[str, Phase]
    kv_bytes: dict[str, int]
    peak_kv_bytes: int
    peak_device_bytes: int | None
    peak_host_rss_bytes: int
    collapse_share: float | None
    min_tokens: int
    collapsed: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.collapsed = [
            e.layer for e in self.experts if e.tokens >= max(self.min_tokens, 1) and e.busiest_share > self.threshold(e)
        ]

    def threshold(self, load: ExpertLoad) -> float:
        """The busiest-share limit for ``load``'s layer: ``collapse_share``, or by default
        halfway between the balanced share top_k / E and 1 (see ``Monitor``)."""
        if self.collapse_share is not None:
            return self.collapse_share
        return (1 + load.top_k / len(load.counts)) / 2

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (steps with their ``tokens_per_s`` and ``unaccounted``)."""
        d = dataclasses.asdict(self)
        for s, step in zip(d["steps"], self.steps):
            s["tokens_per_s"], s["unaccounted"] = step.tokens_per_s, step.unaccounted
        return d

    def summary(self) -> str:
        """A few lines of text: per phase tokens/s and the split, per MoE layer the balance."""
        lines = []
        for p in self.phases.values():
            split = ", ".join(f"{k} {v / p.seconds:.0%}" for k, v in p.parts.items()) if p.seconds else ""
            lines.append(
                f"{p.phase}: {p.forwards} forwards, {p.tokens} tokens, {p.seconds:.3f} s, "
                f"{p.tokens_per_s:.1f} tok/s ({split})"
            )
        for e in self.experts:
            if e.tokens:
                flag = "  COLLAPSED" if e.layer in self.collapsed else ""
                lines.append(
                    f"layer {e.layer}: {e.tokens} tokens, busiest expert {e.busiest} "
                    f"{e.busiest_share:.0%}, max/mean {e.max_over_mean:.2f}, "
                    f"entropy {e.entropy_normalised:.2f} of max, cv {e.cv:.2f}{flag}"
                )
        kv = ", ".join(f"{t} {b / 2**20:.1f} MiB" for t, b in self.kv_bytes.items())
        dev = "" if self.peak_device_bytes is None else f", peak device {self.peak_device_bytes / 2**20:.1f} MiB"
        lines.append(f"KV {kv}{dev}, peak host RSS {self.peak_host_rss_bytes / 2**20:.1f} MiB")
        return "\n".join(lines)

    def to_prometheus(self, prefix: str = "longctx") -> str:
        """The counters and gauges in Prometheus' text exposition format (no server needed):
        expert tokens per layer, tokens, forwards and seconds per phase and part, KV bytes per
        tier, peak memory."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
            out.extend([f"# HELP {prefix}_{name} {help_}", f"# TYPE {prefix}_{name} {kind}"])
            for labels, value in samples:
                lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
                out.append(f"{prefix}_{name}{{{lab}}} {value}" if lab else f"{prefix}_{name} {value}")

        metric(
            "expert_tokens_total",
            "counter",
            "Tokens routed to each expert of each MoE layer.",
            [({"layer": e.layer, "expert": i}, c) for e in self.experts for i, c in enumerate(e.counts)],
        )
        metric(
            "expert_busiest_share",
            "gauge",
            "Fraction of a MoE layer's tokens sent to its busiest expert.",
            [({"layer": e.layer}, e.busiest_share) for e in self.experts if e.tokens],
        )
        phases = self.phases.values()
        metric(
            "forwards_total", "counter", "Model forwards per phase.", [({"phase": p.phase}, p.forwards) for p in phases]
        )
        metric(
            "tokens_total", "counter", "Tokens processed per phase.", [({"phase": p.phase}, p.tokens) for p in phases]
        )
        metric(
            "seconds_total",
            "counter",
            "Forward seconds per phase and part.",
            [
                ({"phase": p.phase, "part": k}, v)
                for p in phases
                for k, v in {**p.parts, "unaccounted": p.unaccounted}.items()
            ],
        )
        metric(
            "kv_bytes",
            "gauge",
            "KV cache bytes per tier after the last forward.",
            [({"tier": t}, b) for t, b in self.kv_bytes.items()],
        )
        if self.peak_device_bytes is not None:
            metric("peak_device_bytes", "gauge", "Peak CUDA memory allocated.", [({}, self.peak_device_bytes)])
        metric("peak_host_rss_bytes", "gauge", "Peak resident set of the process.", [({}, self.peak_host_rss_bytes)])
        return "\n".join(out) + "\n"

    def _repr_html_(self) -> str:
        phases = html_table(
            ("phase", "forwards", "tokens", "seconds", "tok/s", "split"),
            [
                (
                    p.phase,
                    p.forwards,
                    p.tokens,
                    f"{p.seconds:.3f}",
                    f"{p.tokens_per_s:.1f}",
                    ", ".join(f"{k} {v / p.seconds:.0%}" for k, v in p.parts.items()) if p.seconds else "",
                )
                for p in self.phases.values()
            ],
        )
        experts = html_table(
            ("layer", "tokens", "busiest", "share", "max/mean", "entropy / max", "cv", "counts"),
            [
                (
                    e.layer,
                    e.tokens,
                    e.busiest,
                    f"{e.busiest_share:.1%}" + (" collapsed" if e.layer in self.collapsed else ""),
                    f"{e.max_over_mean:.2f}",
                    f"{e.entropy_normalised:.2f}",
                    f"{e.cv:.2f}",
                    " ".join(map(str, e.counts)),
                )
                for e in self.experts
                if e.tokens
            ],
        )
        memory = html_table(("KV tier", "MiB"), [(t, f"{b / 2**20:.1f}") for t, b in self.kv_bytes.items()])
        peaks = f"peak host RSS {self.peak_host_rss_bytes / 2**20:.1f} MiB"
        if self.peak_device_bytes is not None:
            peaks += f", peak device {self.peak_device_bytes / 2**20:.1f} MiB"
        return f"<p>Monitor report ({html.escape(self.device)})</p>{phases}{experts}{memory}<p>{peaks}</p>"

    def plot(self, path=None):
        """One figure of three panels: expert load (share of each layer's tokens, layers ×
        experts), tokens/s against context position (prefill chunks and decode steps), KV MiB
        per tier against cumulative forward seconds. Saved to ``path`` if given. Returns the
        ``matplotlib.figure.Figure`` (made without pyplot; the backend is left alone).
        ImportError when matplotlib is missing."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("Report.plot needs matplotlib: pip install 'longctx[plot]'") from e
        rep = self
        fig = Figure(figsize=(15, 4.2), layout="constrained")
        heat, speed, memory = fig.subplots(1, 3)

        shares = [[c / e.tokens if e.tokens else 0.0 for c in e.counts] for e in rep.experts]
        if shares:
            im = heat.imshow(shares, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
            heat.set_yticks(range(len(rep.experts)), [str(e.layer) for e in rep.experts])
            heat.set_xticks(range(len(shares[0])))
            fig.colorbar(im, ax=heat, label="share of the layer's tokens")
        heat.set(title="expert load", xlabel="expert", ylabel="MoE layer")

        for phase, marker in (("prefill", "o-"), ("decode", ".")):
            mine = [s for s in rep.steps if s.phase == phase]
            if mine:
                speed.plot([s.position for s in mine], [s.tokens_per_s for s in mine], marker, label=phase, ms=3)
        speed.set(title="throughput", xlabel="context position (tokens)", ylabel="tokens / s")
        if rep.steps:
            speed.set_yscale("log")  # a prefill chunk runs tens of times more tokens/s than a decode step
            speed.legend()

        clock, t = [], 0.0
        for s in rep.steps:
            t += s.seconds
            clock.append(t)
        for tier in ("device", "cpu", "disk"):
            if any(s.kv_bytes.get(tier) for s in rep.steps):
                memory.plot(clock, [s.kv_bytes.get(tier, 0) / 2**20 for s in rep.steps], label=tier)
        memory.set(title="KV cache per tier", xlabel="forward seconds (cumulative)", ylabel="MiB")
        memory.set_ylim(bottom=0)
        if memory.lines:
            memory.legend()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig
