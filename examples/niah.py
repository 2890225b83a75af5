"""Needle-in-a-haystack from Python (as in a notebook): the embedded model, three lengths.

    python examples/niah.py
"""

from longctx import load_model, niah

model = load_model()  # the embedded default model, offline
res = niah.run(model, task="single", lengths=[1024, 2048, 4096], depths=[0, 0.5, 1], samples=2,
               out="niah_example/single.jsonl")  # rerun: finished cells are skipped
print(res.table())
eff = res.effective_length(0.9)
print("effective length:", eff["effective_length"], "tokens")
for row in eff["per_length"]:
    lo, hi = row["ci95"]
    print(f"  {row['length']:>6}: {row['accuracy']:.0%} (95 % CI {lo:.0%}-{hi:.0%}, n={row['n']})")
print("heatmap:", res.heatmap("niah_example/single.png"))
