"""The README's code runs as written, and says what it prints.

Python blocks run in order in one namespace, as a notebook would, inside a temporary folder
that holds what they name: ``reports/`` (two Markdown documents, the needle in one),
``contract.pdf``, ``checkpoints/Llama-4-Scout`` and a Hugging Face cache holding
``meta-llama/Llama-4-Scout-17B-16E-Instruct`` (both a random tiny Llama 4 with the embedded
tokenizer, widths divisible by int4's group of 128). Two substitutions, both stated here:
``device="cuda"`` runs as ``"cpu"`` on a machine without CUDA, and the python blocks run in
torchrun's environment for a world of one rank (what each rank of a context-parallel example
runs); nothing else changes. A line ``print(x)  # -> text`` asserts that ``text`` is what that
print wrote. Shell blocks of ``longctx`` commands run through ``longctx.cli.main`` and
``torchrun`` lines as a subprocess, and must exit 0; the install and test commands are what CI
runs, so they are not rerun here.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from text.text_samples import make_pdf  # tests/text/text_samples.py

from conftest import text_model
from longctx.checkpoint import save_model

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
EXPECT = re.compile(r"^(?P<code>\s*print\(.*\))\s*# -> (?P<want>.+)$")


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


def with_expectations(code: str) -> str:
    """``print(x)  # -> text`` becomes a print that also asserts its own output."""
    out = []
    for line in code.splitlines():
        m = EXPECT.match(line)
        if m is None:
            out.append(line)
            continue
        indent = m["code"][: len(m["code"]) - len(m["code"].lstrip())]
        call = m["code"].strip()
        out.append(f"{indent}_buf = __import__('io').StringIO()")
        out.append(f"{indent}with __import__('contextlib').redirect_stdout(_buf): {call}")
        out.append(f"{indent}assert _buf.getvalue().strip() == {m['want'].strip()!r}, (_buf.getvalue(), {line!r})")
    return "\n".join(out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("readme")
    (root / "reports").mkdir()
    (root / "reports" / "a-harbor.md").write_text(
        "# Tidal Harbor\n\nBoats leave at dawn. One of the special magic numbers for pilot-9 is: 4823917.\n"
    )
    (root / "reports" / "b-orchard.md").write_text(
        "# Golden Orchard\n\nThe apples ripen in late summer and the cider is pressed in October.\n"
    )
    (root / "contract.pdf").write_bytes(make_pdf([["The tenant pays rent on the first day of each month."]]))
    # A random tiny Llama 4 whose widths int4 (group 128) can quantize, with the embedded tokenizer.
    tiny = text_model(tok, hidden_size=128, intermediate_size=128, intermediate_size_mlp=256)
    save_model(tiny, root / "checkpoints" / "Llama-4-Scout", tokenizer=tok)
    snap = root / "hf" / "models--meta-llama--Llama-4-Scout-17B-16E-Instruct" / "snapshots" / "abc123"
    save_model(tiny, snap, tokenizer=tok)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    return root


def test_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 6 and len(blocks("bash")) >= 3


def test_python_blocks_run_in_order_and_print_what_they_say(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_CACHE", str(workdir / "hf"))
    with socket.socket() as s:  # a free port for the world of one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(blocks("python")):
        if not torch.cuda.is_available():
            code = code.replace('device="cuda"', 'device="cpu"')
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(with_expectations(code), f"README.md python block {i + 1}", "exec"), namespace)
    assert (workdir / "checkpoints" / "scout-int4" / "config.json").exists()


def test_cli_blocks_run(workdir, monkeypatch, capsys):
    from longctx.cli import main

    monkeypatch.chdir(workdir)
    (workdir / "jobs.jsonl").write_text(
        '{"id": "j1", "corpus": "reports/", "questions": ["What is the special magic number for pilot-9?"]}\n'
    )
    commands = [line for body in blocks("bash") for line in body.splitlines() if line.startswith("longctx ")]
    assert len(commands) >= 6
    for line in commands:
        assert main(shlex.split(line)[1:]) == 0, (line, capsys.readouterr().err)
    out = capsys.readouterr().out
    assert "A: 4823917" in out and "Tidal Harbor" in out  # the two ask commands
    runs = [line for body in blocks("bash") for line in body.splitlines() if line.startswith("torchrun ")]
    assert runs
    for line in runs:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", *shlex.split(line)[1:]]
        done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, (line, done.stderr[-2000:])
        assert "Tidal Harbor" in done.stdout and done.stdout.count("Q: ") == 1  # rank 0 alone prints
