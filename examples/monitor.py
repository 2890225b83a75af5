"""Watch a run: expert load, tokens/s as the context grows, KV memory per tier.

    python examples/monitor.py            # writes monitor_example.png when matplotlib is there

The embedded model answers a question over the three reports in ``examples/batch/docs/``
inside a ``Monitor``; the report's summary is printed, its JSON written. (The embedded model
was trained without a load-balancing loss, so expect ``RoutingCollapse`` warnings: most of its
layers send nearly every token to one expert.)
"""

import json
from pathlib import Path

import torch

import longctx
from longctx.generate import default_threads
from longctx.monitor import Monitor

model = longctx.load_model()  # the embedded default model, offline
torch.set_num_threads(default_threads(model) or torch.get_num_threads())  # 1 for a model this small
corpus = longctx.ingest([str(Path(__file__).parent / "batch" / "docs")])

with Monitor(model) as mon:  # hooks on the model while the block runs, removed after
    session = longctx.Session(model, corpus)  # prefill in chunks
    answer = session.ask("Which report mentions the merger?", max_new_tokens=24)  # decode steps

print(answer)
report = mon.report()
print(report.summary())
Path("monitor_example.json").write_text(json.dumps(report.to_dict(), indent=1))
try:
    mon.plot("monitor_example.png")
    print("figure: monitor_example.png")
except ImportError as e:  # matplotlib is the optional `plot` extra
    print(e)
