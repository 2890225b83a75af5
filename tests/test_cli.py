"""The `longctx` command: info, ask, batch, niah, and clear errors."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from conftest import text_model
from longctx.checkpoint import save_model
from longctx.cli import main, parse_depths, parse_length, parse_lengths
from longctx.text.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = Tokenizer.default()
    return save_model(text_model(tok), tmp_path_factory.mktemp("ckpt"), tokenizer=tok)


def test_parse_length():
    assert [parse_length(s) for s in ("500", "32k", "1m", "1.5k")] == [500, 32768, 1 << 20, 1536]
    assert parse_lengths("1k,500") == [1024, 500] and parse_depths("0,.5,1") == [0.0, 0.5, 1.0]
    # A list with any value above 1 is in percent (needlehaystack's convention).
    assert parse_depths("0,50,100") == parse_depths("0,.5,1") and parse_depths("25") == [0.25]
    assert parse_depths("1") == [1.0]  # all values <= 1: fractions
    for bad in ("0,150", "0,x", "-0.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="depths"):
            parse_depths(bad)


def test_info_memory_plan_for_scout(capsys):
    assert main(["info", "--preset", "scout", "--context", "1m"]) == 0
    out = capsys.readouterr().out
    assert "107,769,861,120" in out
    # 12 global layers x 8 KV heads x 128 x 2 (K, V) x 2 B = 48 KiB a token: 48 GiB at 2^20 tokens,
    # plus 36 chunked layers x 8,192 tokens x 4 KiB = 1.125 GiB.
    assert "KV per token         48.00 KiB" in out and "KV at context        49.12 GiB" in out


def test_ask_prints_answer_and_citations(ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("The river runs to the sea. " * 20)
    (tmp_path / "b.md").write_text("# Peaks\n\nMountains rise above the clouds. " * 5)
    rc = main(
        [
            "ask",
            str(tmp_path / "a.txt"),
            str(tmp_path / "b.md"),
            "-q",
            "Where does the river run?",
            "-q",
            "What rises?",
            "--model",
            str(ckpt),
            "--max-new-tokens",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and out.count("Q: ") == 2 and out.count("A: ") == 2
    assert "Peaks" in out and "a" in out


def test_ask_missing_file_is_a_clear_error(ckpt, tmp_path, capsys):
    rc = main(["ask", str(tmp_path / "nope.txt"), "-q", "?", "--model", str(ckpt)])
    assert rc == 2 and "nope.txt" in capsys.readouterr().err


def test_batch_command(ckpt, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.txt").write_text("Some text about apples. " * 10)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"id": "j", "corpus": str(tmp_path / "docs"), "questions": ["Fruit?", "Colour?"]}) + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(jobs), "--out", str(out), "--model", str(ckpt), "--max-new-tokens", "3"]) == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [(r["job"], r["id"], r["error"]) for r in recs] == [("j", "0", None), ("j", "1", None)]


def test_info_units_and_missing_default(capsys, monkeypatch, tmp_path):
    assert main(["info", "--preset", "tiny", "--context", "32k"]) == 0
    out = capsys.readouterr().out
    # 1 global layer x 2 KV heads x 16 x 2 (K, V) x 2 B x 32768 tokens = 4 MiB, plus 3 chunked
    # layers x 32 tokens x 128 B = 12 KiB.
    assert "KV per token             128 B" in out and "KV at context         4.01 MiB" in out
    monkeypatch.setattr("longctx.checkpoint.DEFAULT_MODEL", tmp_path / "absent")
    assert main(["info"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_ask_session_folder_is_made_once_then_reused(ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("The river runs to the sea. " * 20)
    args = [
        str(tmp_path / "a.txt"),
        "-q",
        "Where?",
        "--model",
        str(ckpt),
        "--max-new-tokens",
        "4",
        "--session",
        str(tmp_path / "sess"),
    ]
    assert main(["ask", *args]) == 0
    first = capsys.readouterr()
    assert "saved the prefilled session" in first.err
    assert main(["ask", *args]) == 0
    second = capsys.readouterr()
    assert "loaded from" in second.err and second.out == first.out
    (tmp_path / "a.txt").write_text("Now the file says something else. " * 20)
    assert main(["ask", *args]) == 2
    assert "other documents" in capsys.readouterr().err


def test_ask_corpus_too_long_is_a_clear_error(ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("The river runs to the sea. " * 200)
    rc = main(["ask", str(tmp_path / "a.txt"), "-q", "?", "--model", str(ckpt), "--max-context", "500"])
    assert rc == 2 and "does not fit the context of 500 tokens" in capsys.readouterr().err


def test_niah_is_a_subcommand_with_its_own_help_and_one_line_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["niah", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "longctx niah" in out and "--lengths" in out and "--compare-reuse" not in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "niah" in capsys.readouterr().out
    assert main(["niah", "--model", str(tmp_path / "absent"), "--lengths", "200"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longctx niah: ") and "absent" in err and len(err.strip().splitlines()) == 1


def test_cuda_device_under_torchrun_is_the_local_rank(monkeypatch):
    from longctx.cli import _device

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert (_device("cuda"), _device("cuda:0"), _device("cpu")) == ("cuda:3", "cuda:0", "cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert _device("cuda") == "cuda"


def test_examples_run_on_a_checkpoint(ckpt, tmp_path):
    """examples/batch_job.py on its jobs file (relative corpus paths, an error job) and the
    notebook-style example, as scripts. (What the embedded model answers there is checked by
    running them with it; this random checkpoint only checks they run.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "answers.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "batch_job.py"),
            "--model",
            str(ckpt),
            "--out",
            str(out),
            "--max-new-tokens",
            "3",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [(r["job"], r["error"] is None) for r in recs] == [("all-reports", True)] * 3 + [("two-files", True)] * 2 + [
        ("missing-corpus", False)
    ]
    run = subprocess.run(
        [sys.executable, str(root / "examples" / "qa_notebook.py"), "--model", str(ckpt)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("Q: ") == 3 and "reloaded:" in run.stdout  # two asked, one streamed


# ---- one error style, options, --json, streaming, batch status ----------------------------

BAD_INPUTS = [  # (argv, the argument the message must name); {tmp}: a folder with doc.txt and jobs.jsonl
    (["niah", "--lengths", "foo"], "--lengths"),
    (["niah", "--lengths", "1k,-2"], "--lengths"),
    (["niah", "--depths", "abc"], "--depths"),
    (["niah", "--depths", "0,150"], "--depths"),
    (["niah", "--haystack", "{tmp}/absent"], "--haystack"),
    (["niah", "--model", "{tmp}/absent", "--lengths", "200"], "--model"),
    (["niah", "--samples", "0"], "--samples"),
    (["niah", "--chunk-size", "0"], "--chunk-size"),
    (["niah", "--threads", "0"], "--threads"),
    (["niah", "--task", "nope"], "--task"),
    (["info", "--context", "-5"], "--context"),
    (["info", "--model", "{tmp}/absent"], "--model"),
    (["ask", "{tmp}/doc.txt", "-q", "hi", "--model", "{tmp}/absent"], "--model"),
    (["ask", "{tmp}/doc.txt", "-q", "  "], "--question"),
    (["ask", "{tmp}/doc.txt", "-q", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["ask", "{tmp}/doc.txt", "-q", "hi", "--chunk-size", "0"], "--chunk-size"),
    (["ask", "{tmp}/doc.txt", "-q", "hi", "--overflow", "cut"], "--overflow"),
    (["ask", "{tmp}/doc.txt", "-q", "hi", "--temperature", "-1"], "--temperature"),
    (["ask", "{tmp}/doc.txt", "-q", "hi", "--seed", "x"], "--seed"),
    (["ask", "{tmp}/doc.txt", "-q", "hi", "--max-context", "0"], "--max-context"),
    (["batch", "{tmp}/absent.jsonl", "--out", "{tmp}/out.jsonl"], "jobs"),
    (["batch", "{tmp}/jobs.jsonl", "--out", "{tmp}/out.jsonl", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["batch", "{tmp}/jobs.jsonl"], "--out"),
    (["nope"], "command"),
]


@pytest.mark.parametrize("argv, names", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_argument_and_exit_2(argv, names, tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("Some text. " * 5)
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"corpus": "doc.txt", "questions": ["?"]}) + "\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    cmd = "longctx" if argv[0] == "nope" else f"longctx {argv[0]}"
    assert len(lines) == 1 and lines[0].startswith(f"{cmd}: ") and names in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_every_option_of_every_command_has_help_and_threads():
    from longctx.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert sorted(commands) == ["ask", "batch", "compare", "info", "niah"]
    for name, p in commands.items():
        options = {o for a in p._actions for o in a.option_strings}
        assert "--threads" in options, name
        for a in p._actions:
            assert a.help and a.help != argparse.SUPPRESS, (name, a.dest)
    assert {"--seed", "--temperature", "--overflow", "--json"} <= {
        o for a in commands["ask"]._actions for o in a.option_strings
    }
    assert "percent" in commands["niah"].format_help()


def test_version(capsys):
    from longctx import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"longctx {__version__}"


def test_ask_json_is_one_object_per_question_and_equals_the_streamed_text(ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("The river runs to the sea. " * 20)
    (tmp_path / "b.md").write_text("# Peaks\n\nMountains rise above the clouds. " * 5)
    args = [
        "ask",
        str(tmp_path / "a.txt"),
        str(tmp_path / "b.md"),
        "-q",
        "Where does the river run?",
        "-q",
        "What rises?",
        "--model",
        str(ckpt),
        "--max-new-tokens",
        "12",
        "--citations",
        "2",
    ]
    assert main([*args, "--json"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["question"] for r in recs] == ["Where does the river run?", "What rises?"]
    for r in recs:
        assert set(r) >= {"answer", "citations", "tokens", "seconds", "stopped"}
        assert len(r["citations"]) == 2 and {"doc_id", "title", "share"} <= set(r["citations"][0])
        assert r["tokens"]["answer"] <= 12 and r["tokens"]["corpus"] > 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert [line[3:] for line in out.splitlines() if line.startswith("A: ")] == [r["answer"] for r in recs]


def test_ask_seed_makes_sampling_reproducible_and_overflow_drops(ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("The river runs to the sea. " * 20)
    (tmp_path / "b.txt").write_text("The lake is still. " * 200)
    sampled = [
        "ask",
        str(tmp_path / "a.txt"),
        "-q",
        "Where?",
        "--model",
        str(ckpt),
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
        "--seed",
        "7",
        "--json",
    ]
    assert main(sampled) == 0
    first = json.loads(capsys.readouterr().out)["answer"]
    assert main(sampled) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == first
    too_long = [
        "ask",
        str(tmp_path / "a.txt"),
        str(tmp_path / "b.txt"),
        "-q",
        "Where?",
        "--model",
        str(ckpt),
        "--max-new-tokens",
        "4",
        "--max-context",
        "400",
    ]
    assert main(too_long) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "--overflow" in err
    assert main([*too_long, "--overflow", "drop"]) == 0
    assert "left out 1 documents: b" in capsys.readouterr().err


def test_batch_exit_status_and_summary(ckpt, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.txt").write_text("Some text about apples. " * 10)
    good = json.dumps({"id": "j", "corpus": "docs", "questions": ["Fruit?", "Colour?"]})
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(good + "\n")
    argv = ["batch", str(jobs), "--model", str(ckpt), "--max-new-tokens", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "ok.jsonl")]) == 0
    assert capsys.readouterr().err.strip() == f"longctx batch: 2 answered, 0 failed (see {tmp_path / 'ok.jsonl'})"
    jobs.write_text(good + "\n" + json.dumps({"id": "bad", "corpus": "absent", "questions": ["?"]}) + "\n{oops\n")
    assert main([*argv, "--out", str(tmp_path / "mixed.jsonl")]) == 1
    assert capsys.readouterr().err.strip() == f"longctx batch: 2 answered, 2 failed (see {tmp_path / 'mixed.jsonl'})"


def test_threads_auto_is_one_for_a_small_model_and_a_number_is_kept(ckpt, tmp_path, monkeypatch, capsys):
    import torch

    from longctx.cli import set_threads
    from longctx.generate import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "a.txt").write_text("The river runs to the sea. " * 5)
    args = ["ask", str(tmp_path / "a.txt"), "-q", "Where?", "--model", str(ckpt), "--max-new-tokens", "2"]
    torch.set_num_threads(2)
    assert main(args) == 0 and torch.get_num_threads() == 1  # auto: the model is small
    assert main([*args, "--threads", "2"]) == 0 and torch.get_num_threads() == 2
    set_threads(1)
    assert torch.get_num_threads() == 1
    capsys.readouterr()
    from longctx.checkpoint import load_model

    model = load_model(ckpt)
    assert default_threads(model) == 1 and default_threads(None) is None
    gen_module = sys.modules["longctx.generate"]  # `longctx.generate` the attribute is the function
    monkeypatch.setattr(gen_module, "SMALL_MODEL_PARAMETERS", 10)
    assert default_threads(model) is None  # a big model: torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(gen_module, "SMALL_MODEL_PARAMETERS", 10**9)
    assert default_threads(model) is None  # the user's OMP_NUM_THREADS is kept


def test_info_prints_the_quantized_memory_plan(capsys):
    """`longctx info` prints memory.memory_plan (whose figures test_memory_plan checks against the
    config): Scout int4 is the 58.8 GiB the issue states; an 80 GiB card keeps ~417K tokens."""
    assert main(["info", "--preset", "scout", "--quantize", "int4", "--context", "10m", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "weights              58.79 GiB" in out and "int4 (group 128)" in out
    assert "KV per token         48.00 KiB  in 12 global layers" in out
    assert "-> 416,838 tokens of KV" in out
    assert main(["info", "--preset", "scout"]) == 0
    assert "(107,769,861,120 parameters)" in capsys.readouterr().out


@pytest.mark.parametrize("size", ["8XB", "-1GiB", "0"])
def test_info_refuses_a_bad_memory_size(capsys, size):
    assert main(["info", "--preset", "tiny", "--gpu-memory", size]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longctx info: argument --gpu-memory:") and "\n" not in err


def test_ask_sparse_pages_covering_every_page_answers_as_exact(ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("The river runs to the sea. " * 60)
    args = [
        "ask",
        str(tmp_path / "a.txt"),
        "-q",
        "Where does the river run?",
        "--model",
        str(ckpt),
        "--max-new-tokens",
        "6",
        "--json",
    ]
    assert main(args) == 0
    exact = json.loads(capsys.readouterr().out)
    assert main([*args, "--sparse-pages", "1000"]) == 0  # more pages than the context has: exact attention
    sparse = json.loads(capsys.readouterr().out)
    assert sparse["answer"] == exact["answer"] and sparse["citations"] == exact["citations"]
    assert main([*args, "--sparse-pages", "0"]) == 2
    assert "--sparse-pages" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::longctx.monitor_report.RoutingCollapse")  # a random model's routing
def test_stats_writes_the_monitor_report_for_ask_batch_and_niah(ckpt, tmp_path):
    """``--stats PATH`` on ask, batch and niah: a JSON report whose expert counts add up to the
    tokens the run forwarded (times top_k), per MoE layer, with prefill and decode timed."""
    doc = tmp_path / "a.txt"
    doc.write_text("The river runs to the sea. " * 30)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "j", "corpus": str(doc), "questions": ["Where does it run?"]}) + "\n")
    runs = {
        "ask": ["ask", str(doc), "-q", "Where does the river run?", "--max-new-tokens", "4"],
        "batch": ["batch", str(jobs), "--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4", "--no-progress"],
        "niah": ["niah", "--lengths", "300", "--depths", "0.5", "--samples", "1", "--out", str(tmp_path / "niah")],
    }
    for cmd, argv in runs.items():
        path = tmp_path / f"{cmd}.json"
        rc = main([*argv, "--model", str(ckpt), "--stats", str(path)])
        rep = json.loads(path.read_text())
        assert rc == 0 and {"prefill", "decode"} <= set(rep["phases"]), cmd
        tokens = sum(p["tokens"] for p in rep["phases"].values())
        assert rep["experts"] and all(sum(e["counts"]) == tokens * e["top_k"] for e in rep["experts"]), cmd
        assert rep["kv_bytes"]["device"] > 0 and rep["steps"], cmd
        assert not path.with_name(path.name + ".tmp").exists()


def test_stats_are_written_when_the_run_fails_part_way_and_a_bad_path_is_refused(ckpt, tmp_path, capsys):
    doc = tmp_path / "a.txt"
    doc.write_text("The river runs to the sea. " * 200)
    path = tmp_path / "stats.json"
    # The corpus is truncated to fill the context, so the question no longer fits: QAError after the prefill.
    argv = ["ask", str(doc), "-q", "Where?", "--model", str(ckpt), "--max-context", "256", "--overflow", "truncate"]
    assert main([*argv, "--stats", str(path)]) == 2
    rep = json.loads(path.read_text())
    assert "does not fit" in capsys.readouterr().err
    assert rep["phases"]["prefill"]["tokens"] > 200 and "decode" not in rep["phases"]
    for bad, why in ((tmp_path / "no" / "s.json", "no folder"), (tmp_path, "is a folder")):
        assert main([*argv, "--stats", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "--stats" in err and why in err
