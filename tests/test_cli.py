"""The `longctx` command: info, ask, batch, niah, and clear errors."""

from __future__ import annotations

import argparse
import json

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
    for bad in ("0,1.5", "0,x"):
        with pytest.raises(argparse.ArgumentTypeError, match="depths"):
            parse_depths(bad)


def test_info_memory_plan_for_scout(capsys):
    assert main(["info", "--preset", "scout", "--context", "1m"]) == 0
    out = capsys.readouterr().out
    assert "107,769,861,120" in out
    assert "48.00 GiB" in out  # 12 global layers x 8 KV heads x 128 x 2 (K, V) x 2 B x 2^20 tokens


def test_ask_prints_answer_and_citations(ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("The river runs to the sea. " * 20)
    (tmp_path / "b.md").write_text("# Peaks\n\nMountains rise above the clouds. " * 5)
    rc = main(["ask", str(tmp_path / "a.txt"), str(tmp_path / "b.md"), "-q", "Where does the river run?",
               "-q", "What rises?", "--model", str(ckpt), "--max-new-tokens", "4"])
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
    jobs.write_text(json.dumps({"id": "j", "corpus": str(tmp_path / "docs"), "questions": ["Fruit?", "Colour?"]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(jobs), "--out", str(out), "--model", str(ckpt), "--max-new-tokens", "3"]) == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [(r["job"], r["id"], r["error"]) for r in recs] == [("j", "0", None), ("j", "1", None)]


def test_info_units_and_missing_default(capsys, monkeypatch, tmp_path):
    assert main(["info", "--preset", "tiny", "--context", "32k"]) == 0
    out = capsys.readouterr().out
    assert "4.00 MiB" in out  # 1 global layer x 2 KV heads x 16 x 2 (K, V) x 2 B x 32768 tokens
    monkeypatch.setattr("longctx.checkpoint.DEFAULT_MODEL", tmp_path / "absent")
    assert main(["info"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_ask_session_folder_is_made_once_then_reused(ckpt, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("The river runs to the sea. " * 20)
    args = [str(tmp_path / "a.txt"), "-q", "Where?", "--model", str(ckpt), "--max-new-tokens", "4",
            "--session", str(tmp_path / "sess")]
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
    notebook-style example, as scripts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "answers.jsonl"
    run = subprocess.run([sys.executable, str(root / "examples" / "batch_job.py"), "--model", str(ckpt), "--out",
                          str(out), "--max-new-tokens", "3"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [(r["job"], r["error"] is None) for r in recs] == [("all-reports", True)] * 3 + [("two-files", True)] * 2 \
        + [("missing-corpus", False)]
    run = subprocess.run([sys.executable, str(root / "examples" / "qa_notebook.py"), "--model", str(ckpt)],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("Q: ") == 2 and "reloaded:" in run.stdout
