"""Side-by-side evaluation of model variants: checkpoints, quantizations, decoding modes.

    from longctx import load_model
    from longctx.tasks.compare import compare
    cmp = compare({"fp32": load_model(), "int8": load_model(quantize="int8"),
                   "int4": load_model(quantize="int4", group_size=64)},
                  tasks=["single", "multi_key"], lengths=["1k", "4k"], samples=10)
    print(cmp.to_markdown()); cmp.plot("compare.png")

Every variant answers the same cells (``niah.run`` with one seed: prompts depend on the
tokenizer, the seed and the local attention chunk, so variants of one checkpoint get
identical prompts). The first variant is the reference: each other's difference in accuracy
is paired cell by cell, with an exact McNemar test (a two-sided sign test on the cells where
exactly one of the two is right) and a 95 % interval for the difference from the
Clopper-Pearson interval of that split, so the interval excludes 0 exactly when p < 0.05.
Beside accuracy: weight bytes, prefill tokens/s and decode ms/token, and next-token agreement
and mean KL divergence to the reference on a held-out text.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import niah, ruler
from .results import length_label, metric_value, wilson

if TYPE_CHECKING:
    from ..model import Model


def _binom_tail(k: int, n: int, p: float, upper: bool) -> float:
    """P(X <= k) (or P(X >= k) with ``upper``) for X ~ Binomial(n, p), in floating point via
    log-gamma so that n in the thousands neither overflows nor underflows."""
    if p <= 0.0:
        return 1.0 if (not upper or k <= 0) else 0.0
    if p >= 1.0:
        return 1.0 if (upper or k >= n) else 0.0
    ks = range(k, n + 1) if upper else range(0, k + 1)
    lp, lq = math.log(p), math.log1p(-p)
    return min(
        1.0,
        sum(
            math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
            for i in ks
        ),
    )


def mcnemar_exact(losses: int, gains: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference" the discordant cells split
    Binomial(losses + gains, 1/2); p = 2 × the smaller tail, at most 1 (1 when none differ)."""
    m = losses + gains
    return 1.0 if m == 0 else min(1.0, 2 * _binom_tail(min(losses, gains), m, 0.5, upper=False))


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (1 - alpha) interval for a binomial proportion with k successes in n, by bisection."""
    if n == 0:
        return 0.0, 1.0

    def solve(f) -> float:  # f decreasing in p from > 0 to < 0
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
        return (lo + hi) / 2

    low = 0.0 if k == 0 else solve(lambda p: alpha / 2 - _binom_tail(k, n, p, upper=True))
    high = 1.0 if k == n else solve(lambda p: _binom_tail(k, n, p, upper=False) - alpha / 2)
    return low, high


def paired_difference(ref: list[bool], other: list[bool]) -> dict:
    """Accuracy of ``other`` minus ``ref`` on the same cells (lists in cell order): the
    difference, a 95 % interval (given the discordant count m, gains ~ Binomial(m, π) and the
    difference is m/n·(2π - 1); π's Clopper-Pearson interval maps onto it), the exact
    McNemar p-value, and the counts. Identical answers give exactly 0, interval (0, 0), p 1."""
    if len(ref) != len(other):
        raise ValueError(f"paired_difference: {len(ref)} reference cells but {len(other)} others")
    n = len(ref)
    gains = sum(1 for a, b in zip(ref, other) if b and not a)
    losses = sum(1 for a, b in zip(ref, other) if a and not b)
    m = gains + losses
    lo, hi = clopper_pearson(gains, m) if m else (0.5, 0.5)
    scale = m / n if n else 0.0
    return {
        "difference": (gains - losses) / n if n else 0.0,
        "ci95": (scale * (2 * lo - 1), scale * (2 * hi - 1)),
        "p": mcnemar_exact(losses, gains),
        "gains": gains,
        "losses": losses,
        "n": n,
    }


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied weights once): what the weights
    take in memory, quantized tensors and their scales included."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


@torch.inference_mode()
def next_token_stats(variants: dict[str, Model], tokens: list[int], chunk: int = 256) -> dict[str, dict]:
    """Per variant, on one text (token ids), against the first variant: the share of positions
    whose greedy next token is the same ("agreement") and the mean KL(reference || variant)
    over positions in nats ("kl"). All variants advance chunk by chunk in lockstep with their
    own caches, so only (variants × chunk × vocab) logits are held at a time."""
    names = list(variants)
    caches = {k: m.new_cache() for k, m in variants.items()}
    agree = dict.fromkeys(names, 0)
    kl = dict.fromkeys(names, 0.0)
    ids = torch.tensor([tokens])
    for lo in range(0, len(tokens), chunk):
        logp = {
            k: torch.log_softmax(m(ids[:, lo : lo + chunk].to(m.device), caches[k])[0].float().cpu(), -1)
            for k, m in variants.items()
        }
        ref = logp[names[0]]
        for k in names:
            agree[k] += int((logp[k].argmax(-1) == ref.argmax(-1)).sum())
            kl[k] += float((ref.exp() * (ref - logp[k])).sum(-1).clamp_min(0).sum())
    return {k: {"agreement": agree[k] / len(tokens), "kl": kl[k] / len(tokens)} for k in names}


@torch.inference_mode()
def speed(model: Model, tokens: list[int], decode_tokens: int = 16, chunk_size: int = 1024) -> dict:
    """Prefill tokens/s over ``tokens`` and greedy decode ms/token for ``decode_tokens`` steps
    after them (after a short warm-up, so first-call allocations are not timed)."""
    from ..generate import prefill

    prefill(model, torch.tensor([tokens[:16]]), model.new_cache(), chunk_size, progress=False)
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = prefill(model, torch.tensor([tokens]), cache, chunk_size, progress=False)
    prefill_s = time.perf_counter() - t0
    nxt = logits.argmax(-1, keepdim=True).to(model.device)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        nxt = model(nxt, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return {"prefill_tok_s": len(tokens) / prefill_s, "decode_ms": 1000 * (time.perf_counter() - t0) / decode_tokens}


@dataclass
class Comparison:
    """What ``compare`` measured: per variant its finished cells (the ``niah.run`` records)
    and its "weight_bytes", "prefill_tok_s", "decode_ms", "agreement", "kl"."""

    records: dict[str, list[dict]]
    stats: dict[str, dict] = field(default_factory=dict)
    metric: str = "substring"

    @property
    def names(self) -> list[str]:
        return list(self.records)

    def _hits(self, name: str, task=None, length=None) -> dict[tuple, bool]:
        return {
            (r["task"], r["length"], r["depth"], r["sample"]): bool(metric_value(r, self.metric))
            for r in self.records[name]
            if (task is None or r["task"] == task) and (length is None or r["length"] == length)
        }

    def accuracy(self, name: str, task=None, length=None) -> dict:
        """{"accuracy", "ci95" (Wilson), "k", "n"} of a variant, over all its cells or one
        task and/or length."""
        hits = list(self._hits(name, task, length).values())
        k, n = sum(hits), len(hits)
        return {"accuracy": k / n if n else float("nan"), "ci95": wilson(k, n), "k": k, "n": n}

    def difference(self, name: str, task=None, length=None) -> dict:
        """``paired_difference`` of a variant against the first, on the cells both have."""
        ref, other = self._hits(self.names[0], task, length), self._hits(name, task, length)
        keys = sorted(ref.keys() & other.keys())
        return paired_difference([ref[k] for k in keys], [other[k] for k in keys])

    def groups(self) -> list[tuple[str, int]]:
        """(task, length) pairs in the records, in order."""
        return sorted({(r["task"], r["length"]) for recs in self.records.values() for r in recs})

    def to_markdown(self) -> str:
        """Two tables: accuracy per task and length (each variant's with its Wilson 95 %
        interval; the others' difference to the first with its interval and exact McNemar
        p), then one row per variant over all cells with its costs and fidelity."""
        pct = lambda x: f"{100 * x:.0f}"  # noqa: E731
        first, rest = self.names[0], self.names[1:]
        head = f"| task | length | {first} | " + " | ".join(f"{n} | Δ {n} vs {first}" for n in rest) + " |"
        lines = [
            f"{self.metric} match, % (95 % interval); Δ in points, paired on the same cells (exact McNemar p)",
            "",
            head,
            "|---|---|---|" + "---|---|" * len(rest),
        ]

        def row(task, length, label_t, label_l):
            cells = []
            for n in self.names:
                a = self.accuracy(n, task, length)
                cells.append(f"{pct(a['accuracy'])} ({pct(a['ci95'][0])}-{pct(a['ci95'][1])})")
                if n != first:
                    d = self.difference(n, task, length)
                    cells.append(
                        f"{100 * d['difference']:+.0f} ({100 * d['ci95'][0]:+.0f}, "
                        f"{100 * d['ci95'][1]:+.0f}), p={d['p']:.2g}"
                    )
            return f"| {label_t} | {label_l} | " + " | ".join(cells) + " |"

        lines += [row(t, L, t, length_label(L)) for t, L in self.groups()]
        lines += [row(None, None, "**all**", "all")]
        lines += [
            "",
            "| variant | weights (MiB) | prefill (tokens/s) | decode (ms/token) | next-token agreement | "
            "mean KL (nats) |",
            "|---|---|---|---|---|---|",
        ]
        for n in self.names:
            s = self.stats.get(n, {})
            get = lambda k, f: f.format(s[k]) if k in s else "-"  # noqa: E731,B023
            mib = f"{s['weight_bytes'] / 2**20:.2f}" if "weight_bytes" in s else "-"
            lines.append(
                f"| {n} | {mib} | {get('prefill_tok_s', '{:,.0f}')} | {get('decode_ms', '{:.2f}')} | "
                f"{get('agreement', '{:.4f}')} | {get('kl', '{:.2e}')} |"
            )
        return "\n".join(lines)

    def plot(self, path=None, title: str | None = None):
        """Accuracy against length per variant with Wilson intervals, one panel per task, as a
        ``matplotlib.figure.Figure`` (no pyplot), also saved to ``path`` when given."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("Comparison.plot needs matplotlib: pip install 'longctx[plot]'") from None
        tasks = sorted({t for t, _ in self.groups()})
        fig = Figure(figsize=(1.5 + 3.2 * len(tasks), 3.4))
        axes = fig.subplots(1, len(tasks), squeeze=False)[0]
        for ax, task in zip(axes, tasks):
            lengths = sorted({L for t, L in self.groups() if t == task})
            for i, n in enumerate(self.names):
                acc = [self.accuracy(n, task, L) for L in lengths]
                x = [j + 0.08 * (i - (len(self.names) - 1) / 2) for j in range(len(lengths))]
                y = [a["accuracy"] for a in acc]
                err = [[a["accuracy"] - a["ci95"][0] for a in acc], [a["ci95"][1] - a["accuracy"] for a in acc]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=n)
            ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths])
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("context length (tokens)")
            ax.set_title(task)
        axes[0].set_ylabel(f"{self.metric} match (95 % interval)")
        axes[-1].legend(fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
        return fig

    def to_dict(self) -> dict:
        """{"metric", "stats", "accuracy": per variant, task and length, "difference": the same
        against the first variant, "records"}."""
        groups = self.groups()
        return {
            "metric": self.metric,
            "stats": self.stats,
            "accuracy": {n: {f"{t}/{L}": self.accuracy(n, t, L) for t, L in groups} for n in self.names},
            "difference": {n: {f"{t}/{L}": self.difference(n, t, L) for t, L in groups} for n in self.names[1:]},
            "records": self.records,
        }


def load_variants(models, schemes=("none",), group_size: int = 64, device="cpu") -> dict[str, Model]:
    """Every model path (None: the embedded model) under every quantization scheme ("none",
    "int8", "int4"; int4 with ``group_size``, which must divide every quantized input width:
    64 fits the embedded model's expert width 192, 128 does not), named "<folder>[-<scheme>]"
    ("embedded-int8"). ``load_model``'s errors pass through."""
    from ..checkpoint import load_model

    variants = {}
    for path in models:
        for q in schemes:
            name = (Path(path).name if path else "embedded") + ("" if q == "none" else f"-{q}")
            m = load_model(path, device=device, quantize=None if q == "none" else q, group_size=group_size)
            variants[name if name not in variants else f"{name}-{len(variants)}"] = m
    return variants


def compare(
    variants: dict[str, Model],
    *,
    tasks=("single",),
    lengths=(1024,),
    depths=(0.25, 0.75),
    samples: int = 4,
    seed: int = 0,
    metric: str = "substring",
    heldout=None,
    heldout_tokens: int = 1024,
    decode_tokens: int = 16,
    out=None,
    data=None,
    progress: bool = True,
    **kw,
) -> Comparison:
    """Run the same cells on every variant (a dict name -> Model, the first the reference).

    tasks: NIAH tasks (``niah.TASKS``) and RULER families (``ruler.TASKS``; "qa" needs
    ``data``); lengths, depths, samples, seed: the grid, as ``niah.run`` (aggregation tasks at
    the first depth only). metric: "substring" or "exact" (a right/wrong per cell, which the
    paired test needs). heldout: text (or None: English prose from the haystack source, at a
    seed no cell uses) whose first ``heldout_tokens`` tokens measure agreement, KL and speed.
    out: a folder for the journals, ``out/<variant>/<task>.jsonl`` (resumable). Other keywords
    go to ``niah.run``. ValueError for an empty dict, a bad metric, or variants whose
    tokenizers differ (their cells would differ)."""
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"variants must be a non-empty dict name -> Model, got {type(variants).__name__}")
    if metric not in ("substring", "exact"):
        raise ValueError(f"metric must be 'substring' or 'exact' (right/wrong per cell), got {metric!r}")
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    first = next(iter(variants.values()))
    tok = first.tokenizer
    for name, m in variants.items():
        if m.tokenizer is None or tok is None or m.tokenizer.fingerprint != tok.fingerprint:
            raise ValueError(f"variants: {name!r} has no tokenizer or another one than the first variant's")
    records = {}
    for name, m in variants.items():
        records[name] = []
        for t in tasks:
            res = niah.run(
                m,
                task=t,
                lengths=lengths,
                depths=depths[:1] if t in ruler.DEPTHLESS else depths,
                samples=samples,
                seed=seed,
                data=data,
                progress=progress,
                out=None if out is None else Path(out) / name.replace("/", "_") / f"{t}.jsonl",
                **kw,
            )
            records[name] += res.records
    text = (
        niah.make_haystack(tok, "english", heldout_tokens, seed=987_654_321).ids[:heldout_tokens].tolist()
        if heldout is None
        else tok.encode(heldout)[:heldout_tokens]
    )
    if len(text) < 2:
        raise ValueError(f"heldout: needs at least 2 tokens, has {len(text)}")
    stats = {name: {"weight_bytes": weight_bytes(m), **speed(m, text, decode_tokens)} for name, m in variants.items()}
    for name, s in next_token_stats(variants, text).items():
        stats[name].update(s)
    return Comparison(records, stats, metric)
