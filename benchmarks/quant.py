"""Weight-only int8 / int4: next-token agreement and CPU decode speed (issue 25, bars 2 and 5).

1. Agreement: the embedded model (fp32) against itself quantized int8 (per channel) and int4
   (group 64: 128 does not divide its expert width 192), next-token top-1 over every position of
   haystack text (``niah.make_haystack("english")``, several seeds); bar >= 99 % int8, >= 90 % int4.
2. Speed: a Scout-shaped but narrow random model in bf16 (hidden 1024, 16 experts, top-1, shared
   expert) as bf16 / int8 / int4 (group 128), decode ms/token after a short prefill and prefill
   tokens/s, the three models timed in alternating rounds on ``--threads`` threads.

    python benchmarks/quant.py --threads 2 --record
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from longctx import load_model, quant
from longctx.config import ModelConfig
from longctx.model import Model
from longctx.tasks import niah
from records import write_record

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def agreement(tokens_per_text: int, seeds: list[int]) -> dict[str, tuple[int, int]]:
    base = load_model()
    models = {
        "int8": quant.quantize(copy.deepcopy(base), "int8"),
        "int4": quant.quantize(copy.deepcopy(base), "int4", group_size=64),
    }
    hits = {k: [0, 0] for k in models}
    for seed in seeds:
        ids = niah.make_haystack(base.tokenizer, "english", min_tokens=tokens_per_text, seed=seed).ids
        tokens = torch.as_tensor(ids[:tokens_per_text], dtype=torch.int64)[None]
        ref = base(tokens).argmax(-1)
        for name, m in models.items():
            top = m(tokens).argmax(-1)
            hits[name][0] += int((top == ref).sum())
            hits[name][1] += ref.numel()
    return {k: tuple(v) for k, v in hits.items()}


def narrow_scout(layers: int) -> ModelConfig:
    base = ModelConfig.preset("scout")
    return ModelConfig(
        **{
            **base.__dict__,
            "vocab_size": 8192,
            "hidden_size": 1024,
            "num_hidden_layers": layers,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "intermediate_size": 1536,
            "intermediate_size_mlp": 3072,
            "moe_layers": None,
            "no_rope_layers": [],
        }
    )


@torch.no_grad()
def speed(layers: int, prefill_tokens: int, steps: int, rounds: int) -> dict[str, dict[str, float]]:
    cfg = narrow_scout(layers)
    torch.manual_seed(0)
    base = Model(cfg)
    for p in base.parameters():
        p.normal_(0, 0.02)
    base = base.to(torch.bfloat16).eval()
    models = {
        "bf16": base,
        "int8": quant.quantize(copy.deepcopy(base), "int8"),
        "int4": quant.quantize(copy.deepcopy(base), "int4", group_size=128),
    }
    prompt = torch.randint(0, cfg.vocab_size, (1, prefill_tokens), generator=torch.Generator().manual_seed(1))
    times = {k: {"decode": [], "prefill": []} for k in models}
    for r in range(rounds + 1):  # round 0 warms up (and builds the packed CPU layouts)
        for name, m in models.items():
            cache = m.new_cache()
            t0 = time.perf_counter()
            logits = m(prompt, cache, last_only=True)
            t1 = time.perf_counter()
            tok = logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            for _ in range(steps):
                tok = m(tok, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            t3 = time.perf_counter()
            if r:
                times[name]["prefill"].append(prefill_tokens / (t1 - t0))
                times[name]["decode"].append((t3 - t2) / steps * 1e3)
    return {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per haystack text (agreement)")
    ap.add_argument("--seeds", type=int, default=4, help="haystack texts (agreement)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    agree = agreement(args.tokens, list(range(1, args.seeds + 1)))
    for k, (h, n) in agree.items():
        print(f"agreement {k}: {h}/{n} = {100 * h / n:.2f} %")
    sp = speed(args.layers, args.prefill, args.steps, args.rounds)
    for k, v in sp.items():
        print(f"{k}: decode {v['decode']:.2f} ms/token, prefill {v['prefill']:.0f} tokens/s")
    if not args.record:
        return
    bf = sp["bf16"]
    body = [
        "## Next-token top-1 agreement with the unquantized embedded model",
        "",
        "| scheme | agree / positions | agreement | bar |",
        "|---|---|---|---|",
    ]
    bars = {"int8": 99.0, "int4": 90.0}
    for k, (h, n) in agree.items():
        body.append(f"| {k} | {h} / {n} | {100 * h / n:.2f} % | >= {bars[k]:.0f} % |")
    body += [
        "",
        f"## CPU speed, narrow Scout shape ({args.layers} layers, hidden 1024, 16 experts top-1 + shared "
        f"expert, expert width 1536, bf16 activations)",
        "",
        "| weights | decode ms/token | vs bf16 | prefill tokens/s | vs bf16 |",
        "|---|---|---|---|---|",
    ]
    for k, v in sp.items():
        body.append(
            f"| {k} | {v['decode']:.2f} | {v['decode'] / bf['decode']:.2f}x | {v['prefill']:.0f} | "
            f"{v['prefill'] / bf['prefill']:.2f}x |"
        )
    facts = [
        f"torch {torch.__version__}, {args.threads} threads",
        f"agreement: embedded model fp32, {args.seeds} haystack texts (english, seeds 1-{args.seeds}) of "
        f"{args.tokens} tokens, every position; int8 per channel, int4 group 64, attention unquantized",
        f"speed: medians of {args.rounds} alternating rounds after a warm-up round; decode = {args.steps} steps "
        f"after a {args.prefill}-token prefill; int4 group 128; 'auto' paths (torch's packed CPU ops for "
        "1-16 rows, dequantize + bf16 matmul above)",
    ]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    path = write_record(
        RESULTS,
        f"quant_cpu_t{args.threads}",
        "Weight-only int8 / int4: agreement and CPU speed",
        command,
        facts,
        body,
        threads=args.threads,
    )
    print(f"recorded {path}")


if __name__ == "__main__":
    main()
