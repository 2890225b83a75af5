"""Needle-in-a-haystack: generators, scoring, resume, prefix reuse, heatmap, CLI on a checkpoint."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from longctx import niah
from longctx.cache import token_hash
from longctx.tasks import needles
from longctx.text.ingest import ingest
from longctx.text.prompt import NOT_STATED

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("task", niah.TASKS)
def test_generator_is_deterministic_exact_length_and_places_the_needle(tok, task):
    hay = niah.make_haystack(tok, "english", 2000, seed=3)
    for length, depth in ((300, 0.0), (700, 0.5), (1500, 1.0)):
        a = niah.make_cell(tok, task, length, depth, 0, 7, hay)
        b = niah.make_cell(tok, task, length, depth, 0, 7, niah.make_haystack(tok, "english", 2000, seed=3))
        assert a.prompt == b.prompt and a.needles == b.needles
        assert len(a.prompt) == length
        # For chunked local layers (chunk 32) the same cell, its question moved to a chunk start
        # if it would straddle one: newlines between context and question, nothing else changed.
        moved, q_len = (
            niah.make_cell(tok, task, length, depth, 0, 7, hay, chunk=32),
            len(niah.question_suffix(tok, a.question)),
        )
        pad, start = len(moved.prompt) - length, length - q_len
        assert moved.prompt == a.prompt[:start] + tok.encode("\n") * pad + a.prompt[start:]
        assert pad == 0 if start % 32 + q_len <= 32 else (start + pad) % 32 == 0 and pad < q_len
        text = tok.decode(a.prompt)
        if task == "none":
            assert a.needles == [] and "special magic number" not in text.split("\n\n")[1]
            assert a.expected == [NOT_STATED]
            continue
        first = a.needles[0]
        needle_ids = tok.encode(" " + first["text"])
        i = first["token_index"]
        assert a.prompt[i : i + len(needle_ids)] == needle_ids  # the recorded index is exact
        head = len(niah.context_prefix(tok, []))
        context_len = length - head - len(niah.question_suffix(tok, a.question))
        before = sum(len(tok.encode(" " + n["text"])) for n in a.needles if n["token_index"] < i)
        at = i - head - before  # the needle's place in the haystack stream
        assert abs(at / context_len - depth) < 0.15  # nearest sentence boundary to the requested depth
        assert at in set(hay.bounds.tolist())  # on a sentence boundary
        for n in a.needles:
            assert n["text"] in text
    other = niah.make_cell(tok, task, 700, 0.5, 0, 8, hay)
    assert other.prompt != niah.make_cell(tok, task, 700, 0.5, 0, 7, hay).prompt


def test_multi_needle_tasks_hold_what_they_promise(tok):
    hay = niah.make_haystack(tok, "noise", 3000)
    mk = niah.make_cell(tok, "multi_key", 1000, 0.3, 0, 0, hay)
    assert len(mk.needles) == 4 and len({n["text"].split(" is:")[0] for n in mk.needles}) == 4
    mv = niah.make_cell(tok, "multi_value", 1000, 0.3, 0, 0, hay)
    assert len(mv.expected) == 3 and all(v in tok.decode(mv.prompt) for v in mv.expected)
    mq = niah.make_cell(tok, "multi_query", 1000, 0.3, 0, 0, hay)
    assert " and " in mq.question and len(mq.expected) == 2


def test_open_keys_are_held_out_words_and_the_default(tok, model):
    """``keys="open"``: every task's needles and question use eval-split open keys (no word a
    training key holds), the same for a seed; it is the default, cell for cell."""
    hay = niah.make_haystack(tok, "english", 2000, seed=3)
    for task in niah.TASKS:
        plain = niah.make_cell(tok, task, 700, 0.5, 0, 7, hay, keys="vocab")
        cell = niah.make_cell(tok, task, 700, 0.5, 0, 7, hay)
        assert cell.prompt == niah.make_cell(tok, task, 700, 0.5, 0, 7, hay, keys="open").prompt
        assert cell.prompt != plain.prompt and len(cell.prompt) == 700
        asked = re.fullmatch(r"What (?:is|are) the special magic numbers? for (.+)\?", cell.question).group(1)
        for key in asked.split(" and "):
            words = needles.key_words(key)
            assert words and {needles.word_split(w) for w in words} == {"eval"}
            assert key not in plain.question
            if task != "none":
                assert any(
                    n["text"].startswith(f"One of the special magic numbers for {key} is: ") for n in cell.needles
                )
    res = niah.run(model, task="single", lengths=[200], depths=[0.5], samples=2, keys="open", progress=False)
    assert all(needles.key_words(r["question"].split(" for ")[1][:-1]) for r in res.records)
    with pytest.raises(ValueError, match="keys"):
        niah.run(model, keys="words", lengths=[200], depths=[0.5], progress=False)


def test_scoring_accepts_extra_words():
    assert niah.score("1234567", ["1234567"]) == (True, True)
    assert niah.score("The special magic number is 1234567.", ["1234567"]) == (False, True)
    assert niah.score("1234568", ["1234567"]) == (False, False)
    assert niah.score("It is not stated in the text.", [NOT_STATED]) == (False, True)
    assert niah.score("7654321, 1234567", ["7654321", "1234567"]) == (True, True)
    assert niah.score("only 7654321", ["7654321", "1234567"])[1] is False
    # Whole words only: a longer number that contains the value is a miss.
    assert niah.score("12345678", ["1234567"]) == (False, False)
    assert niah.score("The answer: 1234567!", ["1234567"]) == (False, True)
    assert niah.score("NOT STATED.", [NOT_STATED]) == (False, True)
    # Multi-value needles have no order; multi-query answers follow the question's order.
    assert niah.score("3000000, 1000000, 2000000", ["1000000", "2000000", "3000000"], ordered=False) == (True, True)
    assert niah.score("2000000, 1000000", ["1000000", "2000000"]) == (False, True)


def test_wilson_interval():
    lo, hi = niah.wilson(9, 10)
    assert 0.59 < lo < 0.6 and 0.98 < hi < 0.99  # the textbook values for 9/10
    assert niah.wilson(0, 0) == (0.0, 1.0)


def test_prefix_reuse_gives_the_same_answers(model):
    kw = dict(
        task="multi_key", lengths=[200, 320], depths=[0, 0.5, 1], samples=1, seed=1, progress=False, max_new_tokens=4
    )
    a = niah.run(model, reuse_prefix=True, **kw)
    b = niah.run(model, reuse_prefix=False, **kw)
    key = lambda r: (r["length"], r["depth"])  # noqa: E731
    assert [(key(r), r["answer"]) for r in sorted(a.records, key=key)] == [
        (key(r), r["answer"]) for r in sorted(b.records, key=key)
    ]
    assert sum(r["new_prefill_tokens"] for r in a.records) < sum(r["new_prefill_tokens"] for r in b.records)


def test_prefix_forks_prefill_each_shared_prefix_once(model):
    """Every prompt comes out once with a cache that, continued with its rest, gives the same
    last logits as a full forward; shared prefixes are prefilled once (duplicates and a prompt
    that is a prefix of another included)."""
    g = torch.Generator().manual_seed(0)
    trunk = torch.randint(0, 1000, (90,), generator=g).tolist()
    branch = torch.randint(0, 1000, (40,), generator=g).tolist()
    prompts = [
        trunk + branch + [5, 6],
        trunk + branch + [5, 7, 8],
        trunk[:50] + [9] * 20,
        trunk + branch,
        trunk + branch + [5, 6],
        [3, 4],
        trunk[:70],
    ]
    seen, fed = [], 0
    for i, cache, rest, shared, _ in niah.prefix_forks(model, prompts, chunk_size=16):
        assert rest and cache.length + len(rest) == len(prompts[i])
        with torch.no_grad():
            got = model(torch.tensor([rest]), cache, last_only=True)[0, -1]
            want = model(torch.tensor([prompts[i]]))[0, -1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        seen.append(i)
        fed += shared + len(rest)
    assert sorted(seen) == list(range(len(prompts)))
    distinct = len({tuple(p[:j]) for p in prompts for j in range(1, len(p) + 1)})  # prefix-tree nodes
    assert fed <= distinct + len(prompts)  # each node once, plus at most one token kept back per prompt
    assert fed < sum(map(len, prompts)) // 2
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        next(niah.prefix_forks(model, [[1, 2], []]))


def test_resume_skips_finished_cells_and_redoes_changed_ones(model, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    kw = dict(
        task="single", lengths=[200, 260], depths=[0, 1], samples=1, seed=2, progress=False, max_new_tokens=3, out=out
    )
    first = niah.run(model, **kw)
    assert len(out.read_text().splitlines()) == 4
    calls = []
    real = niah.generate
    monkeypatch.setattr(niah, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = niah.run(model, **kw)
    assert calls == [] and len(again.records) == 4
    assert sorted(r["hash"] for r in again.records) == sorted(r["hash"] for r in first.records)
    # A torn last line (crash mid-write) is cut off and that cell recomputed.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    niah.run(model, **kw)
    assert len(calls) == 1 and out.read_text().splitlines()[:3] == lines[:3]
    # Another haystack: different content hashes, so every cell runs again.
    calls.clear()
    niah.run(model, **{**kw, "haystack": "noise"})
    assert len(calls) == 4
    # Another needle (seed changes the needles): recomputed too.
    calls.clear()
    niah.run(model, **{**kw, "seed": 3})
    assert len(calls) == 4
    recs = [json.loads(l) for l in out.read_text().splitlines()]  # every line parses: the torn one was cut
    assert len(recs) == 3 + 1 + 4 + 4  # nothing else lost
    # A longer length added to the grid: only its cells run (the shorter cells are identical,
    # although the haystack stream behind them is now longer).
    calls.clear()
    grown = niah.run(model, **{**kw, "lengths": [200, 260, 330]})
    assert len(calls) == 2 and len(grown.records) == 6
    # Other generation settings: a different cell.
    calls.clear()
    niah.run(model, **{**kw, "max_new_tokens": 2})
    assert len(calls) == 4
    # The file alone redraws the results (one record per hash; the torn line is skipped).
    loaded = niah.Results.from_jsonl(out, task="single")
    assert len(loaded.records) == len({r["hash"] for r in loaded.records}) == 3 + 1 + 4 + 4 + 2 + 4
    assert niah.Results.from_jsonl(out, task="none").records == []


def test_stored_hashes_keep_their_format():
    """Results files resume on stored hashes: the prompt digest is ``token_hash`` (SHA-256 of the
    ids as little-endian int64, as ``prompt_sha256`` always was), and a cell's content hash is
    the value older files hold."""
    prompt = [1, 2, 3, 70000, 5, 6, 7, 8]
    assert (
        token_hash([prompt])[0]
        == hashlib.sha256(np.asarray(prompt, dtype="<i8").tobytes()).hexdigest()
        == "a80a32183bcf44679253a115f8bf95e8e437bb8633ee0bef6e86d19af2e9a998"
    )
    cell = niah.Cell(
        "single",
        8,
        0.5,
        0,
        prompt,
        "What is the key?",
        ["1234567"],
        [{"text": "The key is 1234567.", "token_index": 3, "doc": None, "page": None}],
        "ab" * 32,
    )
    assert (
        niah.cell_hash(cell, ("m" * 64, "t" * 64), 7, {"max_new_tokens": 4, "greedy": True})
        == "250a7b4ec2e1f0434339fbbc9f30b70ba547b71fc0ceab90deb585afff214123"
    )


def test_results_table_effective_length_and_heatmap(tmp_path):
    recs = [
        {"length": L, "depth": d, "substring": ok, "exact": ok}
        for L, oks in ((1024, [1, 1, 1, 1]), (2048, [1, 1, 1, 0]), (4096, [0, 0, 1, 0]))
        for d, ok in zip((0.0, 0.5, 1.0, 1.0), oks)
    ]
    res = niah.Results(recs)
    eff = res.effective_length(0.75)
    assert eff["effective_length"] == 2048
    assert eff["effective_length_lower"] == 0  # 4/4 has a Wilson lower bound of 0.51 < 0.75
    big = niah.Results([{"length": 1024, "depth": 0.0, "substring": True}] * 40).effective_length(0.9)
    assert big["effective_length_lower"] == 1024 and big["per_length"][0]["ci95"][0] > 0.9
    assert [p["accuracy"] for p in eff["per_length"]] == [1.0, 0.75, 0.25]
    assert "1k" in res.table() and "100%" in res.table()
    fig = res.heatmap(tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.axes


def test_corpus_haystack_records_provenance(tok, model):
    corpus = ingest(
        [
            ("Alpha", "The first document talks about rivers. " * 30),
            ("Beta", "The second one is about mountains. " * 30),
        ]
    )
    hay = niah.make_haystack(tok, corpus)
    probe = niah.make_cell(tok, "single", 300, 0.0, 0, 0, hay)
    length = len(hay.ids) + len(probe.prompt) - _room(tok, probe, 300)
    assert niah.make_cell(tok, "single", length, 0.1, 0, 0, hay).needles[0]["doc"] == "Alpha"
    assert niah.make_cell(tok, "single", length, 0.9, 0, 0, hay).needles[0]["doc"] == "Beta"
    # Needles go inside document text only, never into the <document ...> delimiters.
    spans = [(s.start, s.end) for s in hay.packed.spans]
    assert all(any(a <= b < e for a, e in spans) for b in hay.bounds.tolist())
    for depth in np.linspace(0, 1, 11):
        cell = niah.make_cell(tok, "multi_key", length, float(depth), 0, 0, hay)
        assert all(n["doc"] in ("Alpha", "Beta") for n in cell.needles)


def _room(tok, cell, length):
    """Haystack tokens in a cell of `length` (prompt minus template, question and needles)."""
    return (
        length
        - len(niah.context_prefix(tok, []))
        - len(niah.question_suffix(tok, cell.question))
        - sum(len(tok.encode(" " + n["text"])) for n in cell.needles)
    )


def _benchmark_script(monkeypatch):
    """benchmarks/niah.py as a module, with benchmarks/ on sys.path as when run as a script."""
    folder = Path(__file__).parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("niah_benchmark", folder / "niah.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_runs_on_a_transformers_checkpoint(tmp_path, tok, monkeypatch):
    """Bar 4: `longctx niah` and the benchmark script on a real checkpoint folder (written by
    transformers)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.Llama4ForCausalLM(
        transformers.Llama4TextConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=32,
            intermediate_size_mlp=32,
            num_local_experts=2,
            attention_chunk_size=64,
            floor_scale=32,
            no_rope_layer_interval=2,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eot_id,
            pad_token_id=tok.pad_id,
        )
    )
    hf.save_pretrained(tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt" / "tokenizer.model")
    from longctx.cli import main

    rc = main(
        [
            "niah",
            "--model",
            str(tmp_path / "ckpt"),
            "--lengths",
            "200,300",
            "--depths",
            "0,1",
            "--samples",
            "1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    lines = (tmp_path / "out" / "single.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all("substring" in json.loads(l) for l in lines)
    assert (tmp_path / "out" / "single.png").exists()
    bench = _benchmark_script(monkeypatch).main
    # Prefix reuse vs none on the same checkpoint, recorded with device, command and numbers.
    rec = tmp_path / "rec"
    rc = bench(
        [
            "--model",
            str(tmp_path / "ckpt"),
            "--lengths",
            "200,300",
            "--depths",
            "0,0.5,1",
            "--samples",
            "1",
            "--compare-reuse",
            "--record",
            str(rec),
            "--threads",
            "1",
        ]
    )
    assert rc == 0  # 0 only when both modes gave the same answers
    text = (rec / "niah_prefix_reuse_200-300.md").read_text()
    assert "same answers: True" in text and "speed-up" in text and "device:" in text and "--compare-reuse" in text
    grid = [
        "--model",
        str(tmp_path / "ckpt"),
        "--lengths",
        "200",
        "--depths",
        "0,1",
        "--samples",
        "1",
        "--record",
        str(rec),
    ]
    rc = bench([*grid, "--out", str(tmp_path / "out")])
    first = rec / "niah_single_200.md"
    assert rc == 0 and (rec / "niah_single_200.png").exists()
    text = first.read_text()
    assert "![NIAH single](niah_single_200.png)" in text and "effective length" in text and "out2" not in text
    # A rerun of the configuration replaces its record (git keeps the earlier one).
    rc = bench([*grid, "--out", str(tmp_path / "out2")])
    assert rc == 0 and "out2" in first.read_text()
    assert sorted(p.name for p in rec.iterdir()) == [
        "niah_prefix_reuse_200-300.md",
        "niah_single_200.md",
        "niah_single_200.png",
    ]
    # Vocab keys vs open keys on the same grid, with the routing: exit code 0 only without a
    # routing collapse, as the record says.
    rc = bench([*grid[:-2], "--compare-keys", "--record", str(rec), "--out", str(tmp_path / "out3")])
    text = (rec / "niah_keys_single_200.md").read_text()
    assert "| vocab |" in text and "| open |" in text and "busiest share" in text
    assert rc == (0 if "RoutingCollapse warnings: none" in text else 1)
    assert {p.name for p in (tmp_path / "out3").iterdir()} == {"single_vocab.jsonl", "single_open.jsonl"}
