"""Recorded results never overwrite an earlier record of the same day."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

# write_record is benchmark code: it lives in benchmarks/, beside the scripts that use it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from records import write_record  # noqa: E402


def test_a_second_record_of_the_day_gets_its_own_file(tmp_path):
    day = datetime.date.today().isoformat()
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG first")
    first = write_record(tmp_path / "res", "bench", "Bench", "python bench.py --x 1", ["model: m"], ["| a |"], png=png)
    assert first.name == f"bench_{day}.md"
    text = first.read_text()
    assert text.startswith(f"# Bench ({day})\n")
    assert "- device: CPU (" in text and "- command: `python bench.py --x 1`" in text and "- model: m" in text
    assert f"![Bench](bench_{day}.png)" in text and (tmp_path / "res" / f"bench_{day}.png").read_bytes() == png.read_bytes()

    png.write_bytes(b"\x89PNG second")
    second = write_record(tmp_path / "res", "bench", "Bench", "python bench.py --x 2", [], ["| b |"], png=png)
    assert second.name == f"bench_{day}_2.md" and first.read_text() == text
    assert (tmp_path / "res" / f"bench_{day}.png").read_bytes() == b"\x89PNG first"
    assert (tmp_path / "res" / f"bench_{day}_2.png").read_bytes() == b"\x89PNG second"
    # Without a picture, the name only has to be free for the markdown file.
    third = write_record(tmp_path / "res", "bench", "Bench", "python bench.py", [], [], threads=7)
    assert third.name == f"bench_{day}_3.md" and "7 threads" in third.read_text()
