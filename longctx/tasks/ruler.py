"""RULER's task families on the NIAH machinery: retrieval variants, variable tracking,
aggregation and document QA, and a RULER-style table.

    from longctx import load_model
    from longctx.tasks import ruler
    res = ruler.run(load_model(), tasks=ruler.TASKS[:-1], lengths=["1k", "4k"], samples=4, out="ruler/")
    print(res.to_markdown()); res.effective_length(0.856)

Every family is a task name of ``niah.run`` (``niah.make_cell`` asks ``spec`` for it), so its
cells have exact token lengths, share prefixes, and resume from the same JSONL journal as the
needle tasks. The families (RULER, Hsieh et al. 2024, with this library's prompt layout):

- ``niah_words`` / ``niah_uuid``: one needle whose value is a word / whose key and value are
  UUIDs ("One of the special magic uuids for <uuid> is: <uuid>.") in the run's haystack.
- ``multi_key_needles`` / ``multi_key_uuid``: the haystack itself is needle-shaped
  distractors (other keys, same form); one key is asked (numbers / UUIDs).
- ``variable_tracking``: a chain ``VAR ABCDE = 12345.``, ``VAR FGHIJ = VAR ABCDE.``, ... (4
  hops, in order, from the depth on) in the run's haystack; the answer is every name bound
  to the value.
- ``common_words``: a numbered word list where 10 words recur (3 times per block of 50
  items) among words seen at most a few times; the answer is those 10.
- ``frequent_words``: words whose counts per block follow Zipf's law (count of rank r
  ∝ r^-2); the answer is the 3 most frequent. Both aggregation tasks ignore the depth, and
  their expected words are counted on the units a cell actually holds.
- ``qa``: a question over the user's own SQuAD- or HotpotQA-style file (``load_qa``): the gold
  paragraph(s) are the needles (the first at the depth) among the file's other paragraphs as
  distractor documents. Nothing is downloaded.

Scores: ``results.recall`` (RULER's: the share of expected strings in the answer; for QA one
gold answer suffices) beside exact and substring match.
"""

from __future__ import annotations

import functools
import json
import random
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import needles, niah
from .niah import Haystack, Results, Spec, length_label

TASKS = (
    "niah_words",
    "niah_uuid",
    "multi_key_needles",
    "multi_key_uuid",
    "variable_tracking",
    "common_words",
    "frequent_words",
    "qa",
)
DEPTHLESS = ("common_words", "frequent_words")  # no needle: the depth changes nothing
THRESHOLD = 0.856  # RULER's: Llama-2-7B's average at 4K

CWE_WORDS, CWE_REPEAT, CWE_OTHERS = 10, 3, 20  # per block: 10 words x 3 and 20 others once
FWE_WORDS, FWE_TOP, FWE_SCALE, FWE_ALPHA = 30, 3, 24, 2.0  # per block: max(1, round(24 / r^2)) of rank r


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Lower-case words of 4-10 letters from the haystack prose (about 2,000), sorted."""
    words = {w for s in needles.haystack_sentences() for w in re.findall(r"\b[a-z]{4,10}\b", s)}
    return tuple(sorted(words))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _var(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


@dataclass(frozen=True)
class QASet:
    """Questions over paragraphs: ``items`` are (question, gold answers, indices of the gold
    paragraphs); ``paragraphs`` are document texts (a title line first when the file has
    titles)."""

    items: tuple[tuple[str, tuple[str, ...], tuple[int, ...]], ...]
    paragraphs: tuple[str, ...]
    name: str = "qa"


def load_qa(path) -> QASet:
    """Read a local QA file: JSON Lines, or a JSON list, of SQuAD-style records
    ``{"question", "answers": [str] | {"text": [str]}, "context": str}`` or HotpotQA-style ones
    ``{"question", "answer": str, "context": [[title, [sentence, ...]], ...], "supporting_facts":
    [[title, i], ...]}`` (the gold paragraphs are those the supporting facts name). Identical
    paragraphs are one document. ValueError naming the file and record for anything else."""
    if path is None:
        raise ValueError("task 'qa' needs data: a SQuAD- or HotpotQA-style JSON or JSONL file")
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        records = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON or JSON Lines ({e})") from None
    paragraphs: dict[str, int] = {}
    items = []
    for n, r in enumerate(records, 1):
        try:
            if isinstance(r["context"], str):
                answers = r["answers"]["text"] if isinstance(r["answers"], dict) else r["answers"]
                gold = [r["context"]]
            else:
                answers = [r["answer"]]
                named = {t for t, _ in r.get("supporting_facts", [])} or {t for t, _ in r["context"]}
                gold = [f"{t}\n{''.join(sents)}" for t, sents in r["context"] if t in named]
                for t, sents in r["context"]:  # the other paragraphs join the distractor pool
                    paragraphs.setdefault(f"{t}\n{''.join(sents)}", len(paragraphs))
            question = r["question"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}: record {n} is neither SQuAD- nor HotpotQA-style ({type(e).__name__}: {e})"
            ) from None
        answers = [str(a) for a in answers if str(a).strip()]
        if not answers or not gold or not str(question).strip():
            raise ValueError(f"{path}: record {n} has no question, answer or gold paragraph")
        items.append((str(question), tuple(answers), tuple(paragraphs.setdefault(g, len(paragraphs)) for g in gold)))
    if len(paragraphs) < 2:
        raise ValueError(f"{path}: needs at least 2 distinct paragraphs (one gold, distractors), has {len(paragraphs)}")
    return QASet(tuple(items), tuple(paragraphs), path.stem)


@functools.lru_cache(maxsize=8)
def _unit_haystack(tokenizer, name: str, units: tuple[tuple[str, str], ...], whole: bool) -> Haystack:
    """A haystack of (text, label) units, each encoded on its own (so the stream of a longer
    list extends that of a shorter one, token for token)."""
    ids = [tokenizer.encode(text) for text, _ in units]
    lens = np.array([len(i) for i in ids])
    return Haystack(
        name,
        np.array([t for i in ids for t in i], dtype=np.int32),
        np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64),
        labels=[lb for _, lb in units],
        whole=whole,
    )


def _stream(tokenizer, name: str, make_units, min_tokens: int, whole: bool = True) -> Haystack:
    """Units from ``make_units`` (an iterator of (text, label), deterministic for the cell's
    (seed, task, sample)) until they hold ``min_tokens`` tokens. Units are counted at >= 1
    token each, and the list grows by doubling, so the same few lists are encoded (cached)."""
    n = 64
    while True:
        units = tuple(u for u, _ in zip(make_units(), range(n)))
        hay = _unit_haystack(tokenizer, name, units, whole)
        if len(hay.ids) >= min_tokens:
            return hay
        n *= 2


def spec(tokenizer, task: str, rng: random.Random, seed: int, sample: int, length: int, data=None) -> Spec:
    """The ``niah.Spec`` of one of ``TASKS`` for one cell; ``rng`` is the cell's needle
    generator, and task haystacks are seeded by (seed, task, sample) alone."""
    hay_rng = lambda: random.Random(f"{seed}/{task}/{sample}/haystack")  # noqa: E731
    if task in ("niah_words", "niah_uuid"):
        key, kind = (needles.make_key(rng), "word") if task == "niah_words" else (_uuid(rng), "uuid")
        value = rng.choice(needles._NOUNS) if kind == "word" else _uuid(rng)
        return Spec(
            f"What is the special magic {kind} for {key}?",
            [f"One of the special magic {kind}s for {key} is: {value}."],
            [value],
        )
    if task in ("multi_key_needles", "multi_key_uuid"):
        uuids = task == "multi_key_uuid"
        kind = "uuid" if uuids else "number"
        key = _uuid(rng) if uuids else needles.make_key(rng)
        value = _uuid(rng) if uuids else needles.make_value(rng)

        def units():
            r = hay_rng()
            while True:
                k = _uuid(r) if uuids else needles.make_key(r, "any")
                v = _uuid(r) if uuids else needles.make_value(r)
                if k != key:
                    yield f" One of the special magic {kind}s for {k} is: {v}.", k

        return Spec(
            f"What is the special magic {kind} for {key}?",
            [f"One of the special magic {kind}s for {key} is: {value}."],
            [value],
            haystack=_stream(tokenizer, f"{kind} needles", units, length),
        )
    if task == "variable_tracking":
        names, value = [], str(rng.randrange(10_000, 100_000))
        while len(names) < 5:
            v = _var(rng)
            names += [v] if v not in names else []
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return Spec(f"Which variables are assigned the value {value}?", chain, names, ordered=False, chained=True)
    if task == "common_words":
        vocab = list(vocabulary())
        hr = hay_rng()
        hr.shuffle(vocab)
        common, others = vocab[:CWE_WORDS], vocab[CWE_WORDS:]

        def units():
            i = 0
            for b in range(1 << 30):
                block = common * CWE_REPEAT + [others[(b * CWE_OTHERS + j) % len(others)] for j in range(CWE_OTHERS)]
                random.Random(f"{seed}/{task}/{sample}/{b}").shuffle(block)
                for w in block:
                    i += 1
                    yield f" {i}. {w}", w

        return Spec(
            f"What are the {CWE_WORDS} most common words in the list above?",
            [],
            None,
            ordered=False,
            haystack=_stream(tokenizer, "word list", units, length),
            top=CWE_WORDS,
        )
    if task == "frequent_words":
        vocab = list(vocabulary())
        hay_rng().shuffle(vocab)
        ranked = vocab[:FWE_WORDS]
        counts = [max(1, round(FWE_SCALE / r**FWE_ALPHA)) for r in range(1, FWE_WORDS + 1)]

        def units():
            for b in range(1 << 30):
                block = [w for w, c in zip(ranked, counts) for _ in range(c)]
                random.Random(f"{seed}/{task}/{sample}/{b}").shuffle(block)
                yield from ((f" {w}", w) for w in block)

        return Spec(
            f"What are the {FWE_TOP} most frequent words in the text above?",
            [],
            None,
            ordered=False,
            haystack=_stream(tokenizer, "zipf words", units, length),
            top=FWE_TOP,
        )
    if task == "qa":
        if not isinstance(data, QASet):
            raise ValueError("task 'qa' needs data: a QASet (load_qa) or, in niah.run, the file's path")
        order = list(range(len(data.items)))
        random.Random(f"{seed}/qa").shuffle(order)
        question, answers, gold = data.items[order[sample % len(order)]]
        pool = [i for i in range(len(data.paragraphs)) if i not in gold]
        if not pool:
            raise ValueError(f"{data.name}: no distractor paragraphs besides the gold ones")

        def units():
            r = hay_rng()
            while True:  # the distractors in a seeded order, again and again if the file is short
                r.shuffle(pool)
                yield from ((f"{data.paragraphs[i]}\n\n", str(i)) for i in pool)

        return Spec(
            question,
            [f"{data.paragraphs[g]}\n\n" for g in gold],
            list(answers),
            any_of=True,
            haystack=_stream(tokenizer, f"{data.name} paragraphs", units, length, whole=False),
            sep="",
        )
    raise ValueError(f"unknown task {task!r}; RULER tasks: {', '.join(TASKS)}")


def top_labels(labels: list[str], k: int, length: int) -> list[str]:
    """The ``k`` most frequent labels, most frequent first (ties by name); ValueError when the
    k-th is not strictly more frequent than the next (``length`` is too short to say)."""
    ranked = sorted(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ranked) < k or (len(ranked) > k and ranked[k - 1][1] <= ranked[k][1]):
        raise ValueError(
            f"length {length} is too short for an aggregation task: its top {k} words are not clearly the most frequent"
        )
    return [w for w, _ in ranked[:k]]


@dataclass
class RulerResults:
    """The finished cells of several tasks (``Results`` per task) and RULER's summaries, on
    the "ruler" score (share of expected strings found) unless told otherwise."""

    by_task: dict[str, Results]

    def accuracy(self, metric: str = "ruler") -> tuple[list[int], dict[str, dict[int, float]]]:
        """(lengths, {task: {length: mean score over its cells}})."""
        lengths = sorted({r["length"] for res in self.by_task.values() for r in res.records})
        acc = {}
        for task, res in self.by_task.items():
            ls, _, hits, n = res.grid(metric)
            acc[task] = {L: hits[:, j].sum() / n[:, j].sum() for j, L in enumerate(ls) if n[:, j].sum()}
        return lengths, acc

    def average(self, metric: str = "ruler") -> dict[int, float]:
        """The mean over tasks per length (RULER's "Avg."), for lengths every task has."""
        lengths, acc = self.accuracy(metric)
        return {L: float(np.mean([a[L] for a in acc.values()])) for L in lengths if all(L in a for a in acc.values())}

    def effective_length(self, threshold: float = THRESHOLD, metric: str = "ruler") -> int:
        """The longest length up to which the average reaches ``threshold`` at every length
        (0: not even the shortest)."""
        best = 0
        for L, a in sorted(self.average(metric).items()):
            if a < threshold:
                break
            best = L
        return best

    def to_markdown(self, threshold: float = THRESHOLD, metric: str = "ruler") -> str:
        """A table: one row per task and the average, one column per length, scores in %, and
        the effective length against ``threshold``."""
        lengths, acc = self.accuracy(metric)
        avg = self.average(metric)
        cell = lambda a, L: f"{100 * a[L]:.1f}" if L in a else "-"  # noqa: E731
        lines = ["| task | " + " | ".join(length_label(L) for L in lengths) + " |", "|---|" + "---|" * len(lengths)]
        lines += [f"| {t} | " + " | ".join(cell(a, L) for L in lengths) + " |" for t, a in acc.items()]
        lines.append("| **average** | " + " | ".join(cell(avg, L) for L in lengths) + " |")
        eff = self.effective_length(threshold, metric)
        return "\n".join(lines) + (
            f"\n\neffective length (average {metric} score >= {100 * threshold:.1f} % at "
            f"every length up to it): {length_label(eff) if eff else 'none'}"
        )


def run(
    model,
    *,
    tasks=TASKS[:-1],
    lengths=(1024, 2048, 4096),
    depths=(0.25, 0.75),
    samples: int = 2,
    seed: int = 0,
    out=None,
    qa=None,
    progress: bool = True,
    **kw,
) -> RulerResults:
    """``niah.run`` for each task (aggregation tasks at one depth, as the depth changes
    nothing), journals in ``out/<task>.jsonl``. qa: the QA file (for task "qa"). Other keywords
    go to ``niah.run``."""
    unknown = [t for t in tasks if t not in TASKS and t not in ("single", "multi_key", "multi_value", "multi_query")]
    if unknown or isinstance(tasks, str):
        raise ValueError(
            f"tasks: unknown {unknown or tasks!r}; RULER tasks: {', '.join(TASKS)} (and NIAH's single, "
            "multi_key, multi_value, multi_query)"
        )
    data = load_qa(qa) if "qa" in tasks else None
    by_task = {}
    for t in tasks:
        by_task[t] = niah.run(
            model,
            task=t,
            lengths=lengths,
            depths=depths[:1] if t in DEPTHLESS else depths,
            samples=samples,
            seed=seed,
            out=None if out is None else Path(out) / f"{t}.jsonl",
            data=data,
            progress=progress,
            **kw,
        )
    return RulerResults(by_task)
