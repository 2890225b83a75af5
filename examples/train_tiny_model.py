"""Train the embedded default model from scratch and write it to longctx/assets/default/.

    python examples/train_tiny_model.py --steps 3000 --threads 2

A Scout-architecture model at small width (chunked-local RoPE layers alternating with global
NoPE layers with temperature tuning, top-1 sigmoid MoE + shared expert) learns to retrieve
facts from long contexts: needle sentences hidden in English text from Python's own
documentation, asked in the prompt layout of ``longctx.prompt``. The attention chunk (32
tokens) is small against the training lengths (128-1024), so most needles can only be reached
through the global layers. Loss is on answer tokens only.

Data is generated on the fly from a seeded RNG: single needles, several needles asked at once,
distractor needles, no-needle contexts (answer "not stated") and which-document questions over
packed documents. The run is deterministic for a given seed, step count and thread count.
At the end it evaluates through the library's own path (chunked prefill + KV cache + greedy
decode) on keys never seen in training and writes the scores to the training card.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from longctx import needles
from longctx.checkpoint import DEFAULT_MODEL, save_model
from longctx.config import ModelConfig
from longctx.documents import ingest
from longctx.generate import generate
from longctx.model import Model
from longctx.prompt import NOT_STATED, answer_ids, context_prefix, question_suffix
from longctx.tokenizer import Tokenizer


def model_config(tok: Tokenizer, chunk: int = 32) -> ModelConfig:
    return ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=192, intermediate_size_mlp=384,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
        no_rope_layer_interval=2,  # layers: chunked, global, chunked, global
        attention_chunk_size=chunk, floor_scale=64, attn_scale=0.1, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=1 << 22, bos_token_id=tok.bos_id, eos_token_id=[tok.eot_id, tok.eom_id],
        pad_token_id=tok.pad_id,
    )


# ---- examples ------------------------------------------------------------------------------


def haystack(rng: random.Random, sents, n_tokens: int) -> list[list[int]]:
    """Consecutive sentences (wrapping around) from a random start, about n_tokens in all."""
    out, total, i = [], 0, rng.randrange(len(sents))
    while total < n_tokens:
        out.append(list(sents[i % len(sents)]))
        total += len(out[-1])
        i += 1
    return out


def needle_example(tok, rng: random.Random, length: int, split: str, kind: str, sents) -> tuple[list[int], list[int], str]:
    """(prompt ids, answer ids, answer text) with the prompt exactly ``length`` tokens long.
    kind: "single" | "multi" (two keys asked) | "distractor" (3 other needles) | "none"."""
    n_needles = {"single": rng.choice([1, 1, 2]), "multi": rng.choice([2, 3]), "distractor": 4, "none": rng.choice([0, 1, 2])}[kind]
    keys = needles.make_keys(rng, n_needles + 1, split)
    values = [needles.make_value(rng) for _ in keys]
    if kind == "multi":
        asked = rng.sample(range(n_needles), 2)
        question = needles.QUESTION_MULTI.format(keys=f"{keys[asked[0]]} and {keys[asked[1]]}")
        answer = f"{values[asked[0]]}, {values[asked[1]]}"
    elif kind == "none":
        question, answer = needles.QUESTION.format(key=keys[-1]), NOT_STATED  # keys[-1] is not in the text
    else:
        i = rng.randrange(n_needles)
        question, answer = needles.QUESTION.format(key=keys[i]), values[i]
    needle_ids = [tok.encode(" " + needles.NEEDLE.format(key=k, value=v)) for k, v in zip(keys[:n_needles], values)]
    suffix = question_suffix(tok, question)
    room = length - len(context_prefix(tok, "")) - len(suffix) - sum(map(len, needle_ids))
    pieces = haystack(rng, sents, room)
    pieces[-1] = pieces[-1][: len(pieces[-1]) - (sum(map(len, pieces)) - room)]  # exactly `room` tokens
    for ids in needle_ids:
        pieces.insert(rng.randrange(len(pieces) + 1), ids)  # at a sentence boundary
    prompt = context_prefix(tok, [t for p in pieces for t in p]) + suffix
    assert len(prompt) == length or room < 0
    return prompt, answer_ids(tok, answer), answer


def document_example(tok, rng: random.Random, length: int, split: str, sents) -> tuple[list[int], list[int], str]:
    """Which-document question over 3-8 packed documents; one of them holds the needle."""
    n_docs = rng.randint(3, 8)
    key, value = needles.make_key(rng, split), needles.make_value(rng)
    titles = [f"{rng.choice(needles._ADJECTIVES).title()} {rng.choice(needles._NOUNS).title()} Report {rng.randint(1, 99)}"
              for _ in range(n_docs)]
    suffix = question_suffix(tok, needles.QUESTION_DOC.format(key=key))
    per_doc = max(8, (length - len(suffix) - 20 * n_docs) // n_docs)
    docs = []
    holder = rng.randrange(n_docs)
    for d in range(n_docs):
        sents_d = [tok.decode(list(s)).strip() for s in haystack(rng, sents, per_doc)]
        if d == holder:
            sents_d.insert(rng.randrange(len(sents_d) + 1), needles.NEEDLE.format(key=key, value=value))
        docs.append((titles[d], " ".join(sents_d)))
    ids = ingest(docs, progress=False).pack(tok, progress=False).ids.tolist()
    prompt = context_prefix(tok, ids) + suffix
    return prompt, answer_ids(tok, titles[holder]), titles[holder]


def make_batch(tok, rng: random.Random, length: int, batch: int, sents) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) and targets (B, T) with -100 everywhere but the answer tokens."""
    rows = []
    noise = needles.encoded_sentences(tok, "noise")
    for _ in range(batch):
        if rng.random() < 0.25:  # a quarter on the repetitive noise haystack: needles stand out
            sents_b = noise
        else:
            sents_b = sents
        r = rng.random()
        if r < 0.1:
            prompt, ans, _ = document_example(tok, rng, length, "train", sents_b)
        else:
            kind = "single" if r < 0.5 else "multi" if r < 0.65 else "distractor" if r < 0.85 else "none"
            prompt, ans, _ = needle_example(tok, rng, length, "train", kind, sents_b)
        rows.append((prompt, ans))
    T = max(len(p) + len(a) for p, a in rows) - 1
    x = torch.full((batch, T), tok.pad_id, dtype=torch.long)
    y = torch.full((batch, T), -100, dtype=torch.long)
    for b, (p, a) in enumerate(rows):
        seq = p + a
        x[b, : len(seq) - 1] = torch.tensor(seq[:-1])
        y[b, len(p) - 1 : len(seq) - 1] = torch.tensor(a)  # predict each answer token
    return x, y


def curriculum(step: int, steps: int, rng: random.Random, max_len: int = 1024) -> int:
    """Training length for a step: 128-256 for the first 15 %, then growing to ``max_len``,
    with short lengths kept in the mix."""
    if step < 0.15 * steps:
        return rng.choice([128, 192, 256])
    top = max_len if step > 0.5 * steps else max_len // 2
    return rng.choice([128, 256, 384] + [L for L in (512, 768, 1024, 1536, 2048) if L <= top])


# ---- evaluation ----------------------------------------------------------------------------


def evaluate(model, tok, lengths, depths, samples: int, seed: int, sents) -> dict:
    """Exact match through chunked prefill + KV cache + greedy decode, on eval-split keys."""
    rng = random.Random(seed)
    results: dict = {}
    for length in lengths:
        for kind in ("single", "distractor", "none", "document"):
            hits = 0
            for _ in range(samples):
                if kind == "document":
                    prompt, _, answer = document_example(tok, rng, length, "eval", sents)
                else:
                    prompt, _, answer = needle_example(tok, rng, length, "eval", kind, sents)
                out = generate(model, torch.tensor([prompt]), max_new_tokens=24, chunk_size=512)
                hits += tok.decode(out.tokens[0]).strip() == answer
            results[f"{kind}@{length}"] = hits / samples
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=32, help="attention chunk of the local layers (tokens)")
    ap.add_argument("--max-len", type=int, default=1024, help="longest training prompt (tokens)")
    ap.add_argument("--eval-lengths", default="1024,2048,4096")
    ap.add_argument("--eval-samples", type=int, default=20)
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = Tokenizer.default()
    sents = needles.encoded_sentences(tok)
    cfg = model_config(tok, args.chunk)
    model = Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train.log"
    log = open(log_path, "w")
    t0 = time.time()
    ema = None
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        length = curriculum(step, args.steps, rng, args.max_len)
        x, y = make_batch(tok, rng, length, args.batch, sents)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", len=length)
        if step % 25 == 0 or step == args.steps - 1:
            log.write(json.dumps({"step": step, "len": length, "loss": round(loss.item(), 4), "ema": round(ema, 4),
                                  "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)}) + "\n")
            log.flush()
    train_s = time.time() - t0
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    save_model(model, args.out, tokenizer=tok)

    t1 = time.time()
    scores = evaluate(model, tok, [int(x) for x in args.eval_lengths.split(",")], None, args.eval_samples,
                      args.seed + 1, sents)
    eval_s = time.time() - t1
    card = [
        "# longctx embedded default model", "",
        "A Scout-architecture decoder at small width, trained from scratch by "
        "`examples/train_tiny_model.py` to retrieve facts from long contexts.", "",
        f"- architecture: {cfg.num_hidden_layers} layers ({', '.join(cfg.layer_kinds)}), hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads × {cfg.head_dim}, "
        f"{cfg.num_local_experts} experts top-1 + shared expert (width {cfg.intermediate_size}), "
        f"attention chunk {cfg.attention_chunk_size}, floor_scale {cfg.floor_scale}, vocab {cfg.vocab_size}; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, fp32",
        f"- data: generated on the fly (seed {args.seed}): needles \"{needles.NEEDLE}\" in English sentences from "
        "Python's pydoc_data (a quarter in the five-sentence noise haystack); single, multi-key (2-3 asked), 3 distractors, no-needle (answer "
        f"\"{NOT_STATED}\"), which-document over 3-8 packed documents; train-split keys only",
        f"- training: {args.steps} steps × batch {args.batch}, lengths 128-{args.max_len} (curriculum), AdamW lr {args.lr}, "
        f"loss on answer tokens only; {train_s / 60:.1f} min",
        f"- hardware: {platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}",
        f"- command: `python examples/train_tiny_model.py --steps {args.steps} --batch {args.batch} --seed {args.seed} "
        f"--threads {args.threads} --chunk {args.chunk} --max-len {args.max_len}`",
        "", f"## Scores (exact match, eval-split keys, {args.eval_samples} samples per cell, greedy, "
        f"chunked prefill + KV cache; {eval_s / 60:.1f} min)", "",
        "| task | " + " | ".join(args.eval_lengths.split(",")) + " |",
        "|---|" + "---|" * len(args.eval_lengths.split(",")),
    ]
    for kind in ("single", "distractor", "none", "document"):
        card.append(f"| {kind} | " + " | ".join(f"{scores[f'{kind}@{L}']:.0%}" for L in args.eval_lengths.split(",")) + " |")
    card += ["", f"Final training loss (EMA): {ema:.3f}. Log: `{log_path.name}` in this folder."]
    (args.out / "CARD.md").write_text("\n".join(card) + "\n")
    print("\n".join(card))


if __name__ == "__main__":
    main()
