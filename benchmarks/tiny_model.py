"""Scores of the embedded default model that the NIAH script does not cover (issue 5, bars 3-4).

1. which-document: contexts of 5-20 packed documents (``Corpus.pack`` layout with chunk
   markers), 1-3 of them holding a needle; asked which document mentions a key, the answer
   must be that document's marker, e.g. "[3 Icy Wren]", exactly. Exact match per length.
2. length generalisation: single-needle NIAH at long lengths (default 32K, 64K, 128K), with the
   global layers' attention temperature tuning on (as trained) and off.

Everything runs through the library's own chunked prefill, KV cache and greedy decode.

    python benchmarks/tiny_model.py --part documents --lengths 1k,4k,16k --samples 20 --record
    python benchmarks/tiny_model.py --part long --lengths 32k,64k,128k --record

Single needle, multi-key and no-needle grids: ``python benchmarks/niah.py --task ...``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from longctx.checkpoint import load_model
from longctx.cli import parse_length
from longctx.generate import generate
from longctx.tasks import needles, niah
from records import write_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _train_module():
    """examples/train_tiny_model.py, for its data generators (one definition of the tasks)."""
    spec = importlib.util.spec_from_file_location("train_tiny_model", ROOT / "examples" / "train_tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def documents(
    model, lengths: list[int], samples: int, seed: int, docs: tuple[int, int], align: bool = True
) -> list[str]:
    """Which-document exact match per length; returns report lines. A wrong answer is told
    apart as another document's title from the same context (the model copies a title, but
    the wrong one) or no title of the context (it makes one up). align: the question at a
    chunk start when it would straddle one, as ``qa.Session`` asks it; False: where the
    context ends, as in training (and as in the records before questions were aligned)."""
    train, tok = _train_module(), model.tokenizer
    sents = needles.encoded_sentences(tok)
    lines = [
        "| length | right title | another document's title | no title of the context | samples |",
        "|---|---|---|---|---|",
    ]
    for length in lengths:
        rng, counts = random.Random(seed + length), [0, 0, 0]
        for _ in tqdm(range(samples), desc=f"documents @{length}", unit="q"):
            prompt, later = train.document_example(
                tok, rng, length, "eval", sents, docs=docs, chunk=model.config.attention_chunk_size, align=align
            )
            out = generate(model, torch.tensor([prompt]), max_new_tokens=24, chunk_size=2048)
            answer = tok.decode(out.tokens[0]).strip()
            titles = re.findall(r'title="([^"]*)"', tok.decode(prompt))
            cited = re.fullmatch(r"\[\d+:? (.*)\]", answer)  # the answer form: the holder's chunk marker
            title = cited.group(1) if cited else answer
            counts[0 if answer == later[0][2].strip() else 1 if title in titles else 2] += 1
        lines.append(f"| {length} | " + " | ".join(f"{c / samples:.0%} ({c})" for c in counts) + f" | {samples} |")
    return lines


def long_contexts(model, lengths: list[int], depths: list[float], samples: int, seed: int) -> list[str]:
    """Single-needle accuracy at long lengths, temperature tuning on and off."""
    lines = []
    saved = model.config.attn_temperature_tuning
    try:
        for tuning in (True, False):
            model.config.attn_temperature_tuning = tuning
            t0 = time.perf_counter()
            res = niah.run(
                model,
                task="single",
                lengths=lengths,
                depths=depths,
                samples=samples,
                seed=seed,
                max_new_tokens=8,
                chunk_size=4096,
            )
            lines += [
                f"temperature tuning {'on' if tuning else 'off'} ({time.perf_counter() - t0:.0f} s):",
                "",
                "```",
                res.table("exact"),
                "```",
                "",
            ]
    finally:
        model.config.attn_temperature_tuning = saved
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["documents", "long"], required=True)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    ap.add_argument("--lengths", default=None, help="comma-separated, e.g. 1k,4k,16k")
    ap.add_argument("--depths", default="0,0.5,1", help="long part: needle depths")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--docs", default="5-20", help="documents per context (a range)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-align",
        action="store_true",
        help="documents part: ask where the context ends even if the question straddles a chunk start",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda (weights stay fp32)")
    ap.add_argument("--record", action="store_true", help="write (replace) its record in benchmarks/results/")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    default = "1k,4k,16k" if args.part == "documents" else "32k,64k,128k"
    lengths = [parse_length(x) for x in (args.lengths or default).split(",")]
    t0 = time.perf_counter()
    if args.part == "documents":
        lo, hi = (int(x) for x in args.docs.split("-"))
        body = documents(model, lengths, args.samples, args.seed, (lo, hi), align=not args.no_align)
    else:
        body = long_contexts(model, lengths, [float(d) for d in args.depths.split(",")], args.samples, args.seed)
    wall = time.perf_counter() - t0
    print("\n".join(body))
    if args.record:
        cmd = "python benchmarks/tiny_model.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        facts = [f"model: {args.model or 'embedded default'} (fingerprint {model.fingerprint[:16]}); wall {wall:.0f} s"]
        if args.part == "documents":  # one record per context seed and question layout
            name = "tiny_model_documents" + (f"_seed{args.seed}" if args.seed else "")
            name += "_no-align" if args.no_align else ""
        else:  # one per lengths, depths and device: tiny_model_long_1m_d10-50_cuda
            depths = "-".join(f"{round(float(d) * 100)}" for d in args.depths.split(","))
            name = f"tiny_model_long_{(args.lengths or default).replace(',', '-')}_d{depths}"
            name += "" if model.device.type == "cpu" else f"_{model.device.type}"
        path = write_record(RESULTS, name, f"Embedded model: {args.part}", cmd, facts, body, device=str(model.device))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
