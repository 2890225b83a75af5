"""Context parallelism (longctx.distributed): N gloo ranks, spawned here, against one process.

Each scenario below runs in every rank of a fresh process group (``spawn``) and returns what the
test compares; the single-process reference runs in the test's own process.
"""

from __future__ import annotations

import datetime
import functools
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import random_model, tiny_config
from longctx.cache import GlobalCache
from longctx.distributed import ContextParallelError, shard_bounds
from longctx.generate import prefill
from longctx.offload import CacheError, OffloadPolicy
from longctx.sparse import SparseDecode, read_share

TIMEOUT_S = 6  # the process group's timeout in the fault scenarios


def test_shards_are_contiguous_chunk_aligned_and_cover_the_context():
    for tokens in range(1, 80):
        for world in (1, 2, 3, 4):
            bounds = shard_bounds(tokens, world, 5)
            if -(-tokens // 5) < world:
                assert bounds is None
                continue
            assert bounds[0][0] == 0 and bounds[-1][1] == tokens
            assert all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:]))
            assert all(a % 5 == 0 and b > a for a, b in bounds)


# ---- ranks ---------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, folder: str, scenario: str, timeout_s: float, backend: str) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{folder}/rendezvous",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        with torch.inference_mode():
            result = SCENARIOS[scenario](rank, world, folder)
    except Exception as e:
        result = {"error": type(e).__name__, "message": str(e), "elapsed": time.perf_counter() - t0}
        result["trace"] = traceback.format_exc()
    torch.save(result, f"{folder}/rank{rank}.pt")
    os._exit(0)  # no teardown: a peer may be gone, and destroy_process_group would wait for it


def spawn(
    world: int, scenario: str, tmp_path, timeout_s: float = 60, wait_s: float = 120, needed=None, backend: str = "gloo"
) -> list[dict]:
    """Run ``scenario`` on ``world`` ranks of ``backend``; each rank's result (or error, or None)
    in rank order. Waits for the ``needed`` ranks (default all), then kills what is left."""
    ctx = mp.get_context("spawn")
    args = [(r, world, str(tmp_path), scenario, timeout_s, backend) for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=a) for a in args]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    for r in range(world) if needed is None else needed:
        procs[r].join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    return [torch.load(tmp_path / f"rank{r}.pt") if (tmp_path / f"rank{r}.pt").exists() else None for r in range(world)]


def _ok(results: list[dict]) -> None:
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('trace')}"


# ---- equality with one process ---------------------------------------------------------------
# (context tokens, batch, kind): a context that ends mid-chunk (53 = 10 chunks of 5 and 3), one
# on a chunk boundary, one too short to shard (all of it on the last rank), a batch of 2, global
# KV on the CPU and disk tiers of each rank, and sparse decode that selects every page (exact).
CASES = [(53, 1, None), (60, 1, None), (8, 1, None), (37, 2, None), (71, 1, "tiers"), (47, 1, "sparse")]
DECODE = 32


def _policy(kind, folder):
    if kind is None:
        return None
    return OffloadPolicy(segment_tokens=4, device_bytes=0, cpu_bytes=1536, disk_dir=folder)


def _sparse(kind, top_pages: int = 1000):
    return SparseDecode(top_pages=top_pages, page_tokens=3) if kind == "sparse" else None


def _inputs(n: int, batch: int):
    g = torch.Generator().manual_seed(n)
    return torch.randint(3, 97, (batch, n), generator=g), torch.randint(3, 97, (DECODE, batch), generator=g)


def run_case(model, case, context_parallel, folder, top_pages: int = 1000):
    """Prefill (chunks of 7) then DECODE fed tokens, with attention recorded after the prefill:
    logits (1 + DECODE, B, V), the attention mass (B, length), this rank's KV per tier, and the
    share of the KV that decode read."""
    n, batch, kind = case
    tokens, feed = _inputs(n, batch)
    policy, sparse = _policy(kind if kind == "tiers" else None, folder), _sparse(kind, top_pages)
    cache = model.new_cache(batch, offload=policy, sparse=sparse, context_parallel=context_parallel)
    logits = [prefill(model, tokens, cache, chunk_size=7, progress=False)]
    cache.record_attention()
    fork = cache.fork()  # decoding into a fork leaves the prefilled cache as it was
    for t in feed:
        logits.append(model(t[:, None], fork)[:, -1].float())
    tiers = [layer.tier_bytes() for layer in fork.layers if isinstance(layer, GlobalCache)]
    tiers = {t: sum(b[t] for b in tiers) for t in tiers[0]}  # global layers' KV only
    out = {"logits": torch.stack(logits), "mass": fork.attention_mass(), "tiers": tiers, "n": cache.length}
    return {**out, "read": read_share(fork)}


def _equal(rank, world, folder):
    model = random_model(tiny_config())
    few = run_case(model, (95, 1, "sparse"), True, folder, top_pages=2)  # each rank: its best 2 pages
    return [run_case(model, case, True, f"{folder}/disk{rank}") for case in CASES] + [few]


def _equal_cuda(rank, world, folder):
    model = random_model(tiny_config()).to(f"cuda:{rank}")
    return [
        {k: v.cpu() if torch.is_tensor(v) else v for k, v in run_case(model, case, True, folder).items()}
        for case in CASES
    ]


GPUS = torch.cuda.device_count()


@pytest.mark.parametrize(
    "world, backend",
    [
        (2, "gloo"),
        (3, "gloo"),
        pytest.param(1, "nccl", marks=pytest.mark.skipif(GPUS < 1, reason="needs a GPU")),
        pytest.param(2, "nccl", marks=pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")),
    ],
)
def test_ranks_equal_one_process(world, backend, tmp_path, one_thread):
    """Prefill logits, 32 decoded steps' logits and the attention mass equal the single-process
    run to fp32 rounding, on every rank; the global KV is split over the ranks. NCCL: the same
    code on GPU ranks (only the backend and the device differ)."""
    results = spawn(world, "equal" if backend == "gloo" else "equal_cuda", tmp_path, backend=backend)
    _ok(results)
    model = random_model(tiny_config()).to("cuda" if backend == "nccl" else "cpu")
    with torch.inference_mode():
        refs = [run_case(model, case, False, str(tmp_path / "ref")) for case in CASES]
        refs = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in ref.items()} for ref in refs]
    few = [r.pop() for r in results]  # sparse decode reading a few pages of each rank's shard
    assert all(torch.equal(got["logits"], few[0]["logits"]) for got in few)
    assert few[0]["read"] == few[-1]["read"] < 0.8
    for case, ref, *ranks in zip(CASES, refs, *results):
        for r, got in enumerate(ranks):
            torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=2e-5, msg=f"{case} rank {r}")
            torch.testing.assert_close(got["mass"], ref["mass"], rtol=1e-5, atol=1e-5, msg=f"{case} rank {r}")
            assert got["n"] == ref["n"] == case[0]
        # Every rank ends with the same bits (the same merge order everywhere).
        assert all(torch.equal(got["logits"], ranks[0]["logits"]) for got in ranks)
        held = [sum(got["tiers"].values()) for got in ranks]
        assert sum(held) == sum(ref["tiers"].values())  # every global key is held once
        assert all(got["read"] == 1.0 for got in ranks) and ref["read"] == 1.0
        if case[2] == "tiers":
            assert all(got["tiers"]["disk"] > 0 and got["tiers"]["cpu"] > 0 for got in ranks)


# ---- faults ----------------------------------------------------------------------------------
def _prefilled(rank, folder):
    model = random_model(tiny_config())
    tokens, _ = _inputs(53, 1)
    cache = model.new_cache(context_parallel=True)
    logits = prefill(model, tokens, cache)
    return model, cache, logits


def _fault(rank, world, folder, kill: bool):
    """Rank 1 dies (``kill``) or hangs between two decode steps; rank 0 runs the next step."""
    model, cache, logits = _prefilled(rank, folder)
    dist.barrier()
    if rank == 1 and kill:
        os._exit(1)
    if rank == 1:
        time.sleep(10 * TIMEOUT_S)  # alive, but never joins the next step
    t0 = time.perf_counter()
    try:
        model(logits.argmax(-1)[:, None], cache)
    except ContextParallelError as e:
        return {"raised": str(e), "after": time.perf_counter() - t0}
    return {"raised": None}


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_rank_is_an_error_within_the_timeout(fault, tmp_path):
    results = spawn(2, fault, tmp_path, timeout_s=TIMEOUT_S, wait_s=4 * TIMEOUT_S + 30, needed=[0])
    survivor = results[0]
    assert survivor is not None and "error" not in survivor, survivor
    assert survivor["raised"] and "rank 0 of 2" in survivor["raised"], survivor
    assert survivor["after"] < TIMEOUT_S + 5


def _mismatch(rank, world, folder):
    model = random_model(tiny_config(), seed=rank if "model" in folder else 0)
    tokens, _ = _inputs(53, 1)
    if rank == 1 and "tokens" in folder:
        tokens[0, 7] += 1
    cache = model.new_cache(context_parallel=True)
    try:
        prefill(model, tokens, cache)
    except ContextParallelError as e:
        return {"raised": str(e), "length": cache.length, "tiers": cache.tier_bytes()}
    return {"raised": None}


@pytest.mark.parametrize("what", ["tokens", "model"])
def test_different_tokens_or_model_on_one_rank_are_refused_before_prefill(what, tmp_path):
    folder = tmp_path / what
    folder.mkdir()
    results = spawn(2, "mismatch", folder)
    _ok(results)
    wanted = "token ids" if what == "tokens" else "model fingerprint"
    for res in results:  # every rank refuses, none hangs, nothing was prefilled
        assert res["raised"] and wanted in res["raised"] and "rank 1" in res["raised"], res
        assert res["length"] == 0 and sum(res["tiers"].values()) == 0


def _no_room(rank, world, folder):
    model = random_model(tiny_config())
    tokens, _ = _inputs(53, 1)
    policy = OffloadPolicy(segment_tokens=4, device_bytes=0, cpu_bytes=0) if rank == 1 else None
    cache = model.new_cache(offload=policy, context_parallel=True)
    try:
        prefill(model, tokens, cache)
    except CacheError as e:
        return {"raised": str(e), "length": cache.length}
    return {"raised": None}


def test_a_rank_without_room_is_an_error_on_every_rank_before_prefill(tmp_path):
    results = spawn(2, "no_room", tmp_path)
    _ok(results)
    assert "disk_dir is not set" in results[1]["raised"]  # its own reason
    assert "rank 1 of 2 has no room" in results[0]["raised"]
    assert results[0]["length"] == results[1]["length"] == 0


def test_without_a_process_group_or_with_a_bad_argument_it_is_refused():
    model = random_model(tiny_config())
    with pytest.raises(ContextParallelError, match="init_process_group"):
        model.new_cache(context_parallel=True)
    with pytest.raises(TypeError, match="context_parallel must be"):
        model.new_cache(context_parallel="yes")


# ---- the embedded model through Session, niah.run and the CLI ---------------------------------
DOCS = Path(__file__).resolve().parents[1] / "examples" / "batch" / "docs"
WHICH = "Which document mentions the special magic number for pilot-9?"


def _answers(context_parallel) -> dict:
    """A NIAH cell at 8K (``niah.run``) and a which-document question over a corpus, with the
    answer's citations, on the embedded model."""
    import longctx
    from longctx.tasks import niah

    model = longctx.load_model()
    cell = niah.run(
        model, lengths=[8192], depths=[0.4], samples=1, progress=False, context_parallel=context_parallel
    ).records[0]
    session = longctx.Session(model, longctx.ingest([DOCS]), progress=False, context_parallel=context_parallel)
    a = session.ask(WHICH)
    return {
        "niah": (cell["answer"], cell["exact"]),
        "which": a.text,
        "citations": [(c.title, c.share) for c in a.citations],
    }


def _session(rank, world, folder):
    return _answers(True)


def test_session_and_niah_under_two_ranks_answer_as_one_process(tmp_path, one_thread):
    results = spawn(2, "session", tmp_path, wait_s=300)
    _ok(results)
    with torch.inference_mode():
        ref = _answers(False)
    assert ref["niah"][1]  # the embedded model finds this needle: the comparison means something
    for got in results:
        assert got["niah"] == ref["niah"] and got["which"] == ref["which"]
        assert [t for t, _ in got["citations"]] == [t for t, _ in ref["citations"]]
        for (_, share), (_, want) in zip(got["citations"], ref["citations"]):
            assert share == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_cli_ask_under_torchrun_prints_one_answer_as_one_process(tmp_path):
    ask = ["-m", "longctx.cli", "ask", str(DOCS), "-q", WHICH, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *ask], capture_output=True, text=True, env=env, timeout=120)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*run, *ask, "--context-parallel"], capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    lines = two.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 alone prints
    got, want = json.loads(lines[0]), json.loads(one.stdout)
    assert got["answer"] == want["answer"]
    assert [c["title"] for c in got["citations"]] == [c["title"] for c in want["citations"]]
    # Without torchrun the flag is a one-line usage error.
    alone = subprocess.run([sys.executable, *ask, "--context-parallel"], capture_output=True, text=True, env=env)
    assert alone.returncode == 2 and "torchrun" in alone.stderr


SCENARIOS = {
    "equal": _equal,
    "equal_cuda": _equal_cuda,
    "killed": functools.partial(_fault, kill=True),
    "hung": functools.partial(_fault, kill=False),
    "mismatch": _mismatch,
    "session": _session,
    "no_room": _no_room,
}
