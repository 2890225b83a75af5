"""What ``Session.ask`` returns: an ``Answer`` with its ``Citation``s, or an ``AnswerStream``
that yields the answer's text as it is decoded."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Generator, Iterator
from dataclasses import dataclass

from ..notebook import clip, html_table


@dataclass
class Citation:
    doc_id: int  # position in the corpus (Document.id)
    title: str
    source: str | None
    page: int | None  # the page holding most of the document's share (paged documents)
    share: float  # of all global-layer attention mass of the answer's tokens


@dataclass
class Answer:
    """An answer, its citations (best first) and what it cost.

    other_share: attention share on non-document tokens (prompt header, document delimiters,
    question, answer); ``sum(c.share for c in citations) + other_share == 1``.
    prefill_s: the question's own prefill (the corpus is already in the cache); decode_s: the
    answer's tokens (including the citation bookkeeping). kv_read: the share of global-layer KV
    that the answer's decode steps read (1.0 with exact attention; under sparse decode the
    citations count the attention mass of the pages read, unread pages as zero).
    """

    text: str
    citations: list[Citation]
    other_share: float
    question_tokens: int
    answer_tokens: int
    prefill_s: float
    decode_s: float
    stopped: str = "stop"  # "stop" (an end-of-turn token) or "length" (max_new_tokens reached)
    question: str = ""
    kv_read: float = 1.0

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    def to_dict(self) -> dict:
        """Plain JSON-ready fields: question, text, citations (all, best first), other_share,
        token counts, seconds, stopped."""
        return dataclasses.asdict(self)

    def __repr__(self) -> str:
        top = f", top: {self.citations[0].title[:60]!r} {self.citations[0].share:.0%}" if self.citations else ""
        return (
            f"Answer({clip(self.text, 300)!r}, {len(self.citations)} citations{top}, "
            f"{self.question_tokens}+{self.answer_tokens} tokens, {self.seconds:.3f} s)"
        )

    def _repr_html_(self) -> str:
        rows = [(f"{c.share:.1%}", c.title, c.page or "", c.source or "in memory") for c in self.citations[:5]]
        more = len(self.citations) - len(rows)
        return (
            f"<p><b>{html.escape(clip(self.question, 500))}</b><br>{html.escape(clip(self.text, 2000))}</p>"
            + html_table(("share", "document", "page", "source"), rows, f"{more} more documents" if more > 0 else None)
            + f"<p>{self.question_tokens} question + {self.answer_tokens} answer tokens, "
            f"{self.seconds:.3f} s, stopped: {self.stopped}; {self.other_share:.1%} of the attention "
            "outside the documents</p>"
        )


class AnswerStream:
    """``Session.ask(..., stream=True)``: iterate for the answer's text pieces as they are
    decoded (joined, they equal ``answer.text``); ``answer`` holds the ``Answer`` once the
    iteration has ended (None before)."""

    def __init__(self, steps: Generator[str, None, Answer]):
        self._steps = steps
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        self.answer = yield from self._steps

    def __repr__(self) -> str:
        return f"AnswerStream({'done' if self.answer else 'not consumed'})"
