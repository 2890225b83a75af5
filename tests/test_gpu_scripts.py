"""The GPU session's scripts, checked on CPU: a GPU is lent only some of the time, and a broken
command found then wastes the few minutes it is lent for.

* ``benchmarks/scout_int4.py`` at the tiny scale: the model it builds (bytes per part equal the
  memory plan's; no full-precision expert tensor), the bytes a decode token reads, and a whole
  run in a subprocess writing its record and its ``gpu.jsonl`` line;
* ``benchmarks/gpu_record.py``: the lines it appends;
* ``benchmarks/gpu_session.sh``: valid bash, and every command its dry run prints names an
  existing script or test file and only flags that script accepts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scout_int4  # noqa: E402

import gpu_record  # noqa: E402
from longctx import memory  # noqa: E402
from longctx.moe import Experts  # noqa: E402

TINY = [
    "--device",
    "cpu",
    "--preset",
    "tiny",
    "--layers",
    "1",
    "--group-size",
    "32",
    "--lengths",
    "24,40",
    "--chunk",
    "16",
    "--decode-extra",
    "4",
    "--decode-steps",
    "2",
    "--warmup-steps",
    "1",
    "--moe-reps",
    "1",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def tiny():
    cfg = scout_int4.config("tiny", 1)
    return cfg, scout_int4.build(cfg, "int4", 32, torch.bfloat16, torch.device("cpu"))


def test_built_model_is_quantized_from_the_start_and_matches_the_memory_plan(tiny):
    cfg, model = tiny
    assert not any(isinstance(m, Experts) for m in model.modules())  # no full-precision experts
    ex = model.layers[0].feed_forward.experts
    assert ex.gate_up_q.dtype == torch.int32 and ex.gate_up_scale.dtype == torch.bfloat16
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    plan = memory.memory_plan(cfg, "int4", context=0, group_size=32, dtype=torch.bfloat16)
    assert scout_int4.weight_bytes(model) == plan.weights
    # The int4 words are random bits: every value -8..7 occurs, and scales give weights of ~0.02.
    w = ex.dequantize(torch.float32)[0]
    values = torch.unique(torch.round(w / w.abs().max() * 8))
    assert len(values) >= 14 and 0.005 < float(w.std()) < 0.05
    assert set(model.layers[0].input_layernorm.weight.tolist()) == {1.0}


def test_decode_read_bytes_counted_by_hand(tiny):
    cfg, model = tiny
    d, E, I, V = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size, cfg.vocab_size
    hd, bf16 = cfg.head_dim, 2
    assert (d, E, I, V, hd) == (64, 4, 64, 512, 16)
    # int4 with group 32: 8 values per int32 word, one bf16 scale per 32 inputs.
    int4 = lambda n, k: n * k // 2 + n * (k // 32) * bf16  # noqa: E731
    expert = int4(2 * I, d) + int4(d, I)  # gate_up and down of the one routed expert
    shared = int4(I, d) * 2 + int4(d, I)
    attention = (cfg.num_attention_heads * hd * d * 2 + cfg.num_key_value_heads * hd * d * 2) * bf16
    router, norms, head, embedding_row = E * d * bf16, 3 * d * bf16, V * d * bf16, d * bf16
    parts = scout_int4.weight_bytes(model)
    assert parts["experts"] == E * expert
    assert (
        scout_int4.decode_read_bytes(model, parts)
        == expert + shared + attention + router + norms + head + embedding_row
    )


def test_moe_kernel_check_and_pass_through_the_triton_kernel(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton kernel on CPU, as the GPU runs it
    cfg = scout_int4.config("tiny", 1)
    model = scout_int4.build(cfg, "int4", 32, torch.float32, torch.device("cpu"))
    assert scout_int4.kernel_error(model) < 1e-5  # fp32: the kernel equals the reference to rounding
    ms, kernel_ms, nbytes = scout_int4.moe_pass_ms(model, reps=1)
    ex = model.layers[0].feed_forward.experts
    one_expert = sum(t[0].numel() * t[0].element_size() for t in ex.buffers())
    shared = sum(t.numel() * t.element_size() for t in model.layers[0].feed_forward.shared_expert.buffers())
    assert ms > 0 and kernel_ms is None and nbytes == one_expert + shared  # kernel time: CUDA only


def test_token_counts_and_bandwidth():
    assert [scout_int4.tokens(t) for t in ("8k", "32K", "1m", "300")] == [8192, 32768, 1 << 20, 300]
    with pytest.raises(ValueError, match="'8kb'"):
        scout_int4.tokens("8kb")
    assert scout_int4.bandwidth_for(torch.device("cpu"), 4.8e12) == (4.8e12, "--bandwidth")
    bw, source = scout_int4.bandwidth_for(torch.device("cpu"), None)
    assert bw == 3.35e12 and "not known" in source
    assert scout_int4.parse([]).lengths == [8192, 32768]


def test_scout_int4_tiny_run_writes_its_record_and_a_jsonl_line(tmp_path):
    env = {**os.environ, "GPU_COMMIT": "abc1234"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scout_int4.py"), *TINY, "--record", "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [line] = (tmp_path / "gpu.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert list(entry) == ["date", "device", "torch", "triton", "commit", "name", "figures", "command"]
    assert entry["name"] == "scout_int4_tiny_l1" and entry["commit"] == "abc1234"
    assert entry["device"].startswith("CPU") and entry["torch"] == torch.__version__
    assert "--results" in entry["command"]
    fig = entry["figures"]
    assert "error" not in fig and fig["logits_finite"] and fig["kernel_ok"]
    assert fig["weight_bytes_total"] == fig["plan_weight_bytes"] == sum(fig["weight_bytes"].values())
    assert set(fig["prefill_tok_s"]) == {"24", "40"} and all(v > 0 for v in fig["prefill_tok_s"].values())
    assert fig["decode_context"] == 44 and len(fig["decode_ms_all"]) == 2 and fig["decode_ms"] > 0
    s = fig["decode_ms"] / 1e3
    assert math.isclose(fig["hbm_fraction"], fig["decode_read_bytes"] / (s * fig["bandwidth"]))
    assert "peak_bytes" not in fig and "kv_tokens_fit" not in fig  # CPU: no device memory to measure
    record = tmp_path / "scout_int4_tiny_l1-cpu-x86-64.md"
    if not record.exists():  # another architecture's name
        [record] = tmp_path.glob("scout_int4_tiny_l1-cpu-*.md")
    text = record.read_text()
    assert "| prefill 40 tokens |" in text and "decode at 44 tokens" in text
    assert "summary: " in out.stdout


def test_a_failed_run_still_records_what_it_measured(tmp_path):
    # An int4 group of 7 does not divide the tiny model's widths: the build phase fails.
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "scout_int4.py"),
            *TINY,
            "--group-size",
            "7",
            "--record",
            "--results",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "group_size=7" in out.stderr
    [entry] = gpu_record.read(tmp_path, "scout_int4_tiny_l1")
    fig = entry["figures"]
    assert fig["error"].startswith("build: ValueError: layers.0.feed_forward.experts: group_size=7")
    assert fig["config"]["group_size"] == 7 and "prefill_tok_s" not in fig
    assert "| stopped | build: ValueError" in next(tmp_path.glob("*.md")).read_text()


def test_a_run_cut_by_sigterm_records_the_phases_before(tmp_path):
    # What `timeout` does at a step's limit: SIGTERM while decoding (here: an endless decode).
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "scout_int4.py"),
        *TINY,
        "--decode-steps",
        "1000000",
        "--record",
        "--results",
        str(tmp_path),
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as p:
        for line in p.stdout:
            if line.startswith("--- decode"):
                time.sleep(0.5)
                p.terminate()
                break
        rest = p.stdout.read()
        assert p.wait(timeout=60) == 1
    [entry] = gpu_record.read(tmp_path, "scout_int4_tiny_l1")
    fig = entry["figures"]
    assert fig["error"] == "decode: Stopped: SIGTERM (time limit)"
    assert set(fig["prefill_tok_s"]) == {"24", "40"} and "decode_ms" not in fig
    assert "| prefill 40 tokens |" in rest and "recorded" in rest


def test_gpu_record_appends_lines_and_keeps_json_strict(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_COMMIT", "deadbee")
    a = gpu_record.append(
        "one",
        {"ms": 1.5, "bad": float("nan"), "nested": {"t": (1, float("inf"))}},
        command="python x.py",
        results=tmp_path / "sub",
    )
    gpu_record.append("two", {"ms": 2}, command="python y.py", results=tmp_path / "sub")
    rows = gpu_record.read(tmp_path / "sub")
    assert [r["name"] for r in rows] == ["one", "two"] and rows[0] == a
    assert rows[0]["figures"] == {"ms": 1.5, "bad": None, "nested": {"t": [1, None]}}
    assert rows[0]["commit"] == "deadbee" and rows[0]["command"] == "python x.py"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", rows[0]["date"])
    assert gpu_record.read(tmp_path / "sub", "two")[0]["figures"] == {"ms": 2}
    assert gpu_record.read(tmp_path / "none") == []
    with pytest.raises(TypeError, match="'three'"):
        gpu_record.append("three", {"x": object()}, results=tmp_path / "sub")
    assert len(gpu_record.read(tmp_path / "sub")) == 2  # nothing half-written


def test_commit_from_git_when_not_given(monkeypatch):
    monkeypatch.delenv("GPU_COMMIT", raising=False)
    c = gpu_record.commit()
    if c is not None:  # None in a copy without git history
        assert re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", c)


ALL_STEPS = "quanttests scout tests cpnccl attention16k decode1m long tune attention decode"


def dry_run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_SESSION_DRY": "1", "PY": sys.executable, "OUT": str(tmp_path / "out")}
    return subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_gpu_session_is_valid_bash_and_its_default_fits_a_call(tmp_path):
    subprocess.run(["bash", "-n", "benchmarks/gpu_session.sh"], cwd=ROOT, check=True)
    out = dry_run(tmp_path)
    assert out.returncode == 0, out.stderr
    steps = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("DRY ")]
    assert steps == ["quanttests", "scout", "tests", "cpnccl", "attention16k", "decode1m", "long"]
    summary = out.stdout.split("=== summary", 1)[1]
    assert "quanttests" in summary and "would-be-skipped" in summary  # 560 s cannot hold every limit
    assert not (tmp_path / "out" / "session.tgz").exists()  # a dry run packs nothing
    assert not (ROOT / "longctx" / "kernels").is_symlink()  # nor links anything into the tree


def test_every_command_of_the_gpu_session_exists_with_its_flags(tmp_path):
    link = ROOT / "longctx" / "kernels"
    existed = link.exists()
    out = dry_run(tmp_path, "100000", ALL_STEPS)
    assert out.returncode == 0, out.stderr
    assert link.exists() == existed
    commands = {}
    for line in out.stdout.splitlines():
        if line.startswith("DRY "):
            _, name, limit, rest = line.split(" ", 3)
            assert int(limit) >= 10, line
            commands[name] = shlex.split(rest)
    assert set(commands) >= set(ALL_STEPS.split()) and len(commands) == 12
    helps: dict[str, str] = {}
    for name, argv in commands.items():
        assert argv[0] == sys.executable, argv
        if argv[1:3] == ["-m", "pytest"]:
            files = [a for a in argv if a.endswith(".py")]
            assert files and all((ROOT / f).is_file() for f in files), (name, files)
            continue
        script = argv[1]
        assert (ROOT / script).is_file(), (name, script)
        if script not in helps:
            h = subprocess.run(
                [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
            )
            assert h.returncode == 0, h.stderr
            helps[script] = h.stdout
        flags = [a.split("=")[0] for a in argv[2:] if a.startswith("--")]
        unknown = [f for f in flags if not re.search(re.escape(f) + r"\b", helps[script])]
        assert not unknown, f"{name}: {script} has no {unknown}"
    scout_int4.parse(commands["scout"][2:])  # and its values parse too
