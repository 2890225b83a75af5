"""Benchmark: ingest + pack a folder of >= 10M tokens, against raw tiktoken batch encoding.

    python benchmarks/ingest.py                 # generate the folder (once, cached) and measure
    python benchmarks/ingest.py --folder DIR    # measure an existing folder of text files
    python benchmarks/ingest.py --record        # also write (replace) benchmarks/results/ingest.md

Measured in one run, interleaved (raw, tokenizer, ingest+pack, raw, ...) so that load from
other processes hits all of them alike, on the same texts:

  raw tiktoken   tiktoken's `encode_ordinary_batch` on all cores, on the file texts already in
                 memory (the floor: BPE and nothing else);
  tokenizer      `Tokenizer.encode_batch` on the same texts (the longctx tokenizer's wrapper);
  ingest         `ingest(folder)`: list, read, decode, check and hash every file;
  pack           `corpus.pack(tokenizer)`: delimiters, tokenization, int32 layout and spans.

The bar (issue 4): ingest + pack at most 25 % slower than raw tiktoken batch encoding.
Synthetic English-like text from a fixed word list and seed, so every run sees the same bytes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np
import tiktoken

from longctx.text.ingest import ingest
from longctx.text.tokenizer import LLAMA4_PATTERN, Tokenizer, load_ranks
from records import write_record

WORDS = """
the of and to in a is that for it as was with be by on not he this are or his from at which but have
an they you were her she all there been one their has more would will if can when what so no out up
said other into we its time only could new them some these than may two first any like then now my
over such our man me even most made after also did many before must through back years where much
your way well down should because each just those people how too little state good very make world
still own see men work long get here between both life being under never day same another know while
last might us great old year off come since against go came right used take three states himself few
house use during without again place american around however home small found thought went say part
once general high upon school every don does got united left number course war until always away
something fact though water less public put think almost hand enough far took head yet government
system better set told nothing night end why called didn eyes find going look asked later knew point
next program city business give group toward young days let room president side social given present
several order national possible rather second face per among form important often things looked early
white case john become large big need four within felt along children saw best church ever least power
development light thing seemed family interest want members mind country area others done turned
although open problem began kind report revenue market contract clause party agreement study results
data analysis model growth quarter annual policy risk customer product service value price cost
""".split()


def make_text(rng: random.Random, n_chars: int) -> str:
    """English-like text: capitalised sentences of 6-24 Zipf-weighted words, commas, numbers,
    paragraphs separated by blank lines, now and then a heading."""
    weights = [1.0 / (k + 1) for k in range(len(WORDS))]
    out: list[str] = []
    size = 0
    while size < n_chars:
        if rng.random() < 0.08:
            para = "## " + " ".join(rng.choices(WORDS, weights, k=rng.randint(2, 6))).title()
        else:
            sentences = []
            for _ in range(rng.randint(3, 8)):
                words = rng.choices(WORDS, weights, k=rng.randint(6, 24))
                if rng.random() < 0.3:
                    words.insert(
                        rng.randrange(len(words)),
                        str(rng.choice([rng.randint(1, 99), rng.randint(1900, 2030), rng.randint(1000, 999999)])),
                    )
                if len(words) > 8 and rng.random() < 0.5:
                    words[rng.randrange(2, len(words) - 2)] += ","
                sentences.append(" ".join(words).capitalize() + rng.choice(".....?!;"))
            para = " ".join(sentences)
        out.append(para)
        size += len(para) + 2
    return "\n\n".join(out) + "\n"


def generate(folder: Path, tokens: int, n_files: int, tokenizer: Tokenizer, seed: int = 0) -> None:
    """Write `n_files` text files (in a few sub-folders) holding >= `tokens` tokens in total."""
    marker = folder / ".bench.json"  # a dot-file: ingest does not read it
    params = {"tokens": tokens, "files": n_files, "seed": seed, "tokenizer": tokenizer.fingerprint}
    if marker.exists() and json.loads(marker.read_text()) == params:
        return
    rng = random.Random(seed)
    sample = make_text(random.Random(seed + 1), 400_000)
    chars_per_token = len(sample) / len(tokenizer.encode(sample))
    per_file = int(tokens * chars_per_token * 1.05 / n_files) + 1  # 5 % margin, checked later
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        sub = folder / f"part{k % 8}"
        sub.mkdir(exist_ok=True)
        (sub / f"doc{k:05d}.txt").write_text(make_text(rng, per_file), encoding="utf-8")
    marker.write_text(json.dumps(params))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", type=Path, help="folder of .txt files to use (default: generate one)")
    ap.add_argument("--tokens", type=int, default=10_000_000, help="tokens to generate (default 10M)")
    ap.add_argument("--files", type=int, default=400, help="files to generate (default 400)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (default 7)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="encoding threads (default: all cores)")
    ap.add_argument("--record", action="store_true", help="write (replace) benchmarks/results/ingest.md")
    args = ap.parse_args(argv)

    tok = Tokenizer.default()
    folder = args.folder
    if folder is None:
        folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"longctx-bench-ingest-{args.tokens}-{args.files}"
        t0 = time.perf_counter()
        generate(folder, args.tokens, args.files, tok)
        print(f"folder: {folder} (ready in {time.perf_counter() - t0:.1f} s)")

    # The raw baseline encodes the very texts ingest reads, in the same order.
    corpus = ingest(folder, progress=False)
    texts = [d.text for d in corpus]
    n_chars = sum(map(len, texts))
    n_bytes = sum(d.size for d in corpus)
    # tiktoken itself, with the same ranks, regex and specials as the longctx tokenizer.
    with as_file(files("longctx").joinpath("assets", "default", "tokenizer.model")) as p:
        ranks = load_ranks(p)
    raw_enc = tiktoken.Encoding("raw", pat_str=LLAMA4_PATTERN, mergeable_ranks=ranks, special_tokens=tok.special_tokens)
    del corpus

    def raw_lists():
        return raw_enc.encode_ordinary_batch(texts, num_threads=args.threads)

    def raw_arrays():
        with ThreadPoolExecutor(args.threads) as pool:
            return list(pool.map(lambda t: raw_enc.encode_to_numpy(t, disallowed_special=()), texts))

    def tokenizer_lists():
        return tok.encode_batch(texts, num_threads=args.threads)

    def ingest_and_pack():
        t0 = time.perf_counter()
        corpus = ingest(folder, progress=False)
        spent["ingest"] = time.perf_counter() - t0
        return corpus.pack(tok, progress=False, num_threads=args.threads)

    load_before = os.getloadavg()[0]
    steps = {"raw": raw_lists, "raw_np": raw_arrays, "tokenizer": tokenizer_lists, "ingest+pack": ingest_and_pack}
    wall: dict[str, list[float]] = {k: [] for k in [*steps, "ingest"]}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    spent: dict[str, float] = {}
    n_raw = n_packed = 0
    per_rep: list[str] = []
    for rep in range(args.repeats):
        # Alternate the order so that drifting load from other processes hits every step alike.
        order = list(steps) if rep % 2 == 0 else list(reversed(steps))
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            out = steps[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if name == "raw":
                n_raw = sum(map(len, out))
            elif name == "ingest+pack":
                wall["ingest"].append(spent["ingest"])
                n_packed = len(out)
                assert sum(len(s) for s in out.spans) == n_raw
            del out
        per_rep.append(f"  rep {rep + 1}: " + "  ".join(f"{k} {v[-1]:.2f} s" for k, v in wall.items()))
        print(f"  rep {rep + 1}: " + "  ".join(f"{k} {v[-1]:.2f} s" for k, v in wall.items()), flush=True)

    # Untimed check: the packed text tokens are exactly raw tiktoken's tokens of each file.
    packed = ingest(folder, progress=False).pack(tok, progress=False)
    text_ids = np.concatenate([packed.ids[s.start : s.end] for s in packed.spans])
    assert np.array_equal(text_ids, np.concatenate(raw_arrays()).astype(np.int32)), (
        "packed tokens differ from raw tiktoken"
    )
    del packed, text_ids

    med = {k: statistics.median(v) for k, v in wall.items()}
    best = {k: min(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    # Overheads from per-repetition ratios (each pair measured seconds apart), then the median.
    ratio = {
        k: statistics.median(a / b for a, b in zip(wall["ingest+pack"], wall[k])) - 1
        for k in ("raw", "raw_np", "tokenizer")
    }
    names = {
        "raw": "raw tiktoken `encode_ordinary_batch` (lists)",
        "raw_np": "raw tiktoken `encode_to_numpy`, thread pool",
        "tokenizer": "`Tokenizer.encode_batch` (lists)",
        "ingest": "`ingest(folder)`",
        "ingest+pack": "`ingest(folder)` + `corpus.pack(tokenizer)`",
    }
    lines = [
        f"{len(texts)} files, {n_bytes / 1e6:.1f} MB, {n_chars / 1e6:.1f} M chars, {n_raw / 1e6:.2f} M text tokens "
        f"({n_packed / 1e6:.2f} M packed with delimiters); {args.threads} threads; {args.repeats} interleaved runs",
        "",
        "| step | median wall s | best wall s | median CPU s | M tokens/s (median wall) |",
        "|---|---|---|---|---|",
        *[
            f"| {names[k]} | {med[k]:.2f} | {best[k]:.2f} | {med_cpu[k]:.2f} | {n_raw / med[k] / 1e6:.2f} |"
            if k in cpu
            else f"| {names[k]} (part of the next row) | {med[k]:.2f} | {best[k]:.2f} | | |"
            for k in ("raw", "raw_np", "tokenizer", "ingest", "ingest+pack")
        ],
        "",
        f"- ingest + pack vs raw tiktoken batch encoding (lists): **{ratio['raw'] * 100:+.1f} %** (bar: <= +25 %)",
        f"- ingest + pack vs raw tiktoken straight to numpy: {ratio['raw_np'] * 100:+.1f} %",
        f"- ingest + pack vs `Tokenizer.encode_batch`: {ratio['tokenizer'] * 100:+.1f} %",
        "- CPU time, ingest + pack vs raw tiktoken batch encoding: "
        f"{(med_cpu['ingest+pack'] / med_cpu['raw'] - 1) * 100:+.1f} % "
        f"(vs straight to numpy: {(med_cpu['ingest+pack'] / med_cpu['raw_np'] - 1) * 100:+.1f} %)",
        "",
        "(overheads: median over repetitions of the per-repetition time ratio)",
        "",
        "Wall times of every repetition (order alternates: forward on odd, reversed on even):",
        "",
        "```",
        *per_rep,
        "```",
    ]
    report = "\n".join(lines)
    print(report)
    ok = ratio["raw"] <= 0.25 and n_raw >= 10_000_000
    if n_raw < 10_000_000:
        print(f"WARNING: only {n_raw} tokens (< 10M)")
    print("PASS" if ok else "FAIL", "(bar: >= 10M tokens, ingest + pack <= 1.25 x raw tiktoken batch encoding)")

    if args.record:  # replaces benchmarks/results/ingest.md (git keeps the earlier ones)
        cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
        facts = [
            f"machine: {platform.platform()}, {_cpu_model()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, tiktoken {tiktoken.__version__}",
            f"time: {_dt.datetime.now().strftime('%H:%M')}",
            f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
            "(a shared machine: other processes may hold cores; the steps are interleaved)",
            f"tokenizer: default asset ({tok.n_ranks} ranks, fingerprint {tok.fingerprint[:12]})",
            "data: synthetic English-like text (benchmarks/ingest.py, seed 0)"
            + ("" if args.folder is None else f", folder {args.folder}"),
        ]
        out = write_record(
            Path(__file__).parent / "results",
            "ingest",
            "ingest + pack throughput",
            cmd,
            facts,
            [report, "", "PASS" if ok else "FAIL"],
            threads=args.threads,
        )
        print(f"recorded {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
