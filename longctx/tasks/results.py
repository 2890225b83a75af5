"""Scoring and the results grid shared by the evaluation tasks: exact and normalised-substring
match, RULER's recall score, Wilson intervals, ``Results`` (table, effective length, heatmap,
notebook views) and the length notation ("32k", "1m") used in tables, file names and the CLI."""

from __future__ import annotations

import html
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import jsonl


def record_key(rec: dict) -> str:
    """A result's identity in the journal: its cell's content hash."""
    return rec["hash"]


def _words(s: str) -> str:
    """Lower case, every run of characters other than letters and digits turned into one space,
    padded with spaces so that `f" {w} " in _words(...)` matches whole words only."""
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", s.lower()).split()) + " "


def score(answer: str, expected: list[str], *, ordered: bool = True, any_of: bool = False) -> tuple[bool, bool]:
    """(exact, normalised-substring) match of an answer against the expected strings.

    exact: the answer, stripped of spaces and a final full stop, is the expected values joined
    by ", " (in any order when ``ordered`` is False: multi-value needles have no order).
    substring: every expected string appears as whole words in the answer once lower-cased
    with punctuation dropped, so "The number is 1234567." counts, extra words are fine, but
    "12345678" is not a hit for 1234567.
    any_of: the expected strings are alternatives (document QA's gold answers): exact when the
    answer is one of them, substring when one of them appears.
    """
    text = answer.strip().rstrip(".").strip()
    words = _words(answer)
    found = [_words(e) in words for e in expected]
    if any_of:
        return any(text.lower() == e.strip().lower() for e in expected), any(found)
    if ordered:
        exact = text == ", ".join(expected)
    else:
        exact = sorted(p.strip() for p in text.split(",")) == sorted(expected)
    return exact, all(found)


def recall(answer: str, expected: list[str], *, any_of: bool = False) -> float:
    """RULER's score of one answer, in [0, 1]: the share of expected strings found in it
    (case-insensitive substring), or with ``any_of`` (alternative gold answers) 1.0 when one
    of them is found."""
    low = answer.lower()
    found = [e.lower() in low for e in expected]
    if not found:
        return 0.0
    return float(any(found)) if any_of else sum(found) / len(found)


def metric_value(rec: dict, metric: str) -> float:
    """A finished cell's score under ``metric`` ("exact", "substring" or "ruler"); a record
    written before the "ruler" field existed gets it computed from its answer."""
    if metric == "ruler" and metric not in rec:
        return recall(rec["answer"], rec["expected"], any_of=rec.get("any_of", False))
    return float(rec[metric])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Results:
    """All finished cells (dicts, one per JSONL line)."""

    records: list[dict] = field(default_factory=list)

    @classmethod
    def from_jsonl(cls, path, *, task: str | None = None) -> Results:
        """The finished cells in a results file (one per content hash; a torn line is skipped),
        optionally of one task: redraw a table or heatmap without running anything."""
        recs = {e.key: e.record for e in jsonl.read(path, record_key)}.values()
        return cls([r for r in recs if task is None or r.get("task") == task])

    def grid(self, metric: str = "substring") -> tuple[list[int], list[float], np.ndarray, np.ndarray]:
        """lengths, depths, and (depth × length) arrays of hits and counts."""
        lengths = sorted({r["length"] for r in self.records})
        depths = sorted({r["depth"] for r in self.records})
        hits = np.zeros((len(depths), len(lengths)))
        n = np.zeros_like(hits)
        for r in self.records:
            i, j = depths.index(r["depth"]), lengths.index(r["length"])
            hits[i, j] += metric_value(r, metric)
            n[i, j] += 1
        return lengths, depths, hits, n

    def table(self, metric: str = "substring") -> str:
        """Accuracy per depth (rows) and length (columns), plus each length's pooled accuracy."""
        lengths, depths, hits, n = self.grid(metric)
        fmt = lambda h, c: f"{h / c:6.0%}" if c else "     -"  # noqa: E731
        lines = [f"{metric + ' match':<15}" + "".join(f"{length_label(L):>7}" for L in lengths)]
        for i, d in enumerate(depths):
            lines.append(f"depth {d:6.0%}   " + "".join(f" {fmt(hits[i, j], n[i, j])}" for j in range(len(lengths))))
        pooled = "".join(f" {fmt(hits[:, j].sum(), n[:, j].sum())}" for j in range(len(lengths)))
        lines.append("all depths     " + pooled)
        return "\n".join(lines)

    def effective_length(self, threshold: float = 0.9, metric: str = "substring") -> dict:
        """The longest length up to which every length's accuracy (pooled over depths) reaches
        ``threshold``, with a Wilson 95 % interval per length and per cell.

        ``effective_length_lower`` is the conservative variant: the longest length up to which
        every length's Wilson lower bound reaches the threshold (with few samples it is 0,
        which says the grid is too small to claim the threshold, not that the model fails)."""
        lengths, depths, hits, n = self.grid(metric)
        per_length, effective, passing, surely, sure = [], 0, True, 0, True
        for j, L in enumerate(lengths):
            k, m = int(hits[:, j].sum()), int(n[:, j].sum())
            ci = wilson(k, m)
            per_length.append({"length": L, "accuracy": k / m if m else None, "ci95": ci, "n": m})
            passing = passing and m > 0 and k / m >= threshold
            sure = sure and m > 0 and ci[0] >= threshold
            effective = L if passing else effective
            surely = L if sure else surely
        cells = [
            {
                "length": L,
                "depth": d,
                "accuracy": hits[i, j] / n[i, j] if n[i, j] else None,
                "ci95": wilson(int(hits[i, j]), int(n[i, j])),
            }
            for i, d in enumerate(depths)
            for j, L in enumerate(lengths)
        ]
        return {
            "threshold": threshold,
            "effective_length": effective,
            "effective_length_lower": surely,
            "per_length": per_length,
            "cells": cells,
        }

    def heatmap(self, path=None, metric: str = "substring", title: str | None = None):
        """A depth × length heatmap of accuracy as a ``matplotlib.figure.Figure``, also written
        to ``path`` (a PNG) when given. Built without pyplot, so matplotlib's backend and
        pyplot's figure list stay as they were (a notebook shows the returned figure). Needs
        the ``plot`` extra (matplotlib)."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("Results.heatmap needs matplotlib: pip install 'longctx[plot]'") from None
        lengths, depths, hits, n = self.grid(metric)
        acc = np.where(n > 0, hits / np.maximum(n, 1), np.nan)
        fig = Figure(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
        ax = fig.subplots()
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if n[i, j]:
                    ax.text(j, i, f"{acc[i, j]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_title(title or f"needle retrieval ({metric} match)")
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
        return fig

    def to_dict(self) -> dict:
        """{"records": the cells (copies of the JSONL dicts), "effective_length": as
        ``effective_length(0.9)``}."""
        return {"records": [dict(r) for r in self.records], "effective_length": self.effective_length(0.9)}

    def to_pandas(self):
        """The cells as a pandas DataFrame, one row per cell (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Results.to_pandas needs pandas: pip install pandas") from None
        return pd.DataFrame([dict(r) for r in self.records])

    def _summary(self) -> str:
        tasks = sorted({str(r.get("task")) for r in self.records if "task" in r})
        lengths = sorted({r["length"] for r in self.records})
        span = (
            length_label(lengths[0]) + (f"-{length_label(lengths[-1])}" if len(lengths) > 1 else "")
            if lengths
            else "none"
        )
        hits = sum(bool(r.get("substring")) for r in self.records)
        acc = f", substring {hits}/{len(self.records)}" if self.records else ""
        return f"task {', '.join(tasks) or '?'}, {len(self.records)} cells, lengths {span}{acc}"

    def __repr__(self) -> str:
        return f"Results({self._summary()})"

    def _repr_html_(self) -> str:
        lengths, depths, hits, n = self.grid("substring") if self.records else ([], [], None, None)
        head = "".join(f"<th>{length_label(L)}</th>" for L in lengths)
        rows = "".join(
            f"<tr><th>{d:.0%}</th>"
            + "".join(f"<td>{hits[i, j] / n[i, j]:.0%}</td>" if n[i, j] else "<td>-</td>" for j in range(len(lengths)))
            + "</tr>"
            for i, d in enumerate(depths)
        )
        return (
            f"<p>NIAH results: {html.escape(self._summary())} (substring accuracy, depth × length)</p>"
            f"<table><tr><th>depth</th>{head}</tr>{rows}</table>"
        )


def parse_length(s) -> int:
    """A length in tokens: an int, or text as ``length_label`` writes it: "32k" -> 32768,
    "1m" -> 1048576, "1.5k" -> 1536, "500" -> 500. ValueError for anything else or < 1."""
    if isinstance(s, numbers.Integral) and not isinstance(s, bool):
        n = int(s)
    elif isinstance(s, str):
        t = s.strip().lower()
        try:
            n = int(float(t.rstrip("km")) * {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1))
        except ValueError:
            raise ValueError(f"not a length: {s!r} (examples: 4096, 32k, 1m)") from None
    else:
        raise TypeError(f"a length must be an int or a string like '32k', got {type(s).__name__} {s!r}")
    if n < 1:
        raise ValueError(f"a length must be >= 1 token, got {s!r}")
    return n


def length_label(n: int) -> str:
    """A length in tokens as tables and file names show it: 1m, 32k, or 500."""
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
