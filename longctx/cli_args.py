"""The ``longctx`` command's grammar: ``build_parser`` and the argument types. Each type parses
one option's text or raises ``argparse.ArgumentTypeError`` with a message naming what was
wrong, which ``Parser`` turns into one line, ``longctx <cmd>: argument --x: <message>``, and
exit status 2. The commands themselves are in ``longctx.cli``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

CLI_DOC = """The ``longctx`` command.

longctx ask docs/ report.pdf -q "Which document mentions the special magic number for pilot-9?"
longctx batch jobs.jsonl --out answers.jsonl          (also under torchrun)
longctx niah --task single --lengths 1k,8k             (the needle-in-a-haystack benchmark)
longctx compare --quantize none,int8,int4 --tasks single --lengths 1k,4k   (variants side by side)
longctx info --context 1m                              (model summary and memory plan)
"""


class UsageError(Exception):
    """A bad command line or input: printed as one line, ``longctx <cmd>: <message>``, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises ``UsageError`` (one line naming the argument)
    instead of printing the usage block."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def parse_length(s: str) -> int:
    """ "32k" -> 32768, "1m" -> 1048576, "500" -> 500 (``longctx.tasks.niah.parse_length``)."""
    from .tasks.niah import parse_length as parse

    try:
        return parse(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_lengths(s: str) -> list[int]:
    """ "1k,32k,1m" -> [1024, 32768, 1048576]."""
    return [parse_length(x) for x in s.split(",")]


def parse_depths(s: str) -> list[float]:
    """Needle depths as fractions: "0,0.5,1" -> [0.0, 0.5, 1.0]; a list with any value above 1
    is in percent (as needlehaystack takes them): "0,50,100" -> [0.0, 0.5, 1.0]."""
    try:
        depths = [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of depths: {s!r} (examples: 0,0.5,1 or 0,50,100)") from None
    scale = 100.0 if any(d > 1 for d in depths) else 1.0
    if not all(0.0 <= d <= scale for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be fractions in [0, 1] or percents in [0, 100], got {s!r}")
    return [d / scale for d in depths]


def count(minimum: int):
    """An argparse type: an int >= ``minimum``."""

    def parse(s: str) -> int:
        try:
            n = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n

    return parse


def threads_arg(s: str) -> int | str:
    """ "auto" or a thread count >= 1."""
    return "auto" if s == "auto" else count(1)(s)


def nonneg_float(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return x


def question_arg(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError("a question must not be empty")
    return s


def haystack_arg(s: str) -> str:
    if s not in ("english", "noise") and not Path(s).exists():
        raise argparse.ArgumentTypeError(f"{s}: no such file or folder (or use 'english' or 'noise')")
    return s


def existing_path(s: str) -> Path:
    if not Path(s).exists():
        raise argparse.ArgumentTypeError(f"{s}: no such file or folder")
    return Path(s)


def stats_path(s: str) -> Path:
    """``--stats``: a file to (re)write, in a folder that exists."""
    p = Path(s)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: is a folder; give the JSON report a file name")
    if not p.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: no folder {p.parent} to write it in")
    return p


def add_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stats",
        type=stats_path,
        default=None,
        metavar="PATH",
        help="run under longctx.Monitor and write its report as JSON to PATH, also when the run fails "
        "part-way: tokens per expert per MoE layer, time per prefill chunk and decode step by part, KV "
        "bytes per tier, peak memory (under torchrun ranks > 0 write PATH's stem + .rank<N>)",
    )


THREADS_HELP = (
    "CPU threads for torch: a number, or auto (default): 1 for a model under 50 M parameters "
    "on the CPU, where more threads only wait on each other, else torch's default; "
    "OMP_NUM_THREADS, when set, is kept"
)


def parse_bytes(s: str) -> int:
    """A memory size: "80GiB", "80GB", "512MiB", "1.5TB" or a plain number of bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", s)
    if m is None or m[2].lower() not in units:
        raise argparse.ArgumentTypeError(f"not a memory size: {s!r} (examples: 80GiB, 80GB, 512MiB)")
    n = int(float(m[1]) * units[m[2].lower()])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"a memory size must be > 0, got {s!r}")
    return n


def names(allowed: tuple[str, ...], s: str) -> list[str]:
    """An argparse type (through a lambda): a comma-separated list of names from ``allowed``."""
    if [x for x in s.split(",") if x not in allowed]:
        raise argparse.ArgumentTypeError(f"{s!r}: not a list of {', '.join(allowed)}")
    return s.split(",")


SPARSE_HELP = (
    "sparse decode: each answer token reads only the K pages of 64 keys (plus the first and the "
    "last) that its query bounds highest (default: exact, every page)"
)


def add_context_parallel(p: argparse.ArgumentParser) -> None:
    """``--context-parallel`` and ``--cp-timeout`` (``ask`` and ``niah``)."""
    p.add_argument(
        "--context-parallel",
        action="store_true",
        help="under torchrun: spread each context's KV over the ranks (gloo on CPU, NCCL on GPUs); rank 0 prints",
    )
    p.add_argument(
        "--cp-timeout",
        type=count(1),
        default=1800,
        metavar="S",
        help="with --context-parallel: seconds a rank waits for another before failing (default: 1800)",
    )


def add_niah_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``longctx niah`` (``benchmarks/niah.py`` adds its own to the same set)."""
    from .tasks.niah import TASKS

    p.add_argument("--task", default="single", choices=TASKS, help="which needle task (default: single)")
    p.add_argument(
        "--lengths",
        type=parse_lengths,
        default="1k,2k,4k",
        help="context lengths in tokens, comma-separated, e.g. 1k,32k,1m (default: 1k,2k,4k)",
    )
    p.add_argument(
        "--depths",
        type=parse_depths,
        default="0,0.25,0.5,0.75,1",
        help="needle depths, comma-separated: fractions in [0, 1] (0,0.5,1), or percents in "
        "[0, 100] (0,50,100) when any value is above 1 (default: 0,0.25,0.5,0.75,1)",
    )
    p.add_argument("--samples", type=count(1), default=2, help="samples per cell (default: 2)")
    p.add_argument(
        "--keys",
        choices=["vocab", "open"],
        default="open",
        help="the needles' keys: open (words, names, codes and numbers never used as keys in the embedded "
        "model's training) or vocab (two words of its training lists, unseen pairs) (default: open)",
    )
    p.add_argument("--seed", type=count(0), default=0, help="seed of the haystacks and needles (default: 0)")
    p.add_argument(
        "--haystack",
        type=haystack_arg,
        default="english",
        help="english | noise | a folder or file to ingest (default: english)",
    )
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--chunk-size", type=count(1), default=1024, help="prefill chunk in tokens (default: 1024)")
    p.add_argument("--threads", type=threads_arg, default="auto", help=THREADS_HELP)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("niah_results"),
        help="folder for <task>.jsonl and <task>.png (default: niah_results)",
    )
    p.add_argument("--no-reuse", action="store_true", help="prefill every cell from scratch")
    p.add_argument("--sparse-pages", type=count(1), default=None, metavar="K", help=SPARSE_HELP)
    add_context_parallel(p)
    add_stats(p)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .tasks import niah, ruler

    ap = Parser(prog="longctx", description=CLI_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"longctx {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="command", title="commands")

    def common(p):
        p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
        p.add_argument("--threads", type=threads_arg, default="auto", help=THREADS_HELP)
        p.add_argument("--max-new-tokens", type=count(1), default=64, help="answer tokens at most (default: 64)")
        p.add_argument("--chunk-size", type=count(1), default=2048, help="prefill chunk in tokens (default: 2048)")
        p.add_argument(
            "--max-context",
            type=parse_length,
            default=None,
            help="tokens corpus + question + answer may take (default: the model's maximum)",
        )
        p.add_argument(
            "--overflow",
            default="error",
            choices=["error", "drop", "truncate"],
            help="a corpus over the context: error (default), drop whole documents from the end, "
            "or truncate (also cut the first one that does not fit)",
        )
        p.add_argument(
            "--temperature",
            type=nonneg_float,
            default=0.0,
            help="0 (default): greedy; else sampled, seeded by --seed per question",
        )
        p.add_argument("--seed", type=count(0), default=0, help="seed for sampled answers (default: 0)")

    p = sub.add_parser(
        "ask",
        help="ask questions about files and folders",
        description="Ask questions about files and folders; the answer is printed as it is "
        "generated, with the documents it drew on.",
    )
    p.add_argument("paths", nargs="+", help="files and folders to read (.txt, .md, .html, .pdf)")
    p.add_argument(
        "-q", "--question", type=question_arg, action="append", required=True, help="a question; repeat for several"
    )
    p.add_argument("--citations", type=count(0), default=3, help="documents to list per answer (default: 3)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files (listed) instead of failing")
    p.add_argument(
        "--session",
        type=Path,
        default=None,
        metavar="DIR",
        help="reuse the prefilled corpus saved in DIR (made there on first use)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per question (answer, citations, token counts, seconds)",
    )
    p.add_argument("--sparse-pages", type=count(1), default=None, metavar="K", help=SPARSE_HELP)
    add_context_parallel(p)
    add_stats(p)
    common(p)
    p = sub.add_parser(
        "batch",
        help="run a JSONL file of QA jobs (resumable; shards under torchrun)",
        description="Answer a JSONL file of QA jobs into a JSONL file of answers (resumable; "
        "shards under torchrun). Exit status 1 when any question failed.",
    )
    p.add_argument("jobs", type=existing_path, help="the jobs file, one JSON job per line")
    p.add_argument("--out", type=Path, required=True, help="the answers file (JSONL; a rerun resumes it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_stats(p)
    common(p)
    p = sub.add_parser(
        "niah",
        help="the needle-in-a-haystack benchmark: a depth x length grid",
        description="Needle-in-a-haystack benchmark: a depth x length grid; writes <out>/<task>.jsonl "
        "(resumable) and <out>/<task>.png.",
    )
    add_niah_arguments(p)
    p = sub.add_parser("compare", help="models x quantizations side by side: a table and <out>/compare.png")
    p.add_argument("--model", action="append", help="checkpoint folder; repeat for several (default: embedded)")
    p.add_argument(
        "--quantize", type=lambda s: names(("none", "int8", "int4"), s), default="none", help="e.g. none,int8,int4"
    )
    p.add_argument("--group-size", type=count(1), default=64, help="int4 group size (default: 64)")
    p.add_argument(
        "--tasks",
        type=lambda s: names(niah.TASKS + ruler.TASKS, s),
        default="single,multi_key",
        help="comma-separated: " + ", ".join(niah.TASKS + ruler.TASKS),
    )
    p.add_argument("--qa", type=existing_path, default=None, help="SQuAD/HotpotQA-style JSON(L) file for task qa")
    p.add_argument("--lengths", type=parse_lengths, default="1k", help="comma-separated, e.g. 1k,4k (default: 1k)")
    p.add_argument("--depths", type=parse_depths, default="0.25,0.75", help="as for niah (default: 0.25,0.75)")
    p.add_argument("--samples", type=count(1), default=4, help="samples per cell (default: 4)")
    p.add_argument("--seed", type=count(0), default=0, help="seed of the cells (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=threads_arg, default="auto", help=THREADS_HELP)
    p.add_argument("--out", type=Path, default=Path("compare_results"), help="folder (default: compare_results)")
    p = sub.add_parser(
        "info",
        help="model summary and memory plan for a context length",
        description="Model summary and memory plan (weights and KV cache) for a context length.",
    )
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--preset", default=None, choices=["scout", "tiny"], help="a built-in configuration instead")
    p.add_argument(
        "--context",
        type=parse_length,
        default=parse_length("128k"),
        help="context length in tokens, e.g. 128k, 1m (default: 128k)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="default: the checkpoint's dtype (bfloat16 for a preset)",
    )
    p.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "int4"],
        help="weight-only quantization of the experts (and attention with --quantize-attention)",
    )
    p.add_argument("--group-size", type=int, default=128, help="int4 group size along the input dim (default: 128)")
    p.add_argument("--quantize-attention", action="store_true", help="quantize attention projections too")
    p.add_argument(
        "--gpu-memory",
        type=parse_bytes,
        default=None,
        metavar="SIZE",
        help="GPU budget, e.g. 80GiB (default: what is free on this machine's GPU; none without one)",
    )
    p.add_argument(
        "--cpu-memory",
        type=parse_bytes,
        default=None,
        metavar="SIZE",
        help="CPU budget for offloaded KV, e.g. 256GiB (default: unbounded; the rest goes to disk)",
    )
    p.add_argument("--threads", type=threads_arg, default="auto", help=THREADS_HELP)
    return ap
