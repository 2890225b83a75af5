"""Needle-in-a-haystack evaluation: tasks, a depth × length grid, scoring, resumable results.

    from longctx import load_model, niah
    res = niah.run(load_model(), task="single", lengths=[1024, 4096], depths=[0, .5, 1], samples=2,
                   out="niah/results.jsonl")
    print(res.table()); res.effective_length(0.9)
    fig = res.heatmap("niah/heatmap.png")       # a matplotlib Figure (shown inline in a notebook)
    res                                         # in a notebook: the accuracy table; res.to_pandas()

Prompts use the layout of ``longctx.text.prompt`` (context prefix + question suffix). A cell's
length is exact: the whole prompt, chat template included, has ``length`` tokens, except that
for a model with chunked local layers a question that would cross a chunk start is moved to
the next one by up to a question's length of newlines (``question_suffix``). The needle
goes in at a sentence boundary at the requested depth of the context (0 = first sentence,
1 = just before the question); its absolute token index is recorded.

Tasks (``TASKS``): ``single`` (one needle), ``multi_key`` (the needle plus 3 distractor needles
with other keys), ``multi_value`` (one key, 3 needles with different values, all expected),
``multi_query`` (two needles, both asked), ``none`` (no needle for the key asked: the right
answer is "not stated"). RULER's families (``longctx.tasks.ruler.TASKS``: other key and value
types, needle haystacks, variable tracking, aggregation, document QA) are tasks of ``run`` too.

Every cell of one sample draws on one haystack stream, so prompts share prefixes: the cells
before their first needle, and cells whose needles sit at the same token (depth 0 at every
length) up to the shorter one's question. Cells run in a depth-first walk of the prompts'
prefix tree: each shared prefix is prefilled once into a cache that is forked at every branch,
and each cell prefills only what it does not share. ``reuse_prefix=False`` prefills every cell
from scratch (same answers, for measuring the saving).

Results stream to a crash-safe JSONL journal (``longctx.tasks.jsonl``), one line per finished
cell. Each line carries a content hash of everything that determines the cell (model
fingerprint, tokenizer, template, digest of the haystack tokens it uses, needles, question, the
prompt, length, depth, seed, generation settings); a rerun skips a cell only if a line with the
same hash exists.
"""

from __future__ import annotations

import functools
import hashlib
import json
import numbers
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import KVCache, token_hash
from ..distributed import writer
from ..generate import check_int, generate, prefill
from ..sparse import SparseDecode, read_share
from ..text.prompt import NOT_STATED, context_prefix, question_suffix
from . import jsonl, needles
from .haystack import Haystack, make_haystack
from .results import Results, length_label, parse_length, recall, record_key, score, wilson

if TYPE_CHECKING:
    from ..model import Model
    from ..text.tokenizer import Tokenizer

TASKS = ("single", "multi_key", "multi_value", "multi_query", "none")
TEMPLATE_ID = "longctx.text.prompt/1"  # bump when longctx.text.prompt's layout changes


@dataclass
class Cell:
    """One evaluation prompt and what a right answer contains."""

    task: str
    length: int
    depth: float
    sample: int
    prompt: list[int]
    question: str
    expected: list[str]  # every string must appear in the answer (one entry: NOT_STATED for "none")
    needles: list[dict]  # {"text", "token_index", "doc", "page"}
    haystack_sha256: str = ""  # of the haystack tokens this cell uses (its first `room` tokens)
    hash: str = ""
    ordered: bool = True  # an exact answer lists ``expected`` in this order
    any_of: bool = False  # ``expected`` are alternatives (document QA's gold answers): one suffices
    haystack: str = ""  # the name of the haystack the cell was cut from


@dataclass
class Spec:
    """What a task puts into one cell (``_task_spec``, ``longctx.tasks.ruler.spec``)."""

    question: str
    needles: list[str]  # sentences to hide; the first at the requested depth
    expected: list[str] | None  # None: the ``top`` most frequent labels of the units the cell uses
    ordered: bool = True
    any_of: bool = False
    chained: bool = False  # needles stay in order, all at or after the depth (a chain of assignments)
    haystack: Haystack | None = None  # the task's own haystack, instead of the run's
    sep: str = " "  # what precedes each needle's text when it is encoded
    top: int = 0


def _task_spec(task: str, rng: random.Random, keys: str = "open") -> Spec:
    """The needles, question and expected answers of one of ``TASKS``, with eval-split keys of
    kind ``keys`` (``needles.KEY_KINDS``)."""
    keys = needles.make_keys(rng, 4, "eval", keys)
    vals = [needles.make_value(rng) for _ in range(4)]
    say = lambda pairs: [needles.NEEDLE.format(key=k, value=v) for k, v in pairs]  # noqa: E731
    if task == "single":
        return Spec(needles.QUESTION.format(key=keys[0]), say([(keys[0], vals[0])]), [vals[0]])
    if task == "multi_key":
        return Spec(needles.QUESTION.format(key=keys[0]), say(zip(keys, vals)), [vals[0]])
    if task == "multi_value":
        return Spec(needles.QUESTION.format(key=keys[0]), say((keys[0], v) for v in vals[:3]), vals[:3], ordered=False)
    if task == "multi_query":
        return Spec(
            needles.QUESTION_MULTI.format(keys=f"{keys[0]} and {keys[1]}"),
            say([(keys[0], vals[0]), (keys[1], vals[1])]),
            vals[:2],
        )
    if task == "none":
        return Spec(needles.QUESTION.format(key=keys[0]), [], [NOT_STATED])
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def make_cell(
    tokenizer: Tokenizer,
    task: str,
    length: int,
    depth: float,
    sample: int,
    seed: int,
    hay: Haystack,
    chunk: int | None = None,
    data=None,
    keys: str = "open",
) -> Cell:
    """Build one cell. Needle texts and positions depend on (seed, task, sample) and the depth;
    the haystack on (seed, sample) only (a task with its own haystack: on (seed, task,
    sample)), so all cells of a sample share it.

    The prompt has ``length`` tokens; with ``chunk`` (the model's ``config.local_chunk``) a
    question that would cross a local-attention chunk start is moved to the next one by a few
    newlines (``question_suffix``), so up to one question's length more. ``task`` is one of
    ``TASKS`` or ``longctx.tasks.ruler.TASKS``; data: the ``ruler.QASet`` of task "qa"; keys:
    the kind of the needles' keys in ``TASKS`` (``needles.KEY_KINDS``: "vocab" or "open")."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{seed}/{task}/{sample}")
    if task in TASKS:
        spec = _task_spec(task, rng, keys)
    else:
        from . import ruler

        spec = ruler.spec(tokenizer, task, rng, seed, sample, length, data)
    hay = spec.haystack or hay
    question = spec.question
    head = context_prefix(tokenizer, [])
    suffix = question_suffix(tokenizer, question)
    needle_ids = [tokenizer.encode(spec.sep + t) for t in spec.needles]
    room = length - len(head) - len(suffix) - sum(map(len, needle_ids))
    if room < 1:
        raise ValueError(f"length {length} is too short for task {task!r} (needs more than {length - room})")
    if room > len(hay.ids):
        raise ValueError(
            f"the {hay.name} haystack has {len(hay.ids)} tokens; length {length} needs {room} "
            "(use shorter lengths, or a bigger corpus)"
        )
    end = room  # haystack tokens used; a whole-unit haystack stops at the last unit that fits
    if hay.whole:
        edges = np.append(hay.bounds, len(hay.ids))
        end = int(edges[edges <= room].max())
    bounds = hay.bounds[hay.bounds <= end]
    if hay.packed is not None and len(bounds) == 0:
        raise ValueError(f"length {length}: no sentence boundary inside a document in the first {room} corpus tokens")
    # The first needle at the sentence boundary nearest the depth; others at seeded boundaries
    # (after it and in order for a chain).
    spots = [int(bounds[np.abs(bounds - depth * end).argmin()])] if needle_ids else []
    if spec.chained:
        spots += sorted(int(rng.choice(bounds[bounds >= spots[0]])) for _ in needle_ids[1:])
    else:
        spots += [int(rng.choice(bounds)) for _ in needle_ids[1:]]
    order = sorted(range(len(needle_ids)), key=lambda j: (spots[j], j))
    context: list[int] = []
    placed, last = [], 0
    for j in order:
        context += hay.ids[last : spots[j]].tolist()
        placed.append((j, len(head) + len(context), spots[j]))
        context += needle_ids[j]
        last = spots[j]
    context += hay.ids[last:end].tolist()
    if end < room:
        pad = tokenizer.encode("\n")
        if len(pad) != 1:
            raise ValueError(f"the tokenizer encodes a newline as {len(pad)} tokens; whole-unit haystacks need 1")
        context += pad * (room - end)
    assert len(head) + len(context) + len(suffix) == length
    prompt = head + context + question_suffix(tokenizer, question, at=len(head) + len(context), chunk=chunk)
    expected = spec.expected
    if expected is None:
        from .ruler import top_labels

        expected = top_labels(hay.labels[: int((hay.bounds < end).sum())], spec.top, length)
    info = [None] * len(needle_ids)
    for j, index, at in placed:
        doc = page = None
        if hay.packed is not None:
            where = hay.packed.locate(at)  # `at` is a boundary inside a document's text
            if where is not None:
                doc, page = where[0].title, where[1]
        info[j] = {"text": spec.needles[j], "token_index": index, "doc": doc, "page": page}
    used = hashlib.sha256(hay.ids[:room].astype("<i4").tobytes()).hexdigest()
    return Cell(
        task,
        length,
        depth,
        sample,
        prompt,
        question,
        expected,
        info,
        used,
        ordered=spec.ordered,
        any_of=spec.any_of,
        haystack=hay.name,
    )


def cell_hash(cell: Cell, fingerprint: tuple[str, str], seed: int, settings: dict) -> str:
    """Content hash of a cell: the model and tokenizer fingerprints, the template, the digest of
    the haystack tokens the cell uses (not of the whole stream, so adding a longer length to a
    grid keeps the shorter cells), the needles with their token indices, the question, the
    expected answers, the prompt itself, the grid position (task, length, depth, sample, seed)
    and the generation settings. A finished cell is reused only on an identical hash.

    The prompt enters as ``token_hash`` (SHA-256 of its ids as little-endian int64), the digest
    that results files store as ``prompt_sha256``."""
    return hashlib.sha256(
        json.dumps(
            [
                fingerprint,
                TEMPLATE_ID,
                cell.haystack_sha256,
                cell.needles,
                cell.question,
                cell.expected,
                token_hash([cell.prompt])[0],
                cell.length,
                cell.depth,
                seed,
                cell.sample,
                cell.task,
                settings,
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()


def _grid_axes(lengths, depths) -> tuple[list[int], list[float]]:
    """``run``'s lengths (ints or "32k" strings) and depths (fractions in [0, 1]) as lists,
    or TypeError / ValueError naming the argument."""
    if isinstance(lengths, (str, int)) or not hasattr(lengths, "__iter__"):
        raise TypeError(
            f"lengths must be a list of lengths (e.g. [1024, '32k']), got {type(lengths).__name__} {lengths!r}"
        )
    try:
        lengths = [parse_length(x) for x in lengths]
    except (TypeError, ValueError) as e:
        raise type(e)(f"lengths: {e}") from None
    if isinstance(depths, (str, int, float)) or not hasattr(depths, "__iter__"):
        raise TypeError(
            f"depths must be a list of fractions in [0, 1] (e.g. [0, 0.5, 1]), got {type(depths).__name__} {depths!r}"
        )
    depths = list(depths)
    if not all(isinstance(d, numbers.Real) and not isinstance(d, bool) for d in depths):
        raise TypeError(f"depths must be numbers (fractions in [0, 1]), got {depths!r}")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1] (50 % is 0.5), got {depths!r}")
    if not lengths or not depths:
        raise ValueError(f"lengths and depths must be non-empty, got {lengths!r} and {depths!r}")
    return lengths, [float(d) for d in depths]


def prefix_forks(
    model: Model,
    prompts: list[list[int]],
    chunk_size: int = 1024,
    sparse: SparseDecode | None = None,
    context_parallel=False,
) -> Iterator[tuple[int, KVCache, list[int], int, float]]:
    """Caches for many prompts, each shared prefix prefilled once: a depth-first walk of the
    prompts' prefix tree that forks the cache at every branch.

    Yields ``(i, cache, rest, shared_tokens, shared_s)`` for every prompt, in walk order:
    ``cache`` holds the KV of ``prompts[i][:-len(rest)]`` (``rest`` is never empty, so the
    caller can generate from it); ``shared_tokens`` / ``shared_s`` are the prefix tokens and
    seconds of prefill done on the way to this prompt and not yet reported for an earlier one.
    Forks share their parent's tensors, so the walk holds one path's worth of KV, not one
    cache per prompt.
    """
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prefix_forks: prompt {empty[0]} is empty (each needs a token to generate from)")
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    pending = [0, 0.0]  # shared prefill not yet reported: tokens, seconds

    arrays = [np.asarray(p, dtype=np.int32) for p in prompts]  # token ids; half the bytes of int64

    def common_prefix(a: np.ndarray, b: np.ndarray, start: int) -> int:
        """Length of a's and b's common prefix, known to be at least ``start``; vectorised,
        and from ``start`` on, so a branch costs O(new tokens) in C, not O(prompt) in Python."""
        n = min(len(a), len(b))
        diff = np.flatnonzero(a[start:n] != b[start:n])
        return start + int(diff[0]) if len(diff) else n

    def walk(cache, pos: int, group: list[int]):
        if len(group) == 1:
            i = group[0]
            tokens, seconds = pending
            pending[:] = [0, 0.0]
            yield i, cache, prompts[i][pos:], tokens, seconds
            return
        # Sorted order: the group's common prefix is that of its first and last prompt. Keep
        # one token of each prompt back, to generate from.
        end = min(common_prefix(arrays[group[0]], arrays[group[-1]], pos), min(len(prompts[i]) for i in group) - 1)
        if end > pos:
            t0 = time.perf_counter()
            prefill(model, torch.tensor([prompts[group[0]][pos:end]]), cache, chunk_size, progress=False)
            pending[0] += end - pos
            pending[1] += time.perf_counter() - t0
        subgroups: dict[int, list[int]] = {}
        for i in group:  # sorted, so each subgroup stays in order
            subgroups.setdefault(prompts[i][end], []).append(i)
        if len(subgroups) == 1:  # no branch: the first (shortest) prompt is a prefix of the rest
            yield from walk(cache.fork(), end, group[:1])
            yield from walk(cache, end, group[1:])
            return
        for sub in subgroups.values():
            yield from walk(cache.fork(), end, sub)

    if order:
        yield from walk(model.new_cache(sparse=sparse, context_parallel=context_parallel), 0, order)


def run(
    model: Model,
    *,
    task: str = "single",
    lengths=(1024, 2048, 4096),
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 1,
    seed: int = 0,
    haystack="english",
    out=None,
    reuse_prefix: bool = True,
    max_new_tokens: int = 32,
    chunk_size: int = 1024,
    progress: bool = True,
    data=None,
    sparse: SparseDecode | None = None,
    keys: str = "open",
    context_parallel=False,
) -> Results:
    """Evaluate ``model`` on a depth × length grid (see the module docstring).

    lengths: a list of token counts, ints or strings like "32k" (``parse_length``); depths: a
    list of fractions of the context in [0, 1]; samples >= 1. out: a JSONL path; finished
    cells there with a matching hash are skipped, new cells are appended as they finish.
    Returns every cell of the grid (loaded or computed). Arguments are checked before any
    work (TypeError / ValueError naming the argument).

    task: one of ``TASKS`` or of RULER's families (``longctx.tasks.ruler.TASKS``; "qa" needs
    ``data``, a SQuAD- or HotpotQA-style JSON(L) path or a loaded ``ruler.QASet``).
    sparse: decode with ``longctx.sparse.SparseDecode`` (part of each cell's hash; each record's
    ``kv_read`` is the share of global-layer KV its decode steps read).
    keys: the kind of the needles' keys in ``TASKS`` (``needles.KEY_KINDS``): "open" (default:
    words, names, codes and numbers never used as keys in the embedded model's training, as a
    user would write them) or "vocab" (two words of its training key lists, unseen combinations);
    part of the cells' needles, hence of their hashes.
    context_parallel: True or a ``torch.distributed`` group spreads each context's KV over its
    ranks (``longctx.distributed``); every rank runs the same call, rank 0 alone writes ``out``.
    Each cell is then prefilled whole (``reuse_prefix`` is ignored): only a prefill into an
    empty cache is spread over the ranks, and a shared prefix would leave the rest of every
    cell on the last rank.
    """
    from . import ruler

    if task not in TASKS + ruler.TASKS:
        raise ValueError(f"task: unknown task {task!r}; tasks: {', '.join(TASKS + ruler.TASKS)}")
    if task == "qa":
        data = ruler.load_qa(data) if not isinstance(data, ruler.QASet) else data
    if keys not in needles.KEY_KINDS:
        raise ValueError(f"keys: unknown key kind {keys!r}; kinds: {', '.join(needles.KEY_KINDS)}")
    lengths, depths = _grid_axes(lengths, depths)
    check_int("samples", samples, 1)
    check_int("seed", seed, 0)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_int("chunk_size", chunk_size, 1)
    tok = model.tokenizer
    if tok is None:
        raise ValueError("model has no tokenizer (load it from a folder with tokenizer.model)")
    out = Path(out) if out is not None else None
    writes = writer(context_parallel)
    done = {e.key: e.record for e in jsonl.read(out, record_key, repair=writes)} if out else {}
    fh = None
    if out and writes:
        out.parent.mkdir(parents=True, exist_ok=True)
        fh = open(out, "a", encoding="utf-8")
    settings = {"max_new_tokens": max_new_tokens, "greedy": True}
    if sparse is not None:  # only then: exact cells keep their hashes
        settings["sparse"] = dict(vars(sparse))
        if context_parallel:  # top_pages per rank: what decode reads depends on the world size
            import torch.distributed as dist

            settings["ranks"] = dist.get_world_size(None if context_parallel is True else context_parallel)
    fingerprint = (model.fingerprint, tok.fingerprint)
    records = []
    bar = tqdm(total=len(lengths) * len(depths) * samples, desc=f"niah {task}", unit="cell", disable=not progress)
    try:
        corpus_hay = make_haystack(tok, haystack) if hasattr(haystack, "pack") else None  # one packing
        for sample in range(samples):
            hay = corpus_hay or make_haystack(tok, haystack, max(lengths), seed=seed * 1_000_003 + sample)
            cells = []
            for L in lengths:
                for d in depths:
                    c = make_cell(tok, task, L, float(d), sample, seed, hay, model.config.local_chunk, data, keys)
                    c.hash = cell_hash(c, fingerprint, seed, settings)
                    cells.append(c)
            todo = [c for c in cells if c.hash not in done]
            records += [done[c.hash] for c in cells if c.hash in done]
            bar.update(len(cells) - len(todo))
            if reuse_prefix and not context_parallel:
                runs = prefix_forks(model, [c.prompt for c in todo], chunk_size, sparse, context_parallel)
            else:
                new = functools.partial(model.new_cache, sparse=sparse, context_parallel=context_parallel)
                runs = ((i, new(), c.prompt, 0, 0.0) for i, c in enumerate(todo))
            for i, cache, rest, grown, base_s in runs:
                c = todo[i]
                gen = generate(
                    model,
                    torch.tensor([rest]),
                    cache=cache,
                    max_new_tokens=max_new_tokens,
                    chunk_size=chunk_size,
                    progress=False,
                )
                answer = tok.decode(gen.tokens[0]).strip()
                exact, sub = score(answer, c.expected, ordered=c.ordered, any_of=c.any_of)
                rec = {
                    "hash": c.hash,
                    "task": task,
                    "length": c.length,
                    "depth": c.depth,
                    "sample": c.sample,
                    "seed": seed,
                    "haystack": c.haystack,
                    "haystack_sha256": c.haystack_sha256,
                    "prompt_sha256": token_hash([c.prompt])[0],
                    "question": c.question,
                    "expected": c.expected,
                    "needles": c.needles,
                    "answer": answer,
                    "exact": exact,
                    "substring": sub,
                    "ruler": recall(answer, c.expected, any_of=c.any_of),
                    "any_of": c.any_of,
                    "prefill_s": round(base_s + gen.prefill_s, 4),
                    "decode_s": round(gen.decode_s, 4),
                    "new_prefill_tokens": len(rest),
                    "base_prefill_tokens": grown,
                    "kv_bytes": cache.nbytes,
                    "kv_read": round(read_share(cache), 6),
                    "model": fingerprint[0][:16],
                }
                records.append(rec)
                if fh:
                    jsonl.append(fh, rec)
                bar.update(1)
    finally:
        bar.close()
        if fh:
            fh.close()
    return Results(records)


__all__ = [
    "TASKS", "Cell", "Haystack", "Results", "cell_hash", "length_label", "make_cell", "make_haystack",
    "parse_length", "prefix_forks", "run", "score", "wilson",
]  # fmt: skip
