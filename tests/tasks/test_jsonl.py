"""The crash-safe JSONL journal: appends, torn-line repair, unreadable lines, rank-file merge."""

from __future__ import annotations

import json

import pytest

from longctx.tasks import jsonl


def key(rec: dict) -> tuple[str, str]:
    return str(rec["job"]), str(rec["id"])


def test_read_keeps_complete_lines_and_repair_cuts_only_the_torn_tail(tmp_path):
    out = tmp_path / "a.jsonl"
    good = [json.dumps({"job": "j", "id": str(i), "answer": "x", "error": None}) for i in range(3)]
    torn = '{"job": "j", "id": "3", "ans'
    out.write_text(good[0] + "\n" + "\x00\x00garbage\n" + good[1] + "\n" + good[2] + "\n" + torn)
    with pytest.warns(UserWarning, match="a.jsonl:2: unreadable"):
        entries = jsonl.read(out, key)
    assert [e.key for e in entries] == [("j", "0"), ("j", "1"), ("j", "2")]
    assert [e.line for e in entries] == good and entries[1].record == json.loads(good[1])
    assert out.read_text().endswith(torn)  # a reader leaves the file alone
    with pytest.warns(UserWarning, match="a.jsonl:2: unreadable"):
        assert [e.key for e in jsonl.read(out, key, repair=True)] == [e.key for e in entries]
    assert out.read_text().endswith(good[2] + "\n")  # only the torn tail was cut
    # A line that parses but has no key is unreadable too; a missing file has no entries.
    out.write_text(good[0] + "\n" + json.dumps({"job": "j"}) + "\n")
    with pytest.warns(UserWarning, match="a.jsonl:2: unreadable"):
        assert [e.key for e in jsonl.read(out, key)] == [("j", "0")]
    assert jsonl.read(tmp_path / "absent.jsonl", key) == []


def test_append_after_repair_starts_a_clean_line(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"job": "j", "id": "0"}) + "\n" + '{"job": "j", "i')
    done = {e.key for e in jsonl.read(out, key, repair=True)}
    with open(out, "a", encoding="utf-8") as fh:
        jsonl.append(fh, {"job": "j", "id": "1", "text": "naïve"})
    assert done == {("j", "0")}
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"job": "j", "id": "0"},
        {"job": "j", "id": "1", "text": "naïve"},
    ]


def test_merge_folds_rank_files_in_order_first_seen_wins(tmp_path):
    out = tmp_path / "out.jsonl"
    line = lambda j, i, a: json.dumps({"job": j, "id": i, "answer": a})  # noqa: E731
    out.write_text(line("a", "0", "own") + "\n")
    jsonl.rank_path(out, 1).write_text(line("b", "0", "r1") + "\n" + line("a", "0", "dup") + "\n")
    jsonl.rank_path(out, 0).write_text(line("a", "1", "r0") + "\n" + line("gone", "0", "old") + "\n")
    assert [p.name for p in jsonl.rank_files(out)] == ["out.jsonl.rank0", "out.jsonl.rank1"]
    lines = [e.line for p in jsonl.rank_files(out) for e in jsonl.read(p, key)]
    jsonl.merge(out, key, lines, order=[("a", "0"), ("a", "1"), ("b", "0"), ("c", "0")])
    got = [(r["job"], r["id"], r["answer"]) for r in map(json.loads, out.read_text().splitlines())]
    # Job order first (the file's own answer wins over a duplicate), then keys the order lacks.
    assert got == [("a", "0", "own"), ("a", "1", "r0"), ("b", "0", "r1"), ("gone", "0", "old")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.rank0", "out.jsonl.rank1"]


def test_parse_names_every_way_a_line_is_bad():
    assert jsonl.parse(b'{"a": 1}\n') == {"a": 1}
    for raw, why in [
        (b'{"a": "caf\xe9"}', r"not UTF-8 \(byte 10: b'\\xe9'\)"),
        (b"[" * 100_000, "nested too deeply"),
        (b"{oops", "not JSON"),
        (b"[1, 2]", "got list"),
    ]:
        with pytest.raises(ValueError, match=why):
            jsonl.parse(raw)


def test_lines_are_read_in_binary_and_an_over_long_one_is_skipped(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b"short\n" + b"x" * 50 + b"\n\xff\xfe\r\n" + b"y" * 30 + b"\nlast")
    assert list(jsonl.lines(path, 20)) == [(1, b"short"), (2, None), (3, b"\xff\xfe"), (4, None), (5, b"last")]
    assert list(jsonl.lines(path, 50))[1] == (2, b"x" * 50)  # exactly max_bytes: kept


def test_read_skips_a_deeply_nested_line_with_a_warning(tmp_path):
    out = tmp_path / "a.jsonl"
    good = json.dumps({"job": "j", "id": "0"})
    out.write_text(good + "\n" + "[" * 100_000 + "\n")
    with pytest.warns(UserWarning, match="a.jsonl:2: unreadable line skipped .*nested too deeply"):
        assert [e.key for e in jsonl.read(out, key)] == [("j", "0")]


def test_locked_refuses_a_second_writer_and_the_lock_dies_with_its_process(tmp_path):
    """flock is per open file: a second ``locked`` refuses at once, even in one process; a
    holder killed with SIGKILL leaves nothing held. Rank files never include the lock file."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "answers.jsonl"
    with jsonl.locked(out) as lock:
        assert lock == tmp_path / "answers.jsonl.lock"
        with pytest.raises(jsonl.LockedError, match=rf"answers.jsonl: another process \(pid {os.getpid()}\)"):
            with jsonl.locked(out):
                pass
    with jsonl.locked(out):  # released on exit
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom longctx.tasks import jsonl\n"
            f"with jsonl.locked({str(out)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(jsonl.LockedError, match=f"pid {holder.pid}"):
            with jsonl.locked(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    t0 = time.monotonic()
    with jsonl.locked(out):  # the kernel dropped the dead holder's lock
        assert time.monotonic() - t0 < 1
    (tmp_path / "answers.jsonl.rank0").write_text("")
    with jsonl.locked(tmp_path / "answers.jsonl.rank0"):
        assert jsonl.rank_files(out) == [tmp_path / "answers.jsonl.rank0"]
