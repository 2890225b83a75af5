"""Cross-document QA measurements (issue 7, bars 1 and 2).

1. Prefill once, ask many: on a corpus of --tokens tokens, the time of each `ask` against the
   corpus prefill, and whether each answer equals a fresh full prefill of corpus + question.
2. Citations: --trials corpora of 5-20 generated documents where exactly one holds the fact
   asked for; how often that document ranks first.

    python benchmarks/qa.py --tokens 32k --questions 5 --trials 50 --record
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import time
from pathlib import Path

import torch

from longctx import needles
from longctx.checkpoint import load_model
from longctx.cli import parse_length
from longctx.documents import ingest
from longctx.generate import generate
from longctx.prompt import context_prefix, question_suffix
from longctx.qa import Session

RESULTS = Path(__file__).parent / "results"


def make_corpus(rng: random.Random, n_docs: int, doc_tokens: int, tok):
    """n_docs documents of English prose; one random document holds a needle. Returns
    (corpus, key, value, title of the holder)."""
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
        docs.append((f"{rng.choice(needles._ADJECTIVES).title()} {rng.choice(needles._NOUNS).title()} Report {d}",
                     " ".join(text)))
    return ingest(docs, progress=False), key, value, docs[holder][0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=parse_length, default=parse_length("32k"))
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    model = load_model(args.model)
    tok = model.tokenizer
    rng = random.Random(args.seed)
    lines = []

    # 1. prefill once, ask many
    corpus, key, value, _ = make_corpus(rng, 16, args.tokens // 16, tok)
    session = Session(model, corpus, chunk_size=2048)
    questions = [needles.QUESTION.format(key=key)] + [needles.QUESTION.format(key=needles.make_key(rng))
                                                       for _ in range(args.questions - 1)]
    rows, same = [], True
    for q in questions:
        t0 = time.perf_counter()
        a = session.ask(q, max_new_tokens=16)
        ask_s = time.perf_counter() - t0
        prompt = context_prefix(tok, corpus.pack(tok).ids) + question_suffix(tok, q)
        fresh = generate(model, torch.tensor([prompt]), max_new_tokens=16, chunk_size=2048)
        same &= tok.decode(fresh.tokens[0]).strip() == a.text
        rows.append((ask_s, a.text))
    lines += [f"## Prefill once, ask many ({session.n_tokens} tokens, 16 documents)", "",
              f"corpus prefill: {session.prefill_s:.2f} s", "", "| ask | seconds | share of prefill | answer |",
              "|---|---|---|---|"]
    lines += [f"| {i + 1} | {s:.3f} | {s / session.prefill_s:.1%} | {t!r} |" for i, (s, t) in enumerate(rows)]
    lines += ["", f"every answer equals a fresh full prefill of corpus + question: {same}", ""]

    # 2. citations
    first = hits = 0
    for _ in range(args.trials):
        n = rng.randint(5, 20)
        corpus, key, value, title = make_corpus(rng, n, rng.choice([100, 200, 400]), tok)
        a = Session(model, corpus).ask(needles.QUESTION.format(key=key), max_new_tokens=16)
        first += a.citations[0].title == title
        hits += value in a.text
    lines += [f"## Citations ({args.trials} corpora of 5-20 documents, one holds the fact)", "",
              f"holder ranked first: {first}/{args.trials} = {first / args.trials:.0%}; "
              f"value in the answer: {hits}/{args.trials} = {hits / args.trials:.0%}"]
    print("\n".join(lines))
    if args.record:
        day = datetime.date.today().isoformat()
        path = RESULTS / f"qa_{day}.md"
        head = [f"# Cross-document QA ({day})", "",
                f"- device: CPU ({platform.machine()}), {torch.get_num_threads()} threads",
                f"- command: `python benchmarks/qa.py --tokens {args.tokens} --questions {args.questions} "
                f"--trials {args.trials} --seed {args.seed} --record`",
                f"- model: {args.model or 'embedded default (longctx/assets/default)'}", ""]
        path.write_text("\n".join(head + lines) + "\n")
        print(f"recorded {path}")


if __name__ == "__main__":
    main()
