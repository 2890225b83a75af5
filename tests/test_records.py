"""A benchmark has one current record: a rerun replaces it (git keeps the earlier ones)."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

# write_record is benchmark code: it lives in benchmarks/, beside the scripts that use it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from records import write_record  # noqa: E402


def test_a_rerun_replaces_the_record_of_its_name(tmp_path):
    day = datetime.date.today().isoformat()
    res = tmp_path / "res"
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG first")
    first = write_record(res, "bench", "Bench", "python bench.py --x 1", ["model: m"], ["| a |"], png=png)
    assert first == res / "bench.md"
    text = first.read_text()
    assert text.startswith(f"# Bench ({day})\n")  # the date lives inside the file, not in its name
    assert "- device: CPU (" in text and "- command: `python bench.py --x 1`" in text and "- model: m" in text
    assert "![Bench](bench.png)" in text and (res / "bench.png").read_bytes() == png.read_bytes()

    png.write_bytes(b"\x89PNG second")
    second = write_record(res, "bench", "Bench", "python bench.py --x 2", [], ["| b |"], png=png)
    assert second == first and sorted(p.name for p in res.iterdir()) == ["bench.md", "bench.png"]
    text = second.read_text()
    assert "--x 2" in text and "| b |" in text and "--x 1" not in text and "| a |" not in text
    assert (res / "bench.png").read_bytes() == b"\x89PNG second"


def test_a_rerun_without_a_picture_leaves_no_stale_picture(tmp_path):
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG")
    write_record(tmp_path, "bench", "Bench", "python bench.py", [], [], png=png)
    path = write_record(tmp_path, "bench", "Bench", "python bench.py --no-plot", [], [], threads=7)
    assert not (tmp_path / "bench.png").exists()
    text = path.read_text()
    assert "7 threads" in text and "![" not in text


def test_another_configuration_keeps_its_own_record(tmp_path):
    seg4k = write_record(tmp_path, "decode_cpu_seg4096", "Decode", "python decode.py --segment-tokens 4096", [], ["4k"])
    seg16k = write_record(tmp_path, "decode_cpu_seg16384", "Decode", "python decode.py", [], ["16k"])
    assert seg4k != seg16k and seg4k.read_text().endswith("4k\n") and seg16k.read_text().endswith("16k\n")
