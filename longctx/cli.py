"""The ``longctx`` command.

longctx ask docs/ report.pdf -q "Which document mentions the special magic number for pilot-9?"
longctx batch jobs.jsonl --out answers.jsonl          (also under torchrun)
longctx niah --task single --lengths 1k,8k             (the needle-in-a-haystack benchmark)
longctx compare --quantize none,int8,int4 --tasks single --lengths 1k,4k   (variants side by side)
longctx info --context 1m                              (model summary and memory plan)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_args import UsageError, add_niah_arguments, build_parser, parse_depths, parse_length, parse_lengths

if TYPE_CHECKING:
    from .model import Model
    from .tasks.niah import Results


def _sparse(args):
    """``--sparse-pages K`` as a ``SparseDecode``; None for exact decode."""
    from .sparse import SparseDecode

    return None if args.sparse_pages is None else SparseDecode(top_pages=args.sparse_pages)


def _context_parallel(args, model) -> bool:
    """``--context-parallel``: join the torchrun group (``longctx.distributed.join``); ranks other
    than 0 print nothing on stdout. Returns the ``context_parallel`` argument for the library."""
    if not args.context_parallel:
        return False
    import datetime

    from .distributed import join

    if "WORLD_SIZE" not in os.environ:
        raise UsageError("--context-parallel runs under torchrun: torchrun --nproc-per-node N -m longctx.cli ...")
    _, rank, _ = join(model.device, datetime.timedelta(seconds=args.cp_timeout))
    if rank:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return True


def set_threads(threads: int | str, model=None) -> None:
    """Apply ``--threads``: a count, or "auto" (``longctx.generate.default_threads``)."""
    import torch

    from .generate import default_threads

    n = default_threads(model) if threads == "auto" else threads
    if n:
        torch.set_num_threads(n)


def _device(device: str) -> str:
    """Under torchrun, a bare "cuda" means this rank's GPU (cuda:LOCAL_RANK)."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def _model(args) -> Model:
    """The model of ``--model`` / ``--device``, torch's threads set by ``--threads``; a model
    that cannot be loaded is a ``UsageError`` naming the option."""
    from .checkpoint import CheckpointError, load_model
    from .config import ConfigError

    try:
        model = load_model(args.model, device=_device(args.device))
    except (CheckpointError, ConfigError, OSError, ValueError) as e:
        msg = str(e)
        option = "--device" if msg.startswith("device:") else "--model"
        raise UsageError(f"{option}: {msg.removeprefix('device: ')}") from None
    set_threads(args.threads, model)
    return model


def _size(nbytes: float) -> str:
    """Bytes in the largest binary unit (up to TiB) that keeps the number >= 1."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:10.2f} {unit}"
    return f"{nbytes:10.0f} B  "


@contextlib.contextmanager
def _stats(args, model: Model):
    """``--stats PATH``: the block runs under a ``Monitor`` whose report is written to PATH as
    JSON at the end, also when the block fails part-way (what was measured is kept). Under
    torchrun a rank > 0 writes PATH's stem + ``.rank<N>``: each rank measures its own work."""
    if args.stats is None:
        yield
        return
    from .monitor import Monitor

    path, rank = args.stats, int(os.environ.get("RANK", "0"))
    if rank:
        path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
    mon = Monitor(model)
    try:
        with mon:
            yield
    finally:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(mon.report().to_dict(), indent=1) + "\n")
        os.replace(tmp, path)  # a reader never sees half a report
        print(f"wrote the monitor report to {path}", file=sys.stderr)


def cmd_ask(args) -> int:
    model = _model(args)
    with _stats(args, model):
        return _ask(args, model)


def _ask(args, model: Model) -> int:
    import torch

    from .tasks.qa import Session
    from .text.ingest import ingest

    cp = _context_parallel(args, model)
    if cp and args.session is not None:
        raise UsageError("--session can't be used with --context-parallel (each rank holds a shard of the cache)")
    corpus = ingest(args.paths, errors="skip" if args.skip_bad else "raise")
    for s in corpus.skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    if args.session is not None and (args.session / "session.json").exists():
        session = Session.load(model, args.session, corpus, sparse=_sparse(args))  # refuses another model or text
        print(
            f"corpus: {len(corpus)} documents, {session.n_tokens} tokens, loaded from {args.session}", file=sys.stderr
        )
    else:
        session = Session(
            model,
            corpus,
            chunk_size=args.chunk_size,
            max_context=args.max_context,
            overflow=args.overflow,
            progress=not args.json,
            sparse=_sparse(args),
            context_parallel=cp,
        )
        print(
            f"corpus: {len(corpus)} documents, {session.n_tokens} tokens, prefill {session.prefill_s:.1f} s",
            file=sys.stderr,
        )
        if session.dropped:
            print(
                f"--overflow {args.overflow}: left out {len(session.dropped)} documents: "
                + ", ".join(d["title"] for d in session.dropped[:5])
                + (" ..." if len(session.dropped) > 5 else ""),
                file=sys.stderr,
            )
        if args.session is not None:
            session.save(args.session)
            print(f"saved the prefilled session to {args.session}", file=sys.stderr)
    for q in args.question:
        # Each question's own generator from --seed: answers do not depend on the questions before.
        gen = torch.Generator(device=model.device).manual_seed(args.seed) if args.temperature > 0 else None
        kw = dict(
            max_new_tokens=args.max_new_tokens,
            max_context=args.max_context,
            temperature=args.temperature,
            generator=gen,
        )
        if args.json:
            a = session.ask(q, **kw)
            print(
                json.dumps(
                    {
                        "question": q,
                        "answer": a.text,
                        "stopped": a.stopped,
                        "citations": [
                            {
                                "doc_id": c.doc_id,
                                "title": c.title,
                                "source": c.source,
                                "page": c.page,
                                "share": round(c.share, 6),
                            }
                            for c in a.citations[: args.citations]
                        ],
                        "other_share": round(a.other_share, 6),
                        "tokens": {
                            "corpus": session.n_tokens,
                            "question": a.question_tokens,
                            "answer": a.answer_tokens,
                        },
                        "seconds": {
                            "corpus_prefill": round(session.prefill_s, 4),
                            "question_prefill": round(a.prefill_s, 4),
                            "decode": round(a.decode_s, 4),
                        },
                    },
                    ensure_ascii=False,
                ),
                flush=True,
            )
            continue
        print(f"Q: {q}\nA: ", end="", flush=True)
        stream = session.ask(q, **kw, stream=True)
        for piece in stream:  # the answer as it is decoded
            print(piece, end="", flush=True)
        print()
        for c in stream.answer.citations[: args.citations]:
            page = f", page {c.page}" if c.page else ""
            print(f"   [{c.share:5.1%}] {c.title}{page}  ({c.source or 'in memory'})")
    return 0


def cmd_batch(args) -> int:
    from .tasks.batch import count_answers, run_batch

    model = _model(args)
    with _stats(args, model):
        out = run_batch(
            model,
            args.jobs,
            args.out,
            max_new_tokens=args.max_new_tokens,
            chunk_size=args.chunk_size,
            max_context=args.max_context,
            overflow=args.overflow,
            temperature=args.temperature,
            seed=args.seed,
            progress=not args.no_progress,
        )
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 holds the merged file and reports
        return 0
    answered, failed = count_answers(out)
    print(f"longctx batch: {answered} answered, {failed} failed (see {out})", file=sys.stderr)
    return 1 if failed else 0


def cmd_info(args) -> int:
    import torch

    set_threads(args.threads)
    from .checkpoint import DEFAULT_MODEL
    from .config import ModelConfig

    if args.preset:
        cfg = ModelConfig.preset(args.preset)
        name = f"preset {args.preset}"
    else:
        folder = Path(args.model) if args.model else DEFAULT_MODEL
        if not (folder / "config.json").exists():
            if args.model:
                raise UsageError(f"--model: {folder}: " + ("no config.json" if folder.is_dir() else "no such folder"))
            raise UsageError(
                f"{folder}: no config.json (the embedded default model is not there yet; pass --model DIR or --preset)"
            )
        cfg = ModelConfig.from_file(folder / "config.json")
        name = str(folder)
    if args.dtype is None:  # the checkpoint's own dtype (a preset: bfloat16, as Scout ships)
        raw = {} if args.preset else json.loads((folder / "config.json").read_text())
        args.dtype = (raw.get("text_config") or {}).get("torch_dtype") or raw.get("torch_dtype") or "bfloat16"
        args.dtype = args.dtype if args.dtype in ("bfloat16", "float16", "float32") else "bfloat16"
    from .memory import memory_plan

    gpu = args.gpu_memory
    if gpu is None and torch.cuda.is_available():
        gpu = torch.cuda.mem_get_info()[0]  # what is free on this GPU now
    try:
        plan = memory_plan(
            cfg,
            None if args.quantize == "none" else args.quantize,
            context=args.context,
            group_size=args.group_size,
            quantize_attention=args.quantize_attention,
            dtype=getattr(torch, args.dtype),
            gpu_bytes=gpu,
            cpu_bytes=args.cpu_memory,
        )
    except ValueError as e:
        raise UsageError(f"--group-size: {e}") from None
    print(f"model: {name}")
    print(
        f"  {cfg.num_hidden_layers} layers ({cfg.layer_kinds.count('global')} global NoPE, "
        f"{cfg.layer_kinds.count('chunked')} chunked, chunk {cfg.attention_chunk_size}), hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads x {cfg.head_dim}, "
        f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}"
    )
    print("\n".join(plan.lines()))
    if args.context > cfg.max_position_embeddings:
        print(
            f"  NOTE: {args.context:,} tokens is past the model's max_position_embeddings "
            f"({cfg.max_position_embeddings:,})"
        )
    return 0


def niah_inputs(args: argparse.Namespace) -> tuple[Model, dict]:
    """(model, keywords of ``niah.run``) for ``longctx niah`` options: the model loaded, the
    grid parsed, a haystack that is a path ingested, torch's CPU threads set."""
    model = _model(args)
    haystack = args.haystack
    if haystack not in ("english", "noise"):
        from .text.ingest import ingest

        haystack = ingest([haystack])
    return model, dict(
        task=args.task,
        lengths=args.lengths,
        depths=args.depths,
        samples=args.samples,
        seed=args.seed,
        haystack=haystack,
        chunk_size=args.chunk_size,
        sparse=_sparse(args),
        keys=args.keys,
        context_parallel=_context_parallel(args, model),
    )


def niah_grid(args: argparse.Namespace) -> tuple[Results, list[str], Path | None]:
    """Run the grid that ``longctx niah`` options describe into ``<out>/<task>.jsonl``, print the
    accuracy tables and the effective length, draw ``<out>/<task>.png``. Returns (results, the
    report as markdown lines, the heatmap's path or None without matplotlib)."""
    from .distributed import writer
    from .tasks import niah

    model, kw = niah_inputs(args)
    out_jsonl = args.out / f"{args.task}.jsonl"
    t0 = time.perf_counter()
    with _stats(args, model):
        res = niah.run(model, **kw, out=out_jsonl, reuse_prefix=not args.no_reuse)
    elapsed = time.perf_counter() - t0
    if not writer(kw["context_parallel"]):  # rank 0 reports and draws
        return res, [], None
    eff = res.effective_length(0.9)
    body = [
        "```",
        res.table("exact"),
        "",
        res.table("substring"),
        "```",
        "",
        f"effective length (substring accuracy >= 90 % at every length up to it): {eff['effective_length']} tokens",
    ]
    print("\n".join(body[1:4] + body[6:]))
    png = args.out / f"{args.task}.png"
    name = "embedded model" if args.model is None else Path(args.model).name
    try:
        res.heatmap(png, title=f"NIAH {args.task} ({name})")
        print(f"wrote {out_jsonl} and {png} ({elapsed:.1f} s)")
    except ImportError as e:
        png = None
        print(f"wrote {out_jsonl} ({elapsed:.1f} s); no heatmap: {e}", file=sys.stderr)
    return res, body + [f"wall time: {elapsed:.1f} s ({len(res.records)} cells)"], png


def cmd_niah(args) -> int:
    niah_grid(args)
    return 0


def cmd_compare(args) -> int:
    from .checkpoint import CheckpointError
    from .tasks.compare import compare, load_variants

    try:
        variants = load_variants(args.model or [None], args.quantize, args.group_size, _device(args.device))
    except (CheckpointError, ValueError, OSError) as e:  # ConfigError is a ValueError
        raise UsageError(f"{'--group-size' if 'group_size' in str(e) else '--model'}: {e}") from None
    set_threads(args.threads, next(iter(variants.values())))
    cmp = compare(
        variants,
        tasks=args.tasks,
        lengths=args.lengths,
        depths=args.depths,
        samples=args.samples,
        seed=args.seed,
        out=args.out,
        data=args.qa,
    )
    print(cmp.to_markdown())
    try:
        cmp.plot(args.out / "compare.png")
        print(f"wrote {args.out}/<variant>/<task>.jsonl and {args.out / 'compare.png'}")
    except ImportError as e:
        print(f"wrote {args.out}/<variant>/<task>.jsonl; no plot: {e}", file=sys.stderr)
    return 0


COMMANDS = {"ask": cmd_ask, "batch": cmd_batch, "niah": cmd_niah, "compare": cmd_compare, "info": cmd_info}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def main(argv=None) -> int:
    """Run one command; a bad argument or input prints ``longctx <cmd>: <message>`` on stderr
    and returns 2."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    from .cache import CacheError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .distributed import ContextParallelError
    from .tasks.batch import BatchInterrupted
    from .text.ingest import IngestError
    from .text.tokenizer import TokenizerError

    try:
        return COMMANDS[args.cmd](args)
    except BatchInterrupted as e:  # the answer in flight was written; the shell's status for the signal
        print(f"longctx {args.cmd}: {_one_line(e)}", file=sys.stderr)
        return 128 + e.signum
    except (
        UsageError,
        CheckpointError,
        ConfigError,
        CacheError,
        IngestError,
        TokenizerError,
        ContextParallelError,
        ValueError,
        OSError,
    ) as e:
        # QAError and BudgetError are ValueErrors; a missing file an OSError.
        print(f"longctx {args.cmd}: {_one_line(e)}", file=sys.stderr)
        return 2


# parse_* and add_niah_arguments: used by benchmarks/niah.py and the tests from here.
__all__ = ["add_niah_arguments", "main", "niah_grid", "niah_inputs", "parse_depths", "parse_length", "parse_lengths"]

if __name__ == "__main__":
    sys.exit(main())
