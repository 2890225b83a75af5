"""Train the embedded model's tokenizer from English text that ships with Python.

Corpus (offline, deterministic for a given Python version): the help topics in
`pydoc_data.topics` plus the module, class and function docstrings of the standard library's
.py sources, read with `ast` (nothing is imported, so no module runs), plus the needle
vocabulary (`needle_vocabulary`: key words and 3-digit groups, so each is one token). The
result is byte-level BPE with the Llama 4 regex (`--vocab-size` ranks, default 8192) and 256 Llama 4 special tokens
right after the ranks (begin_of_text = +0, eot = +8, ... as in Scout), written into ``--out``
(default ``tokenizer_out/``; ``--out longctx/assets/default`` replaces the shipped one) as

    tokenizer.model   tiktoken BPE file (base64 token, rank per line)
    tokenizer.json    longctx sidecar listing the special tokens

Usage:  python examples/train_tokenizer.py [--vocab-size 8192] [--max-mb 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import sysconfig
import time
from pathlib import Path

from longctx.text.bpe import train_bpe
from longctx.text.tokenizer import Tokenizer, llama4_special_tokens

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def corpus(max_chars: int) -> list[str]:
    """pydoc help topics, then stdlib docstrings in sorted file order, up to `max_chars` characters."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    total = sum(map(len, texts))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if total >= max_chars:
            break
        if SKIP_DIRS & set(path.relative_to(stdlib).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken or not UTF-8
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc + "\n")
                    total += len(doc) + 1
    return texts


def needle_vocabulary(repeat: int = 64) -> list[str]:
    """Text that makes each NIAH key word one token and each 3-digit group one token.

    The needles' keys ("amber-falcon") come from `longctx.tasks.needles`' word lists and their values
    are 7-digit numbers, which the Llama 4 regex splits into groups of at most three digits.
    Learned from Python's docs alone, a key took 4-8 sub-word tokens of varying length and a
    value 4-6 irregular digit pieces, so the small model had to match keys of variable shape at
    variable offsets; with one token per word (" amber", "-falcon", " Amber") and per digit
    group ("805", "602", "0") the offsets are fixed. `repeat` copies of each make the pieces
    frequent enough to be merged early (about 2,000 of the 7,936 merges)."""
    from longctx.tasks import needles

    adjectives, nouns = needles._ADJECTIVES, needles._NOUNS
    n = max(len(adjectives), len(nouns))
    keys = " ".join(f"{adjectives[i % len(adjectives)]}-{nouns[i % len(nouns)]}" for i in range(n))
    titles = " ".join(f"{w.title()}" for w in adjectives + nouns)
    numbers = " ".join(f"{i:03d}" for i in range(1000))
    return [f"{keys}\n{titles}\n{numbers}\n"] * repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab-size", type=int, default=8192, help="number of BPE ranks (256 bytes + merges)")
    ap.add_argument("--num-special", type=int, default=256, help="special ids after the ranks (Llama 4 offsets)")
    ap.add_argument("--max-mb", type=float, default=4.0, help="corpus size cap in millions of characters")
    ap.add_argument("--out", type=Path, default=Path("tokenizer_out"), help="folder to write (default: tokenizer_out)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    texts = corpus(int(args.max_mb * 1e6)) + needle_vocabulary()
    n_chars = sum(map(len, texts))
    print(f"corpus: {len(texts)} texts, {n_chars / 1e6:.2f} M chars ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    ranks = train_bpe(texts, args.vocab_size)
    print(f"trained {len(ranks)} ranks in {time.perf_counter() - t0:.1f} s")

    tok = Tokenizer.from_ranks(
        ranks, special_tokens=llama4_special_tokens(len(ranks), args.num_special), name="tokenizer.model"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(args.out / "tokenizer.model")
    n_tokens = sum(map(len, tok.encode_batch(texts)))
    print(f"wrote {args.out / 'tokenizer.model'}: vocab_size {tok.vocab_size}, fingerprint {tok.fingerprint[:16]}")
    print(f"compression on the corpus: {n_chars / n_tokens:.2f} chars/token")


if __name__ == "__main__":
    main()
