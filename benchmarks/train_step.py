"""Time of one training step of the embedded model, by phase (examples/train_tiny_model.py).

Batches as in training (~8K tokens of contexts plus 12 question turns per row) at a few
lengths; times data generation, forward, attention-guidance loss, backward and optimiser step,
averaged over steps after a warm-up step. ``--compare`` also runs the training attention as an
explicit (T, T) masked SDPA (the path before chunked layers were cut into chunk batches) in
the same process, for a before/after figure.

    python benchmarks/train_step.py --lengths 512,2048 --steps 5 --compare --record
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longctx import attention
from longctx.kernels.attention import visibility_mask
from longctx.model import Model
from longctx.tasks import needles
from longctx.text.tokenizer import Tokenizer
from records import write_record

ROOT = Path(__file__).resolve().parents[1]


def masked_attention(q, k, v, start, chunk, scale):
    """The baseline: one explicit (T, T) mask for every layer."""
    T = q.shape[2]
    mask = visibility_mask(start, start + T - 1, start, start + T, True, chunk, q.device)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def time_steps(train, tok, sents, length: int, steps: int, turns: int = 12, tokens: int = 8192) -> dict:
    torch.manual_seed(0)
    model = Model(train.model_config(tok))
    model.train()
    inputs: dict = {}
    for layer in train.GUIDED["local"] + train.GUIDED["global"]:
        model.layers[layer].self_attn.register_forward_pre_hook(
            lambda _m, a, layer=layer: inputs.__setitem__(layer, (a[0], a[2]))
        )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = random.Random(0)
    rows = max(2, tokens // (max(length, 160) + 25 * turns))
    phases = dict.fromkeys(("data", "forward", "guidance", "backward", "optimiser"), 0.0)
    for step in range(steps + 1):  # step 0 warms up
        t = [time.perf_counter()]
        x, y, guide = train.make_batch(tok, rng, length, rows, sents, turns)
        t.append(time.perf_counter())
        loss = train.answer_loss(model, x, y)
        t.append(time.perf_counter())
        aux = train.guidance_loss(model, inputs, guide)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if step:
            for name, a, b in zip(phases, t, t[1:]):
                phases[name] += (b - a) / steps
    return {
        "rows x T": f"{rows} x {x.shape[1]}",
        **{k: round(v, 3) for k, v in phases.items()},
        "step_s": round(sum(phases.values()), 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", action="store_true", help="also time the explicit-mask attention baseline")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("train_tiny_model", ROOT / "examples" / "train_tiny_model.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    tok = Tokenizer.default()
    sents = needles.encoded_sentences(tok)
    variants = {"current": attention.dense_attention}
    if args.compare:
        variants["explicit mask"] = masked_attention
    lines = [
        "| attention | length | rows x T | data | forward | guidance | backward | optimiser | step (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    saved = attention.dense_attention
    try:
        for name, fn in variants.items():
            attention.dense_attention = fn
            for length in (int(x) for x in args.lengths.split(",")):
                r = time_steps(train, tok, sents, length, args.steps)
                lines.append(f"| {name} | {length} | " + " | ".join(str(v) for v in r.values()) + " |")
                print(lines[-1], flush=True)
    finally:
        attention.dense_attention = saved
    if args.record:
        cmd = "python benchmarks/train_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        facts = [f"seconds per phase, mean of {args.steps} steps after one warm-up step"]
        path = write_record(
            ROOT / "benchmarks" / "results", "train_step", "Training step of the embedded model", cmd, facts, lines
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
