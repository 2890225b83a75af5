"""The ``longctx`` command.

    longctx ask docs/ report.pdf -q "Which report mentions the merger?"
    longctx batch jobs.jsonl --out answers.jsonl          (also under torchrun)
    longctx niah --task single --lengths 1k,8k             (the needle-in-a-haystack benchmark)
    longctx info --context 1m                              (model summary and memory plan)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import Model
    from .tasks.niah import Results


def parse_length(s: str) -> int:
    """"32k" -> 32768, "1m" -> 1048576, "500" -> 500."""
    s = s.strip().lower()
    try:
        return int(float(s.rstrip("km")) * {"k": 1024, "m": 1024 * 1024}.get(s[-1:], 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length: {s!r} (examples: 4096, 32k, 1m)") from None


def parse_lengths(s: str) -> list[int]:
    """"1k,32k,1m" -> [1024, 32768, 1048576]."""
    return [parse_length(x) for x in s.split(",")]


def parse_depths(s: str) -> list[float]:
    """"0,0.5,1" -> [0.0, 0.5, 1.0]: needle depths, each in [0, 1]."""
    try:
        depths = [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of depths: {s!r} (example: 0,0.25,0.5,0.75,1)") from None
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {s!r}")
    return depths


def _device(device: str) -> str:
    """Under torchrun, a bare "cuda" means this rank's GPU (cuda:LOCAL_RANK)."""
    import os

    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def _model(args):
    from .checkpoint import load_model

    return load_model(args.model, device=_device(args.device))


def _size(nbytes: float) -> str:
    """Bytes in the largest binary unit (up to TiB) that keeps the number >= 1."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:10.2f} {unit}"
    return f"{nbytes:10.0f} B  "


def cmd_ask(args) -> int:
    from .tasks.qa import Session
    from .text.ingest import ingest

    model = _model(args)
    corpus = ingest(args.paths, errors="skip" if args.skip_bad else "raise")
    for s in corpus.skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    if args.session is not None and (args.session / "session.json").exists():
        session = Session.load(model, args.session, corpus)  # refuses another model or other documents
        print(f"corpus: {len(corpus)} documents, {session.n_tokens} tokens, loaded from {args.session}",
              file=sys.stderr)
    else:
        session = Session(model, corpus, chunk_size=args.chunk_size, max_context=args.max_context, progress=True)
        print(f"corpus: {len(corpus)} documents, {session.n_tokens} tokens, prefill {session.prefill_s:.1f} s",
              file=sys.stderr)
        if args.session is not None:
            session.save(args.session)
            print(f"saved the prefilled session to {args.session}", file=sys.stderr)
    for q in args.question:
        a = session.ask(q, max_new_tokens=args.max_new_tokens, max_context=args.max_context)
        print(f"Q: {q}\nA: {a.text}")
        for c in a.citations[: args.citations]:
            page = f", page {c.page}" if c.page else ""
            print(f"   [{c.share:5.1%}] {c.title}{page}  ({c.source or 'in memory'})")
    return 0


def cmd_batch(args) -> int:
    from .tasks.batch import run_batch

    run_batch(_model(args), args.jobs, args.out, max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
              max_context=args.max_context, temperature=args.temperature, seed=args.seed,
              progress=not args.no_progress)
    return 0


def cmd_info(args) -> int:
    import torch

    from .checkpoint import DEFAULT_MODEL
    from .config import ModelConfig

    if args.preset:
        cfg = ModelConfig.preset(args.preset)
        name = f"preset {args.preset}"
    else:
        folder = Path(args.model) if args.model else DEFAULT_MODEL
        if not (folder / "config.json").exists():
            hint = "" if args.model else " (the embedded default model is not there yet; pass --model DIR or --preset)"
            print(f"longctx info: {folder}: no config.json{hint}", file=sys.stderr)
            return 2
        cfg = ModelConfig.from_file(folder / "config.json")
        name = str(folder)
    if args.dtype is None:  # the checkpoint's own dtype (a preset: bfloat16, as Scout ships)
        raw = {} if args.preset else json.loads((folder / "config.json").read_text())
        args.dtype = (raw.get("text_config") or {}).get("torch_dtype") or raw.get("torch_dtype") or "bfloat16"
        args.dtype = args.dtype if args.dtype in ("bfloat16", "float16", "float32") else "bfloat16"
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    n = args.context
    kv = cfg.kv_bytes_per_token(dtype_bytes)
    n_chunked = cfg.layer_kinds.count("chunked")
    weights = cfg.num_parameters() * dtype_bytes
    global_kv = kv["global"] * n
    chunked_kv = kv["per_layer"] * n_chunked * min(n, cfg.attention_chunk_size)
    gib = 2**30
    print(f"model: {name}")
    print(f"  {cfg.num_hidden_layers} layers ({cfg.layer_kinds.count('global')} global NoPE, {n_chunked} chunked, "
          f"chunk {cfg.attention_chunk_size}), hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / "
          f"{cfg.num_key_value_heads} KV heads x {cfg.head_dim}, {cfg.num_local_experts} experts top-"
          f"{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}")
    print(f"  parameters: {cfg.num_parameters():,}")
    print(f"memory plan for {n:,} tokens in {args.dtype}:")
    print(f"  weights           {_size(weights)}")
    print(f"  global-layer KV   {_size(global_kv)}  ({kv['global']:,} B/token, offloadable by segment)")
    print(f"  chunked-layer KV  {_size(chunked_kv)}  (bounded by one attention chunk)")
    print(f"  total             {_size(weights + global_kv + chunked_kv)}")
    if n > cfg.max_position_embeddings:
        print(f"  NOTE: {n:,} tokens is past the model's max_position_embeddings ({cfg.max_position_embeddings:,})")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"  GPU: {free / gib:.1f} of {total / gib:.1f} GiB free")
        room = free - weights - chunked_kv
        if room < global_kv:
            on_gpu = max(0, room) // max(1, kv["global"])
            print(f"  the global KV does not fit next to the weights: keep ~{on_gpu:,} tokens on the GPU "
                  "(OffloadPolicy.device_bytes) and offload the rest to CPU / disk")
    return 0


def add_niah_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``longctx niah`` (``benchmarks/niah.py`` adds its own to the same set)."""
    from .tasks.niah import TASKS

    p.add_argument("--task", default="single", choices=TASKS)
    p.add_argument("--lengths", type=parse_lengths, default="1k,2k,4k", help="comma-separated, e.g. 1k,32k,1m")
    p.add_argument("--depths", type=parse_depths, default="0,0.25,0.5,0.75,1", help="comma-separated, in [0, 1]")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default="english", help="english | noise | a folder or file to ingest")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-size", type=int, default=1024, help="prefill chunk (tokens)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 on a machine busy with other work)")
    p.add_argument("--out", type=Path, default=Path("niah_results"))
    p.add_argument("--no-reuse", action="store_true", help="prefill every cell from scratch")


def niah_inputs(args: argparse.Namespace) -> tuple[Model, dict]:
    """(model, keywords of ``niah.run``) for ``longctx niah`` options: the model loaded, the
    grid parsed, a haystack that is a path ingested, torch's CPU threads set."""
    import torch

    from .checkpoint import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=_device(args.device))
    haystack = args.haystack
    if haystack not in ("english", "noise"):
        from .text.ingest import ingest

        haystack = ingest([haystack])
    return model, dict(task=args.task, lengths=args.lengths, depths=args.depths, samples=args.samples,
                       seed=args.seed, haystack=haystack, chunk_size=args.chunk_size)


def niah_grid(args: argparse.Namespace) -> tuple[Results, list[str], Path | None]:
    """Run the grid that ``longctx niah`` options describe into ``<out>/<task>.jsonl``, print the
    accuracy tables and the effective length, draw ``<out>/<task>.png``. Returns (results, the
    report as markdown lines, the heatmap's path or None without matplotlib)."""
    from .tasks import niah

    model, kw = niah_inputs(args)
    out_jsonl = args.out / f"{args.task}.jsonl"
    t0 = time.perf_counter()
    res = niah.run(model, **kw, out=out_jsonl, reuse_prefix=not args.no_reuse)
    elapsed = time.perf_counter() - t0
    eff = res.effective_length(0.9)
    body = ["```", res.table("exact"), "", res.table("substring"), "```", "",
            f"effective length (substring accuracy >= 90 % at every length up to it): {eff['effective_length']} tokens"]
    print("\n".join(body[1:4] + body[6:]))
    png = None
    name = "embedded model" if args.model is None else Path(args.model).name
    try:
        png = res.heatmap(args.out / f"{args.task}.png", title=f"NIAH {args.task} ({name})")
        print(f"wrote {out_jsonl} and {png} ({elapsed:.1f} s)")
    except ImportError as e:
        print(f"wrote {out_jsonl} ({elapsed:.1f} s); no heatmap: {e}", file=sys.stderr)
    return res, body + [f"wall time: {elapsed:.1f} s ({len(res.records)} cells)"], png


def cmd_niah(args) -> int:
    niah_grid(args)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="longctx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk (tokens)")

    p = sub.add_parser("ask", help="ask questions about files and folders")
    p.add_argument("paths", nargs="+")
    p.add_argument("-q", "--question", action="append", required=True, help="repeat for several questions")
    p.add_argument("--citations", type=int, default=3, help="documents to list per answer")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files (listed) instead of failing")
    p.add_argument("--max-context", type=parse_length, default=None,
                   help="tokens corpus + question + answer may take (default: the model's maximum)")
    p.add_argument("--session", type=Path, default=None, metavar="DIR",
                   help="reuse the prefilled corpus saved in DIR (made there on first use)")
    common(p)
    p.set_defaults(fn=cmd_ask)
    p = sub.add_parser("batch", help="run a JSONL file of QA jobs (resumable; shards under torchrun)")
    p.add_argument("jobs", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-context", type=parse_length, default=None,
                   help="tokens corpus + question + answer may take (default: the model's maximum)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled, seeded per question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    common(p)
    p.set_defaults(fn=cmd_batch)
    p = sub.add_parser("niah", help="the needle-in-a-haystack benchmark: a depth x length grid",
                       description="Needle-in-a-haystack benchmark: a depth x length grid; writes <out>/<task>.jsonl "
                                   "(resumable) and <out>/<task>.png.")
    add_niah_arguments(p)
    p.set_defaults(fn=cmd_niah)
    p = sub.add_parser("info", help="model summary and memory plan for a context length")
    p.add_argument("--model", default=None)
    p.add_argument("--preset", default=None, choices=["scout", "tiny"])
    p.add_argument("--context", type=parse_length, default=parse_length("128k"))
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: the checkpoint's dtype (bfloat16 for a preset)")
    p.set_defaults(fn=cmd_info)
    args = ap.parse_args(argv)
    from .cache import CacheError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .tasks.qa import QAError
    from .text.ingest import IngestError

    try:
        return args.fn(args)
    except (CheckpointError, ConfigError, IngestError, QAError, CacheError, FileNotFoundError) as e:
        print(f"longctx {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
