"""RSS growth of `ingest` over a folder of many small files (issue 26: bounded folder walks).

    python benchmarks/ingest_many_files.py --files 100000

Writes the files (about 60 bytes each, all different, 100 per subfolder) under a temporary
folder in /tmp, ingests the folder in a fresh subprocess and reports that process's resident
memory (VmRSS) before and after, its peak (VmHWM), and the UTF-8 bytes of text the corpus
holds (which any corpus must keep), then deletes the files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
from longctx.text.ingest import ingest
before = kib("VmRSS:")
t0 = time.perf_counter()
corpus = ingest(sys.argv[1], progress=False)
seconds = time.perf_counter() - t0
print(json.dumps({"documents": len(corpus), "text_bytes": sum(len(d.text.encode()) for d in corpus),
                  "rss_before_kib": before, "rss_after_kib": kib("VmRSS:"), "peak_kib": kib("VmHWM:"),
                  "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="longctx-many-files-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        for i in range(args.files):
            sub = root / f"d{i // 100:05d}"
            if i % 100 == 0:
                sub.mkdir()
            (sub / f"f{i:06d}.txt").write_text(f"Document number {i} says that item {i * 7919 % 100003} is here.\n")
        written = time.perf_counter() - t0
        out = subprocess.run([sys.executable, "-c", CHILD, str(root)], check=True, capture_output=True, text=True)
        result = json.loads(out.stdout)
        result.update(files=args.files, write_seconds=written)
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
