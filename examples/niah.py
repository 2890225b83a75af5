"""Needle-in-a-haystack from Python (as in a notebook): the embedded model, three lengths.

The questions are the embedded model's own task ("What is the special magic number for
<key>?" about a needle hidden in English prose); it answers nothing else.

    python examples/niah.py
"""

import torch

from longctx import load_model, niah
from longctx.generate import default_threads

model = load_model()  # the embedded default model, offline
# One CPU thread for a small model: more only wait on each other (longctx.generate.default_threads).
if threads := default_threads(model):
    torch.set_num_threads(threads)
res = niah.run(
    model, task="single", lengths=[1024, 2048, 4096], depths=[0, 0.5, 1], samples=2, out="niah_example/single.jsonl"
)  # rerun: finished cells are skipped
print(res.table())
eff = res.effective_length(0.9)
print("effective length:", eff["effective_length"], "tokens")
for row in eff["per_length"]:
    lo, hi = row["ci95"]
    print(f"  {row['length']:>6}: {row['accuracy']:.0%} (95 % CI {lo:.0%}-{hi:.0%}, n={row['n']})")
fig = res.heatmap("niah_example/single.png")  # a matplotlib Figure; in a notebook it shows itself
print("heatmap: niah_example/single.png")
