"""Needle-in-a-haystack benchmark: a depth × length grid on the embedded model or a checkpoint.

    python benchmarks/niah.py                                   # embedded model: 1k,2k,4k x 5 depths x 2
    python benchmarks/niah.py --task multi_key --lengths 1k,8k,32k --depths 0,.5,1 --samples 3
    python benchmarks/niah.py --model /path/to/Llama-4-Scout --device cuda --lengths 128k,1m
    python benchmarks/niah.py --compare-reuse --record benchmarks/results   # prefix reuse vs none

Writes <out>/<task>.jsonl (one line per cell; a rerun resumes) and <out>/<task>.png, prints the
table and the effective length. Same as `longctx niah ...`; the code is `longctx.cli.niah_main`.
"""

import sys

from longctx.cli import niah_main

if __name__ == "__main__":
    sys.exit(niah_main())
