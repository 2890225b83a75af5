"""Cross-document QA measurements (issue 7, bars 1 and 2).

1. timing: prefill once, ask many. On a corpus of --tokens tokens (16 documents), the time of
   each `ask` against the corpus prefill, and whether each answer equals a fresh, single full
   forward of corpus + question followed by the same greedy decode.
2. citations: --trials corpora of 5-20 generated documents where exactly one holds the fact
   asked for ("One of the special magic numbers for {key} is: {value}."); how often that
   document ranks first, and how often the value is in the answer.

    python benchmarks/qa.py --part timing --random-tiny --tokens 32k --record    # any time
    python benchmarks/qa.py --part citations --trials 100 --record               # embedded model

--random-tiny uses the `tiny` preset with random weights and the default tokenizer: its
answers are noise, so it can show timings and exactness but not citation accuracy. --record
writes (replaces) benchmarks/results/qa_<part>[_random_tiny].md: device, date, command, numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from longctx.checkpoint import load_model
from longctx.cli import parse_length
from longctx.config import ModelConfig
from longctx.generate import generate
from longctx.model import Model
from longctx.tasks import needles
from longctx.tasks.qa import Session
from longctx.text.ingest import ingest
from longctx.text.prompt import context_prefix, question_suffix
from longctx.text.tokenizer import Tokenizer
from records import write_record

RESULTS = Path(__file__).parent / "results"


def random_tiny(seed: int = 0) -> Model:
    """The `tiny` preset with random weights (std 0.1) and the default tokenizer's ids."""
    tok = Tokenizer.default()
    cfg = dataclasses.replace(
        ModelConfig.preset("tiny"),
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_id,
        eos_token_id=[tok.eot_id],
        pad_token_id=tok.pad_id,
    )
    g = torch.Generator().manual_seed(seed)
    model = Model(cfg, tokenizer=tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                0.5 + torch.rand(p.shape, generator=g)
                if name.endswith("norm.weight")
                else torch.randn(p.shape, generator=g) * 0.1
            )
    return model.eval()


def make_corpus(rng: random.Random, n_docs: int, doc_tokens: int):
    """n_docs documents of English prose of about doc_tokens tokens each; one random document
    holds the needle. Returns (corpus, key, value, index of the holder)."""
    sents = needles.haystack_sentences()
    key, value = needles.make_key(rng, "eval"), needles.make_value(rng)
    holder = rng.randrange(n_docs)
    docs = []
    for d in range(n_docs):
        words, text = 0, []
        i = rng.randrange(len(sents))
        while words < doc_tokens * 0.75:  # ~0.75 words per token
            text.append(sents[i % len(sents)])
            words += len(text[-1].split())
            i += 1
        if d == holder:
            text.insert(rng.randrange(len(text) + 1), needles.NEEDLE.format(key=key, value=value))
        docs.append(
            (
                f"{rng.choice(needles._ADJECTIVES).title()} {rng.choice(needles._NOUNS).title()} Report {d}",
                " ".join(text),
            )
        )
    return ingest(docs, progress=False), key, value, holder


def part_timing(model, args, rng) -> list[str]:
    tok = model.tokenizer
    state, per_doc = rng.getstate(), args.tokens // 16
    while True:  # grow the documents until the prompt prefix has at least --tokens tokens
        rng.setstate(state)
        corpus, key, _, _ = make_corpus(rng, 16, per_doc)
        n = len(context_prefix(tok, corpus.pack(tok).ids))
        if n >= args.tokens:
            break
        per_doc = int(per_doc * args.tokens / n) + 8
    session = Session(model, corpus, chunk_size=args.chunk_size)
    questions = [needles.QUESTION.format(key=key)] + [
        needles.QUESTION.format(key=needles.make_key(rng)) for _ in range(args.questions - 1)
    ]
    stops = [*model.config.stop_ids, tok.eot_id, tok.eom_id]
    rows, same = [], True
    for q in questions:
        t0 = time.perf_counter()
        a = session.ask(q, max_new_tokens=args.max_new_tokens)
        ask_s = time.perf_counter() - t0
        # The independent path: corpus + question in one forward from an empty cache.
        prompt = session.prefix.tolist() + question_suffix(tok, q, at=session.n_tokens, chunk=model.config.local_chunk)
        fresh = generate(
            model, torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, chunk_size=None, stop_ids=stops
        )
        equal = tok.decode(fresh.tokens[0]).strip() == a.text and len(fresh.tokens[0]) == a.answer_tokens
        same &= equal
        rows.append((ask_s, a, fresh.prefill_s, equal))
    later = max(s for s, *_ in rows[1:]) if len(rows) > 1 else float("nan")
    lines = [
        f"### Prefill once, ask many ({session.n_tokens} tokens, 16 documents, prefill chunk {args.chunk_size})",
        "",
        f"corpus prefill: {session.prefill_s:.2f} s ({session.n_tokens / session.prefill_s:.0f} tok/s)",
        "",
        "| ask | seconds | / prefill | question tok | answer tok | fresh full forward s | same answer |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {i + 1} | {s:.3f} | {s / session.prefill_s:.2%} | {a.question_tokens} | {a.answer_tokens} | "
        f"{fp:.2f} | {eq} |"
        for i, (s, a, fp, eq) in enumerate(rows)
    ]
    lines += [
        "",
        f"slowest of asks 2..{len(rows)}: {later:.3f} s = {later / session.prefill_s:.2%} of the prefill "
        f"(bar: <= 10 %): {'met' if later <= 0.1 * session.prefill_s else 'NOT met'}",
        f"every answer equals a fresh full forward of corpus + question: {same}",
        "",
    ]
    return lines


def part_citations(model, args, rng) -> list[str]:
    first = hits = 0
    ranks = []
    t0 = time.perf_counter()
    lo, hi = (int(x) for x in args.docs.split("-"))
    sizes = [int(x) for x in args.doc_tokens.split(",")]
    lengths = []
    for t in range(args.trials):
        n = rng.randint(lo, hi)
        corpus, key, value, holder = make_corpus(rng, n, rng.choice(sizes))
        session = Session(model, corpus, chunk_size=args.chunk_size)
        a = session.ask(needles.QUESTION.format(key=key), max_new_tokens=args.max_new_tokens)
        lengths.append(session.n_tokens)
        order = [c.doc_id for c in a.citations]
        ranks.append(order.index(holder) + 1)
        first += ranks[-1] == 1
        hits += value in a.text
        if args.verbose:
            print(f"trial {t}: {n} docs, holder rank {ranks[-1]}, answer {a.text!r}", file=sys.stderr)
    chance = sum(1 / rng.randint(lo, hi) for _ in range(10000)) / 10000
    n = args.trials
    return [
        f"### Citations ({n} corpora of {args.docs} documents of {args.doc_tokens} tokens, one holds the fact; "
        f"corpus {min(lengths)}-{max(lengths)} tokens)",
        "",
        f"holder ranked first: {first}/{n} = {first / n:.0%} (bar: >= 90 %; chance ~{chance:.0%}); "
        f"mean rank of the holder: {sum(ranks) / n:.2f}; value in the answer: {hits}/{n} = {hits / n:.0%}; "
        f"{time.perf_counter() - t0:.0f} s",
        "",
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["timing", "citations", "both"], default="both")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    ap.add_argument("--random-tiny", action="store_true", help="the tiny preset with random weights")
    ap.add_argument("--tokens", type=parse_length, default=parse_length("32k"), help="timing corpus size")
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--docs", default="5-20", help="documents per citation corpus: a range")
    ap.add_argument("--doc-tokens", default="100,200,400", help="document sizes to draw from (approximate tokens)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device-name", default=f"{os.cpu_count()}-core CPU", help="for the record")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_tiny(args.seed) if args.random_tiny else load_model(args.model)
    name = (
        "`tiny` preset, random weights (std 0.1), default tokenizer"
        if args.random_tiny
        else args.model or "embedded default (longctx/assets/default)"
    )
    rng = random.Random(args.seed)
    lines = []
    if args.part in ("timing", "both"):
        lines += part_timing(model, args, rng)
    if args.part in ("citations", "both"):
        lines += part_citations(model, args, rng)
    print("\n".join(lines))
    if args.record:  # one record per part and model kind: qa_citations, qa_timing_random_tiny
        cmd = "python benchmarks/qa.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        facts = [
            f"model: {name} ({model.fingerprint[:12]})",
            f"machine: {args.device_name}",
            f"time: {datetime.datetime.now().isoformat(timespec='minutes')}",
        ]
        path = write_record(
            RESULTS,
            f"qa_{args.part}" + ("_random_tiny" if args.random_tiny else ""),
            f"Cross-document QA: {args.part}",
            cmd,
            facts,
            lines,
        )
        print(f"recorded {path}")


if __name__ == "__main__":
    main()
