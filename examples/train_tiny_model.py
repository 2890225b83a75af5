"""Train the embedded default model from scratch (into ``--out``, default ``tiny_model_out/``).

    python examples/train_tiny_model.py --recipe     # all stages: ~3.5 h on 2 CPU cores
    python examples/train_tiny_model.py --recipe --out longctx/assets/default   # replace the shipped one

``--recipe`` runs the six stages of ``RECIPE`` in one go: 3,000 steps from scratch (a recall
warm-up, then a curriculum up to 2,048 tokens), then 3,000 steps from those weights at a lower
learning rate with 40 % which-document contexts, after making the title words' embedding rows
distinct, then 1,800 steps that teach open keys (``--keys mix``: half the rows' keys are words,
codes and numbers of an open pool, split by word, so evaluation asks about words never used as
keys; see ``longctx.tasks.needles``) with the router load-balancing loss (``--balance``), then
600 and 400 steps at lower rates with more which-document rows, then 300 steps at a low rate
with 70 % which-document rows that start from the fifth stage's weights with a tenth of the
second stage's averaged in (``AVERAGE``, ``--average``).
Without ``--recipe`` the script runs one stage with the flags given (``--init`` to go on from a
saved model); the card of each run records its command.

``--checkpoint-every N`` writes a resumable state to ``OUT/resume/`` every N steps; ``--resume``
goes on from it (with ``--recipe``: skips finished earlier stages, kept in ``OUT/stage<i>/``
while the recipe runs) and ends in the same weight bytes and log lines as a run never stopped.

A Scout-architecture model at small width (chunked-local RoPE layers alternating with global
NoPE layers with temperature tuning, top-1 sigmoid MoE + shared expert, tied embeddings)
learns to retrieve facts from long contexts: needle sentences hidden in English text from
Python's own documentation, asked in the prompt layout of ``longctx.text.prompt``. The attention
chunk (128 tokens) is small against the training lengths (192-2048), so most needles can only
be reached through the global layers. Loss is on answer tokens only, plus an auxiliary loss
that points a few heads' attention at the retrieval circuit (see "attention guidance" below):
without it, a model this small stays on the no-retrieval plateau longer than a CPU budget.

Data is generated on the fly from a seeded RNG: contexts with 1-12 needles, single needles,
distractor needles, no-needle contexts (answer "not stated") and which-document contexts over
packed documents. Each context is followed by several chat turns of questions about it (one
key, two keys at once, a key that is not there), so one context yields many answers: the
retrieval signal per step is several times denser than one question per context. Training
runs in PyTorch's deterministic mode (``deterministic_kernels``), so a seed gives the same
bytes at a given thread count, even when other processes share the cores (see
benchmarks/results/tiny_model_reproducibility.md). At the end it evaluates through
the library's own path (chunked prefill + KV cache + greedy decode) on keys never seen in
training and writes the scores to the training card.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm import tqdm

from longctx.checkpoint import DEFAULT_MODEL, load_model, save_model
from longctx.config import ModelConfig
from longctx.generate import generate
from longctx.model import Model
from longctx.moe import MoE
from longctx.storage import atomic_folder
from longctx.tasks import needles
from longctx.text.ingest import DEFAULT_MARKER, ingest
from longctx.text.prompt import NOT_STATED, answer_ids, context_prefix, question_suffix
from longctx.text.tokenizer import Tokenizer


def model_config(tok: Tokenizer, chunk: int = 128) -> ModelConfig:
    return ModelConfig(
        vocab_size=tok.vocab_size,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=192,
        intermediate_size_mlp=384,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        no_rope_layer_interval=2,  # layers: chunked, global, chunked, global
        attention_chunk_size=chunk,
        floor_scale=chunk,
        attn_scale=0.1,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=1 << 22,
        bos_token_id=tok.bos_id,
        eos_token_id=[tok.eot_id, tok.eom_id],
        pad_token_id=tok.pad_id,
        # Tied input/output embeddings: copying a value token from the context then needs an
        # output map close to the identity in model space, instead of one learned separately for
        # each of the 1,000 digit-group tokens (a copy task learns ~10x faster in our trials).
        tie_word_embeddings=True,
    )


# ---- examples ------------------------------------------------------------------------------


def haystack(rng: random.Random, sents, n_tokens: int) -> list[list[int]]:
    """Consecutive sentences (wrapping around) from a random start, exactly n_tokens in all
    (the last one cut short)."""
    out, total, i = [], 0, rng.randrange(len(sents))
    while total < n_tokens:
        out.append(list(sents[i % len(sents)]))
        total += len(out[-1])
        i += 1
    if out:
        out[-1] = out[-1][: len(out[-1]) - (total - n_tokens)]
    return out


def questions(
    rng: random.Random, keys: list[str], values: list[str], absent: list[str], turns: int
) -> list[tuple[str, str]]:
    """Up to ``turns`` (question, answer) pairs about the needles (keys/values) and keys that
    are not in the context (answer NOT_STATED): each needle asked once, in random order, now
    and then two at once."""
    order = list(range(len(keys)))
    rng.shuffle(order)
    qa: list[tuple[str, str]] = []
    while order:
        if len(order) >= 2 and rng.random() < 0.2:
            i, j = order.pop(), order.pop()
            qa.append((needles.QUESTION_MULTI.format(keys=f"{keys[i]} and {keys[j]}"), f"{values[i]}, {values[j]}"))
        else:
            i = order.pop()
            qa.append((needles.QUESTION.format(key=keys[i]), values[i]))
    for k in absent:
        qa.insert(rng.randrange(len(qa) + 1), (needles.QUESTION.format(key=k), NOT_STATED))
    if turns == 1:  # one question (evaluation): about a needle when there is one
        qa.sort(key=lambda q: q[1] == NOT_STATED)
    return qa[:turns]


def answer_turns(tok, qa: list[tuple[str, str]]) -> list[tuple[list[int], list[int], str]]:
    """(turn ids, answer ids, answer text) per (question, answer): the first question is in the
    prompt already (empty turn ids); each later one is a new user turn of the Llama 4 chat
    layout, ending in the assistant header."""
    out = [([], answer_ids(tok, qa[0][1]), qa[0][1])]
    for q, a in qa[1:]:
        out.append(([*tok.header("user"), *tok.encode(q), tok.eot_id, *tok.header("assistant")], answer_ids(tok, a), a))
    return out


def needle_example(
    tok, rng: random.Random, length: int, split: str, kind: str, sents, turns: int = 1, keys: str = "vocab"
) -> tuple[list[int], list[tuple[list[int], list[int], str]]]:
    """A context of needles in haystack text and the questions asked about it.

    kind: "single" (one needle), "distractor" (4 needles, one asked first), "many" (1-12
    needles, for training), "none" (no needle, a key that is not there is asked).
    Returns (prompt, later): prompt is exactly ``length`` tokens (context + first question,
    ending in the assistant header) and its answer is later[0][1]; ``later`` lists
    (turn ids, answer ids, answer text) for the first question's answer (empty turn ids) and
    then up to ``turns - 1`` further chat turns about the same context. keys: the kind of the
    keys (``needles.KEY_KINDS``).
    """
    n = {"single": 1, "distractor": 4, "many": rng.randint(1, 12), "none": 0}[kind]
    keys = needles.make_keys(rng, n + 2, split, keys)
    values = [needles.make_value(rng) for _ in range(n)]
    absent = keys[n : n + 1] if kind == "none" or rng.random() < 0.3 else []  # a key not in the text
    qa = questions(rng, keys[:n], values, absent, turns)
    needle_ids = [tok.encode(" " + needles.NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
    suffix = question_suffix(tok, qa[0][0])
    room = length - len(context_prefix(tok, "")) - len(suffix) - sum(map(len, needle_ids))
    pieces = haystack(rng, sents, max(0, room))
    for ids in needle_ids:
        pieces.insert(rng.randrange(len(pieces) + 1), ids)  # at a sentence boundary
    prompt = context_prefix(tok, [t for p in pieces for t in p]) + suffix
    assert len(prompt) == length or room < 0
    return prompt, answer_turns(tok, qa)


def document_example(
    tok,
    rng: random.Random,
    length: int,
    split: str,
    sents,
    turns: int = 1,
    docs: tuple[int, int] = (3, 8),
    chunk: int = 128,
    align: bool = False,
    keys: str = "vocab",
) -> tuple[list[int], list[tuple[list[int], list[int], str]]]:
    """Which-document questions over ``docs`` (a min, max range) packed documents, 1-3 of which
    hold a needle; titles are two capitalised words ("Slow Robin"), no word shared by two
    titles of a context. Returns (prompt, later) as ``needle_example``; the answer to a
    which-document question is the document's chunk marker ("[3 Slow Robin]\n", see
    ``Corpus.pack``): a citation that starts with a constant token, then the document's id.
    keys: the kind of the needles' keys (``needles.KEY_KINDS``)."""
    n_docs = rng.randint(*docs)
    n = rng.randint(1, min(3, n_docs))
    keys = needles.make_keys(rng, n, split, keys)
    values = [needles.make_value(rng) for _ in keys]
    adjs, nouns = rng.sample(needles._ADJECTIVES, n_docs), rng.sample(needles._NOUNS, n_docs)
    titles = [f"{a.title()} {b.title()}" for a, b in zip(adjs, nouns)]
    holders = rng.sample(range(n_docs), n)
    qa = [
        (needles.QUESTION_DOC.format(key=k), DEFAULT_MARKER.format(id=h, title=titles[h]))
        for k, h in zip(keys, holders)
    ]
    qa += [(needles.QUESTION.format(key=k), v) for k, v in zip(keys, values)]
    rng.shuffle(qa)
    if turns == 1:  # one question (evaluation): a which-document one
        qa.sort(key=lambda q: not q[1].startswith("["))
    qa = qa[:turns]
    suffix = question_suffix(tok, qa[0][0])
    per_doc = max(8, (length - len(suffix) - 25 * n_docs) // n_docs)
    per_doc = max(8, per_doc - 7 * (per_doc // chunk + 2))  # room for the markers
    docs = []
    for d in range(n_docs):
        sents_d = [tok.decode(s).strip() for s in haystack(rng, sents, per_doc)]
        for k, v, h in zip(keys, values, holders):
            if h == d:
                sents_d.insert(rng.randrange(len(sents_d) + 1), needles.NEEDLE.format(key=k, value=v))
        docs.append((titles[d], " ".join(sents_d)))
    packed = ingest(docs, progress=False).pack(tok, chunk=chunk, offset=len(context_prefix(tok, [])), progress=False)
    prefix = context_prefix(tok, packed.ids)
    if align:  # the first question laid out as `qa.Session` asks it (see question_suffix)
        suffix = question_suffix(tok, qa[0][0], at=len(prefix), chunk=chunk)
    return prefix + suffix, answer_turns(tok, qa)


def make_batch(
    tok,
    rng: random.Random,
    length: int,
    rows: int,
    sents,
    turns: int = 8,
    split: str = "train",
    chunk: int = 128,
    doc_share: float = 0.1,
    keys: str = "vocab",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (rows, T), targets (rows, T) (-100 everywhere but the answer tokens) and the
    attention-guidance targets (N, 5): row, layer, head, query position, key position
    (``guide_targets``).

    Each row is one context followed by up to ``turns`` question/answer chat turns about it:
    an answer costs ~25 tokens of sequence instead of a whole context, so the retrieval
    signal per step is several times denser than with one question per context. A share
    ``doc_share`` of the rows are which-document contexts (markers for attention chunks of
    ``chunk`` tokens). keys: the kind of the keys, "vocab" or "open" (``needles.KEY_KINDS``),
    or "mix": each row's keys open with probability ``MIX_OPEN``, else vocab."""
    noise = needles.encoded_sentences(tok, "noise")
    seqs, guide = [], []
    for _ in range(rows):
        sents_b = noise if rng.random() < 0.2 else sents  # some on the repetitive noise haystack
        kind_k = keys if keys != "mix" else "open" if rng.random() < MIX_OPEN else "vocab"
        r = rng.random()
        if r < doc_share:
            docs = (3, 20 if length >= 768 else 8)  # ids up to 19, as the benchmark's 5-20 documents have
            prompt, later = document_example(
                tok, rng, length, split, sents_b, turns, docs=docs, chunk=chunk, keys=kind_k
            )
        else:
            r = 0.1 + 0.9 * (r - doc_share) / (1 - doc_share)  # the needle kinds' shares, as with doc_share 0.1
            kind = "many" if r < 0.75 else "single" if r < 0.85 else "distractor" if r < 0.93 else "none"
            prompt, later = needle_example(tok, rng, length, split, kind, sents_b, turns, keys=kind_k)
        seq, target = list(prompt), [-100] * len(prompt)
        for turn, ans, text in later:
            seq += turn
            which_doc = text.startswith("[")  # a which-document answer: the holder's chunk marker
            targets = title_targets(tok, prompt, seq, ans, chunk) if which_doc else guide_targets(tok, prompt, seq, ans)
            guide += [(len(seqs), *g) for g in targets]
            seq += ans
            target += [-100] * len(turn) + ans
        seqs.append((seq, target))
    T = max(len(s) for s, _ in seqs) - 1
    x = torch.full((rows, T), tok.pad_id, dtype=torch.long)
    y = torch.full((rows, T), -100, dtype=torch.long)
    for b, (s, t) in enumerate(seqs):
        x[b, : len(s) - 1] = torch.tensor(s[:-1])
        y[b, : len(s) - 1] = torch.tensor(t[1:])  # position i predicts token i + 1
    return x, y, torch.tensor(guide, dtype=torch.long).reshape(-1, 5)


# With --keys mix, the share of rows whose keys are open: the rest keep the vocab keys that the
# earlier stages trained on, so their tasks do not drift while open keys are learned.
MIX_OPEN = 0.5


def curriculum(step: int, steps: int, rng: random.Random, max_len: int = 2048, warm_up: bool = True) -> int:
    """Training length for a step: a recall warm-up for the first 20 % (needles alone, or in
    192-512 tokens: one to four attention chunks, needles packed densely), then lengths growing to ``max_len``
    with short ones kept in the mix."""
    if warm_up and step < 0.2 * steps:
        return rng.choice([0, 0, 192, 256, 384, 512])  # 0: needles and questions, no haystack
    top = max_len if step > 0.5 * steps or not warm_up else max(512, max_len // 2)
    return rng.choice([256, 512] + [L for L in (768, 1024, 1536, 2048, 3072, 4096) if L <= top])


# ---- attention guidance (training only) ------------------------------------------------------
#
# Left to itself, this model sits on a long plateau before the retrieval circuit forms: every
# run of benchmarks/results/tiny_model_trials.md stayed there for thousands of steps,
# more than a CPU budget allows. The circuit is known, so training points a few heads at it
# with an auxiliary cross-entropy on their attention (the model's forward is unchanged):
#   local layer 0, at a needle's first value token and at the answer position that must produce
#     it: head 0 attends to the key's last token, head 1 to its first (so both positions carry
#     the key); head 2, at later value tokens on both sides, attends to the previous token;
#   global layers, from the position that predicts an answer token: head 0 (first value token)
#     and head 2 (later ones, an induction lookup) attend to the context position holding it.
# The global layers also start from a mimetic initialisation (Trockman & Kolter, 2023): a KV
# head's key map equals its first query head's map, so attention starts out matching similar
# states, and o_proj is v_proj's transpose, so a head starts out copying what it reads.

GUIDED = {"local": (0,), "global": (1, 3)}  # layer indices of the 4-layer model


@functools.lru_cache(maxsize=4)
def _needle_head(tok) -> tuple[int, ...]:
    """Token ids of a needle just before its key (" of the special magic numbers for"; not its
    first word, tokenized otherwise at the start of a document: "One" and " One")."""
    ids = tok.encode(" " + needles.NEEDLE.format(key="amber-falcon", value="1234567"))
    return tuple(ids[ids.index(tok.encode(" of")[0]) : ids.index(tok.encode(" amber-falcon")[0])])


def _key_length(tok, prompt: list[int], end: int) -> int:
    """Number of tokens of the needle key that ends just before ``end`` (its last token at
    end - 1), found as the tokens since the needle's head; 0 when there is no needle head
    within 32 tokens."""
    head = _needle_head(tok)
    for n in range(1, 33):
        if end - n - len(head) >= 0 and tuple(prompt[end - n - len(head) : end - n]) == head:
            return n
    return 0


@functools.lru_cache(maxsize=4)
def _needle_gap(tok) -> tuple[int, ...]:
    """Token ids between a needle's key and its value (" is", ":", " ")."""
    ids = tok.encode(" " + needles.NEEDLE.format(key="amber-falcon", value="1234567"))
    key_end = ids.index(tok.encode(" amber-falcon")[-1]) + 1
    return tuple(ids[key_end : ids.index(tok.encode("1234567")[0])])


def guide_targets(tok, prompt: list[int], seq: list[int], ans: list[int]) -> list[tuple[int, int, int, int]]:
    """(layer, head, query, key) attention targets for an answer ``ans`` about to be appended at
    position len(seq) of a row whose context is ``prompt``. Only answers that start with a
    needle's value are guided (not "not stated"; which-document answers get ``title_targets``),
    and an answer token only when the context holds it at exactly one place (after the
    previous answer token, for j > 0). Local heads 0 and 1 go to the key's last and second-last
    tokens: a one-token key (an open key such as "6535" can be one) guides head 0 only."""
    at, gap, out = len(seq), _needle_gap(tok), []
    g = len(gap)
    for j, t in enumerate(ans[:-1]):  # not <|eot|>
        src = [i for i in range(1, len(prompt)) if prompt[i] == t and (j == 0 or prompt[i - 1] == ans[j - 1])]
        if len(src) != 1:
            if j == 0:
                return []
            continue
        k, q = src[0], at + j - 1  # the context position holding it, the position predicting it
        if j == 0:
            if tuple(prompt[k - g : k]) != gap or k < g + 2:
                return []  # not a needle's value
            # A one-token key, or one whose second-last token is a bare space (" " before a piece
            # with no spaced form): head 1 has nothing of the key to read. 0: no needle head found.
            one = _key_length(tok, prompt, k - g) == 1 or not tok.decode([prompt[k - g - 2]]).strip()
            n_key = 1 if one else 2
            for head, key_tok in ((h, prompt[k - g - 1 - h]) for h in range(n_key)):  # the key's tokens
                asked = [i for i in range(q - 1, max(k, q - 16), -1) if seq[i] == key_tok]
                if asked:  # the key as the question spells it
                    out += [(layer, head, k, k - g - 1 - head) for layer in GUIDED["local"]]
                    out += [(layer, head, q, asked[0]) for layer in GUIDED["local"]]
        else:
            out += [(layer, 2, p, p - 1) for layer in GUIDED["local"] for p in (k, q)]
        out += [(layer, 0 if j == 0 else 2, q, k) for layer in GUIDED["global"]]
    return out


def title_targets(
    tok, prompt: list[int], seq: list[int], ans: list[int], chunk: int
) -> list[tuple[int, int, int, int]]:
    """(layer, head, query, key) attention targets for a which-document answer ``ans`` (the
    holder's chunk marker, "[3 Slow Robin]\n") to the question that ends ``seq``. The id is
    found exactly as a value is: local heads 0 and 1, at the id of the marker that closes the
    needle's chunk (and at the answer's "[", which predicts the id), attend to the key's last
    two tokens there (and in the question), so global head 0 can match the key and copy the id,
    a digit token like a value's first piece. The title then follows the id in every marker of
    that document: local head 2 attends to the previous token and global head 2 copies what
    followed it (an induction lookup, as for a value's later pieces)."""
    q_end = len(seq) - 1 - seq[::-1].index(tok.encode("?")[0])  # the question's "?"
    q_for = q_end - 1 - seq[q_end - 1 :: -1].index(tok.encode(" for")[0])
    key, gap = seq[q_for + 1 : q_end], _needle_gap(tok)
    n = len(key)
    hits = [
        i + n - 1
        for i in range(1, len(prompt) - n - len(gap))
        if prompt[i : i + n] == key and tuple(prompt[i + n : i + n + len(gap)]) == gap
    ]
    if len(hits) != 1 or n < 2:
        return []
    k = hits[0]  # the key's last token in the needle
    marks = [
        m for m in range(k + 1, min(len(prompt), (k // chunk + 1) * chunk)) if prompt[m : m + len(ans) - 1] == ans[:-1]
    ]
    if not marks:
        return []
    m, at = marks[0], len(seq)  # the marker's "[", the answer's "["
    out = []
    for head in (0, 1):  # the key's last and second-last tokens, in the needle and in the question
        out += [(layer, head, m + 1, k - head) for layer in GUIDED["local"]]
        out += [(layer, head, at, q_end - 1 - head) for layer in GUIDED["local"]]
    out += [(layer, 0, at, m + 1) for layer in GUIDED["global"]]
    for j in range(2, len(ans) - 1):  # the title and "]\n", not <|eot|>
        out += [(layer, 2, p, p - 1) for layer in GUIDED["local"] for p in (m + j, at + j - 1)]
        out += [(layer, 2, at + j - 1, m + j) for layer in GUIDED["global"]]
    return out


def guidance_loss(model, inputs: dict, guide: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the guided heads' attention against their targets.
    ``inputs`` maps a layer index to its attention's (input, rope) from the forward just run;
    ``guide`` rows are (batch row, layer, head, query, key). With ``tokens`` (the batch's
    input ids), plus a copy loss for the global heads: the head's output for the value at its
    target, read through the (tied) output head, should predict the token there, the one the
    head is meant to copy."""
    cfg, losses, copies = model.config, [], []
    for layer in guide[:, 1].unique().tolist():
        b, _, head, q, k = guide[guide[:, 1] == layer].unbind(1)
        attn = model.layers[layer].self_attn
        x, rope = inputs[layer]
        qs, ks, _ = attn.project(x, 0, rope)  # (B, T, H, D)
        n = torch.arange(len(q))
        logits = torch.einsum("nd,ntd->nt", qs[b, q, head], ks[b, :, head // (attn.n_heads // attn.n_kv)])
        pos = torch.arange(x.shape[1])
        hidden = pos[None] > q[:, None]
        if attn.chunked:
            hidden |= pos[None] // cfg.attention_chunk_size != q[:, None] // cfg.attention_chunk_size
        logits = logits.masked_fill(hidden, float("-inf")) * attn.head_dim**-0.5
        ok = ~hidden[n, k]  # a key in another chunk cannot be reached by a local head
        losses.append((torch.logsumexp(logits, -1) - logits[n, k])[ok])
        if tokens is not None and not attn.chunked:
            v = attn.project(x, 0, rope)[2][b, k, head // (attn.n_heads // attn.n_kv)]  # (N, D)
            o = attn.o_proj.weight.view(cfg.hidden_size, attn.n_heads, attn.head_dim)[:, head]  # (hidden, N, D)
            copies.append(
                F.cross_entropy(model.lm_head(torch.einsum("hnd,nd->nh", o, v)), tokens[b, k], reduction="none")
            )
    if not losses:
        return torch.zeros(())
    return torch.cat(losses).mean() + (torch.cat(copies).mean() if copies else 0.0)


# ---- router load balancing (training only) ---------------------------------------------------
#
# Trained on the answer loss alone, the top-1 routers collapse: the shipped model's layer 2 sends
# nearly every token to one expert (``longctx.monitor.RoutingCollapse``). The Switch Transformer's
# auxiliary loss, E · Σ_i f_i · P_i (f_i: the share of tokens routed to expert i, P_i: its mean
# router probability), is 1 when routing is even and E when one expert takes everything. The
# Llama-4 router scores with a sigmoid of the top logit, not a softmax; P_i here is the softmax of
# the router logits, which ranks the experts as the top-1 choice does, so lowering its mass on the
# busy expert lowers that expert's logit against the others, the thing that moves tokens.


def router_logits_hooks(model) -> tuple[list, list]:
    """Forward hooks on every MoE router that append its logits (N, E) to a list.
    Returns (the list, the hook handles)."""
    logits: list = []
    handles = [
        block.feed_forward.router.register_forward_hook(lambda _m, _a, out: logits.append(out))
        for block in model.layers
        if isinstance(block.feed_forward, MoE)
    ]
    return logits, handles


def balance_loss(logits: list, keep: torch.Tensor) -> torch.Tensor:
    """Mean over MoE layers of E · Σ_i f_i · P_i (1 when balanced, E when collapsed) over the
    tokens where ``keep`` (B, T) is true (not padding); ``logits``: each layer's router
    logits (B·T, E), as ``router_logits_hooks`` collects them."""
    keep = keep.reshape(-1)
    out = []
    for z in logits:
        z = z[keep].float()  # (N, E)
        n_experts = z.shape[-1]
        share = torch.bincount(z.argmax(-1), minlength=n_experts).float() / len(z)  # f_i, no gradient
        out.append(n_experts * (share * z.softmax(-1).mean(0)).sum())
    return torch.stack(out).mean()


def reset_title_words(model, tok, spread: float = 0.4) -> None:
    """Give the capitalised adjectives and nouns that make the training titles distinct (tied)
    embedding rows again: each becomes the group's mean row plus a random direction of norm
    ``spread`` x the median row norm. A model trained to answer titles before it could find
    them learns one "some title word" prior, and the rows of these rare tokens collapse onto it
    (the earlier three-stage model after its second stage: cosine 0.99 between the adjectives), so
    a head that attends to the right title word cannot tell it apart from the others. The mean keeps the prior's logits
    low where no title is due: with spread 1 (or a plain redraw) the answer positions' hidden
    states (norm ~32) give the title words the top logit almost everywhere; with 0.4 the
    needle answers are unchanged and the cosine between title words falls to ~0.78."""
    words = {w.title() for w in needles._ADJECTIVES + needles._NOUNS}
    ids = sorted({ids[0] for ids in (tok.encode(" " + w) for w in words) if len(ids) == 1})
    E = model.embed_tokens.weight
    with torch.no_grad():
        E[ids] = (
            E[ids].mean(0) + F.normalize(torch.randn(len(ids), E.shape[1]), dim=-1) * spread * E.norm(dim=-1).median()
        )


def average_weights(model, other, weight: float) -> None:
    """Every weight w of ``model`` becomes ``weight`` x other's + (1 - weight) x w (the same
    architecture; one expression, so the bytes follow from the two models'). Fine-tuned models
    from one start lie in one basin, so the average keeps most of what each does well: an
    open-key stage averaged with the vocab-key weights it started from gets back the
    which-document answers the open-key training wore down (benchmarks/results/
    tiny_model_open_keys.md)."""
    theirs = dict(other.named_parameters())
    ours = dict(model.named_parameters())
    if {n: t.shape for n, t in theirs.items()} != {n: t.shape for n, t in ours.items()}:
        raise ValueError("--average: the model to average with has another architecture than the --init model")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weight * theirs[name] + (1 - weight) * p)


def mimetic_init(model, std: float = 0.1) -> None:
    """Global layers: k_proj of each KV head = q_proj of its first query head, o_proj ∝ v_proj^T."""
    cfg = model.config
    with torch.no_grad():
        for layer in GUIDED["global"]:
            attn = model.layers[layer].self_attn
            D, g = attn.head_dim, attn.n_heads // attn.n_kv
            attn.q_proj.weight.normal_(0.0, std)
            for h in range(attn.n_kv):
                attn.k_proj.weight[h * D : (h + 1) * D] = attn.q_proj.weight[h * g * D : (h * g + 1) * D]
            attn.v_proj.weight.normal_(0.0, std)
            v = attn.v_proj.weight.view(attn.n_kv, D, cfg.hidden_size)
            attn.o_proj.weight.copy_(torch.cat([v[h // g] for h in range(attn.n_heads)]).T * (0.02 / std))


# ---- evaluation ----------------------------------------------------------------------------


def evaluate(model, tok, lengths, depths, samples: int, seed: int, sents, keys: str = "vocab") -> dict:
    """Exact match through chunked prefill + KV cache + greedy decode, on eval-split keys of
    kind ``keys`` ("vocab" or "open")."""
    rng = random.Random(seed)
    results: dict = {}
    for length in lengths:
        for kind in ("single", "distractor", "none", "document"):
            hits = 0
            for _ in range(samples):
                if kind == "document":
                    prompt, later = document_example(
                        tok, rng, length, "eval", sents, chunk=model.config.attention_chunk_size, keys=keys
                    )
                else:
                    prompt, later = needle_example(tok, rng, length, "eval", kind, sents, keys=keys)
                answer = later[0][2].strip()
                out = generate(model, torch.tensor([prompt]), max_new_tokens=24, chunk_size=512, progress=False)
                hits += tok.decode(out.tokens[0]).strip() == answer
            results[f"{kind}@{length}"] = hits / samples
    return results


def answer_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens, the head applied only where y != -100."""
    mask = y != -100
    return F.cross_entropy(model.lm_head(model.hidden(x)[mask]).float(), y[mask])


def probe(model, tok, sents, seed: int, keys: str = "vocab") -> dict:
    """Teacher-forced exact match of whole answers on eval-split keys of kind ``keys`` (one
    forward per length, 16 single-question contexts): a cheap progress signal for the log, not
    the final score."""
    out = {}
    model.eval()
    with torch.no_grad():
        for length in (512, 2048):
            x, y, _ = make_batch(tok, random.Random(seed + length), length, 16, sents, turns=1, split="eval", keys=keys)
            pred = model(x).argmax(-1)
            ok = ((pred == y) | (y == -100)).all(dim=1)
            out[length] = round(ok.float().mean().item(), 3)
    model.train()
    return out


# The embedded model's recipe: a first stage from scratch (warm-up, then a curriculum, a tenth of
# the rows which-document), then a second from its weights at a lower rate, with which-document
# rows at 40 % and the title words' embedding rows made distinct first (see reset_title_words),
# then a third that teaches open keys (half the rows; the other half keep the vocab keys so the
# earlier tasks hold) with the router load-balancing loss, and three short ones at lower rates with
# more which-document rows. Each stage pins its thread count: the bytes follow it.
RECIPE = (
    "--steps 3000 --lr 3e-3 --doc-share 0.1 --seed 0 --threads 2 --eval-lengths 1024 --eval-samples 5",
    "--steps 3000 --lr 5e-4 --doc-share 0.4 --reset-title-words --seed 3 --threads 2 --eval-lengths 1024,4096 "
    "--eval-samples 10",
    "--steps 1800 --lr 1e-3 --doc-share 0.4 --keys mix --balance 0.05 --seed 5 --threads 1 --eval-lengths 1024,4096 "
    "--eval-samples 10",
    "--steps 600 --lr 2e-4 --doc-share 0.5 --keys mix --balance 0.05 --seed 8 --threads 1 --probe-every 150 "
    "--eval-lengths 1024,4096 --eval-samples 10",
    "--steps 400 --lr 1e-4 --doc-share 0.7 --keys mix --balance 0.05 --seed 9 --threads 1 --probe-every 200 "
    "--eval-lengths 1024,4096 --eval-samples 10",
    "--steps 300 --lr 5e-5 --doc-share 0.7 --keys mix --balance 0.5 --seed 11 --threads 1 --probe-every 100",
)
# The last stage starts from the stage before's weights with stage AVERAGE[0]'s averaged in at
# weight AVERAGE[1] (average_weights; None: the stage before's as they are). The open-key stages
# wear down the which-document answers that stage 2, trained on vocab keys alone, gives; a tenth
# of its weights brings most of them back and keeps the open keys. The last stage adds a few more;
# its balance loss is ten times the others' because at 0.05 one MoE layer's routing collapsed
# (benchmarks/results/tiny_model_open_keys.md).
AVERAGE: tuple[int, float] | None = (2, 0.1)


def run_recipe(args) -> None:
    """The stages of RECIPE, each from the one before's weights: the last into ``--out`` (model
    and card), the others into temporary folders (``OUT/stage<i>`` when resumable), their logs
    kept in ``--out`` as ``train_stage<i>.log``."""
    shared = [
        "--tokens",
        str(args.tokens),
        "--turns",
        str(args.turns),
        "--guide",
        str(args.guide),
        "--threads",
        str(args.threads),
        "--chunk",
        str(args.chunk),
        "--max-len",
        str(args.max_len),
        "--probe-every",
        str(args.probe_every),
    ]
    t0 = time.time()
    resumable = args.checkpoint_every or args.resume
    if resumable:
        shared += ["--checkpoint-every", str(args.checkpoint_every)]
    steps = [stage.split() for stage in RECIPE]
    with contextlib.ExitStack() as stack:
        # A resumable recipe keeps its earlier stages in --out/stage<i> (a killed run finds them
        # there): a finished stage (its card written) is skipped, an unfinished one goes on from its
        # checkpoint.
        folders = [
            args.out / f"stage{i}" if resumable else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            for i in range(1, len(RECIPE))
        ] + [args.out]
        if AVERAGE is not None:
            stage, weight = AVERAGE
            steps[-1] += ["--average", str(folders[stage - 1]), "--average-weight", str(weight)]
        for i, (step, out) in enumerate(zip(steps, folders)):
            last = i == len(steps) - 1
            if not last and args.resume and (out / "CARD.md").exists():
                continue
            main(
                shared
                + step  # after shared: a stage's own --threads wins (its bytes depend on it)
                + _resume_flag(args, out)
                + (["--eval-lengths", args.eval_lengths, "--eval-samples", str(args.eval_samples)] if last else [])
                + (["--init", str(folders[i - 1])] if i else [])
                + ["--out", str(out)]
            )
        for i, out in enumerate(folders[:-1], 1):
            shutil.copy(out / "train.log", args.out / f"train_stage{i}.log")
    if resumable:
        for out in folders[:-1]:
            shutil.rmtree(out)
    card = args.out / "CARD.md"
    lines = card.read_text().splitlines()
    lines.insert(
        3,
        f"Made by `python examples/train_tiny_model.py --recipe` (the {len(RECIPE)} stages of its RECIPE"
        + (f", the last from stage {AVERAGE[0]}'s weights averaged in at {AVERAGE[1]}" if AVERAGE else "")
        + ", "
        f"{(time.time() - t0) / 60:.1f} min in all, evaluations included).",
    )
    card.write_text("\n".join(lines) + "\n")


def _resume_flag(args, out: Path) -> list[str]:
    """``--resume`` for a recipe stage writing to ``out`` when asked for and it has a checkpoint."""
    return ["--resume"] if args.resume and (out / "resume").is_dir() else []


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--tokens", type=int, default=8192, help="sequence tokens per step, question turns included")
    ap.add_argument("--turns", type=int, default=12, help="questions asked per training context")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--guide",
        type=float,
        default=1.0,
        help="weight of the attention-guidance loss (0: none; the mimetic init of the global layers stays)",
    )
    ap.add_argument(
        "--doc-share", type=float, default=0.1, help="share of which-document contexts in the training rows"
    )
    ap.add_argument(
        "--title-head",
        action="store_true",
        help="start global head 1's output map as a copy of head 0's (the head that copies values), for a stage "
        "that teaches which-document answers to a model that has the value circuit",
    )
    ap.add_argument(
        "--reset-title-words",
        action="store_true",
        help="make the title words' (capitalised adjectives and nouns) embeddings distinct before training: "
        "in a model that answered titles before it could find them they collapse to one direction "
        "(mean cosine 0.99 in the earlier "
        "three-stage model), so no head can copy one of them (see reset_title_words)",
    )
    ap.add_argument(
        "--copy-loss",
        action="store_true",
        help="add to the guidance a copy loss on the guided global heads' output maps (see guidance_loss)",
    )
    ap.add_argument(
        "--keys",
        choices=("vocab", "open", "mix"),
        default="vocab",
        help="training keys: vocab (two words of needles.py's lists), open (words, codes and numbers of an open "
        f"pool, split by word), mix ({round(MIX_OPEN * 100)}%% of the rows open, the rest vocab)",
    )
    ap.add_argument(
        "--balance",
        type=float,
        default=0.0,
        help="weight of the router load-balancing loss (Switch-style, see balance_loss; 0: none)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=128, help="attention chunk of the local layers (tokens)")
    ap.add_argument("--max-len", type=int, default=2048, help="longest training prompt (tokens)")
    ap.add_argument("--eval-lengths", default="1024,2048,4096")
    ap.add_argument("--eval-samples", type=int, default=20)
    ap.add_argument("--probe-every", type=int, default=250, help="steps between logged probes (0: none)")
    # A new folder by default: replacing the shipped model must be asked for by name.
    ap.add_argument(
        "--out", type=Path, default=Path("tiny_model_out"), help="folder to write (default: tiny_model_out)"
    )
    ap.add_argument(
        "--init", type=Path, default=None, help="start from this saved model (a second stage) instead of from scratch"
    )
    ap.add_argument(
        "--average",
        type=Path,
        default=None,
        help="after loading --init, average its weights with this saved model's (see --average-weight); with "
        "--steps 0, a step that trains nothing",
    )
    ap.add_argument(
        "--average-weight", type=float, default=0.5, help="the --average model's share of each weight (default 0.5)"
    )
    ap.add_argument(
        "--recipe",
        action="store_true",
        help="run the stages of RECIPE in one go, from scratch, into --out (~3.5 h on 2 CPU cores)",
    )
    ap.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="steps between resumable checkpoints in OUT/resume/ (0: none)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="go on from the checkpoint in OUT/resume/ (with --recipe: skip finished stages)",
    )
    ap.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: stop after a checkpoint
    args = ap.parse_args(argv)
    if args.recipe:
        owned = [
            o
            for o in (
                "steps",
                "lr",
                "seed",
                "doc_share",
                "init",
                "title_head",
                "reset_title_words",
                "copy_loss",
                "keys",
                "balance",
                "average",
                "average_weight",
            )
            if getattr(args, o) != ap.get_default(o)
        ]
        if owned:
            ap.error("--recipe sets " + ", ".join("--" + o.replace("_", "-") for o in owned) + " itself (see RECIPE)")
        return run_recipe(args)
    if args.average is not None and args.init is None:
        ap.error("--average needs --init (the model whose weights it averages with)")
    if not 0.0 <= args.average_weight <= 1.0:
        ap.error(f"--average-weight must be in [0, 1] (a share of each weight), got {args.average_weight}")
    with deterministic_kernels():
        train(args)


@contextlib.contextmanager
def deterministic_kernels():
    """Bit-identical training for a given seed and thread count, for the duration of one stage.

    The one kernel here whose result depended on thread timing is the CPU backward of advanced
    indexing with repeated indices (the guidance loss's ``qs[b, q, head]``): ``index_put_`` with
    ``accumulate`` adds from several threads at once, so the float sum order varied run to run
    (at 2 threads: 200 of 200 repeats differed under load, 0 of 200 in deterministic mode). The
    deterministic mode runs it in a fixed order. Uninitialised memory is not filled: nothing here
    reads it, and the fill would cost a pass over every new tensor."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.utils.deterministic.fill_uninitialized_memory = saved[1]


def train(args) -> None:
    """One training stage as ``args`` (parsed by ``main``) describe it: train, save to
    ``args.out``, evaluate, write the card."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = Tokenizer.default()
    sents = needles.encoded_sentences(tok)
    cfg = model_config(tok, args.chunk)
    if args.init is not None:  # a second stage: go on from a saved model, no warm-up
        model = load_model(args.init)
        cfg = model.config
        if args.title_head:
            with torch.no_grad():
                for layer in GUIDED["global"]:
                    o, D = model.layers[layer].self_attn.o_proj.weight, cfg.head_dim
                    o[:, D : 2 * D] = o[:, :D]
        if args.reset_title_words:
            reset_title_words(model, tok)
        if args.average is not None:
            average_weights(model, load_model(args.average), args.average_weight)
    else:
        model = Model(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.endswith("norm.weight"):
                    p.normal_(0.0, 0.02)
        mimetic_init(model)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    inputs: dict = {}  # layer -> (attention input, rope) of the last forward, for the guidance loss
    for layer in GUIDED["local"] + GUIDED["global"]:
        model.layers[layer].self_attn.register_forward_pre_hook(
            lambda _m, a, layer=layer: inputs.__setitem__(layer, (a[0], a[2]))
        )
    routed, hooks = router_logits_hooks(model) if args.balance else ([], [])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))
    )
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train.log"
    start, ema, elapsed = 0, None, 0.0
    if args.resume:
        start, ema, elapsed, log_bytes = load_resume(args, model, opt, sched, rng)
        with open(log_path, "r+b") as f:  # drop the lines logged after the checkpoint
            f.truncate(log_bytes)
    log = open(log_path, "a" if args.resume else "w")
    t0 = time.time() - elapsed
    bar = tqdm(range(start, args.steps), desc="train", unit="step", initial=start, total=args.steps)
    for step in bar:
        length = curriculum(step, args.steps, rng, args.max_len, warm_up=args.init is None)
        rows = max(2, args.tokens // (max(length, 160) + 25 * args.turns))  # a turn is ~25 tokens
        x, y, guide = make_batch(
            tok,
            rng,
            length,
            rows,
            sents,
            args.turns,
            chunk=cfg.attention_chunk_size,
            doc_share=args.doc_share,
            keys=args.keys,
        )
        routed.clear()
        loss = answer_loss(model, x, y)  # its forward fills ``routed``, one entry per MoE layer
        bal = balance_loss(routed, x != tok.pad_id) if args.balance else None
        aux = guidance_loss(model, inputs, guide, x if args.copy_loss else None) if args.guide else torch.zeros(())
        total = loss + args.guide * aux
        if bal is not None:
            total = total + args.balance * bal
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", guide=f"{aux.item():.2f}", len=length)
        if step % 25 == 0 or step == args.steps - 1:
            entry = {
                "step": step,
                "len": length,
                "loss": round(loss.item(), 4),
                "ema": round(ema, 4),
                "guide": round(aux.item(), 4),
                "lr": sched.get_last_lr()[0],
                "elapsed_s": round(time.time() - t0, 1),
            }
            if bal is not None:
                entry["balance"] = round(bal.item(), 4)
            if args.probe_every and (step % args.probe_every == 0 or step == args.steps - 1):
                entry["probe"] = probe(model, tok, sents, args.seed)
                if args.keys != "vocab":
                    entry["probe_open"] = probe(model, tok, sents, args.seed, keys="open")
                bar.write(json.dumps(entry))
            log.write(json.dumps(entry) + "\n")
            log.flush()
        done = step + 1
        if done < args.steps and (
            (args.checkpoint_every and done % args.checkpoint_every == 0) or done == args.stop_after
        ):
            save_resume(args, done, model, opt, sched, rng, ema, time.time() - t0, log.tell())
            if done == args.stop_after:
                log.close()
                return
    log.close()
    if not args.steps:  # an averaging step: no log
        log_path.unlink()
    for h in hooks:
        h.remove()
    train_s = time.time() - t0
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if args.steps:
        model.config.chunk_markers = args.doc_share > 0  # its which-document contexts were packed with them
    save_model(model, args.out, tokenizer=tok)

    t1 = time.time()
    eval_lengths = [int(x) for x in args.eval_lengths.split(",")]
    scores = evaluate(model, tok, eval_lengths, None, args.eval_samples, args.seed + 1, sents)
    # and on open keys of held-out words (what a vocab-key model fails at, worth seeing on its card)
    open_scores = evaluate(model, tok, eval_lengths, None, args.eval_samples, args.seed + 1, sents, keys="open")
    scores.update({k.replace("@", ", open keys@"): v for k, v in open_scores.items()})
    eval_s = time.time() - t1
    earlier = []  # a second stage's card keeps the first stage's training and command lines
    if args.init is not None and (args.init / "CARD.md").exists():
        earlier = [
            "- before this, the model it started from (`--init`):",
            *(
                "  " + line
                for line in (args.init / "CARD.md").read_text().splitlines()
                if line.startswith(("- training:", "- weights:", "- command:", "  "))
            ),
        ]
    card = [
        "# longctx embedded default model",
        "",
        "A Scout-architecture decoder at small width, trained from scratch by "
        "`examples/train_tiny_model.py` to retrieve facts from long contexts.",
        "",
        f"- architecture: {cfg.num_hidden_layers} layers ({', '.join(cfg.layer_kinds)}), hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads × {cfg.head_dim}, "
        f"{cfg.num_local_experts} experts top-1 + shared expert (width {cfg.intermediate_size}), "
        f"attention chunk {cfg.attention_chunk_size}, floor_scale {cfg.floor_scale}, vocab {cfg.vocab_size}"
        f"{', tied embeddings' if cfg.tie_word_embeddings else ''}; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, fp32",
        *(training_lines(args, train_s) if args.steps else [average_line(args)]),
        f"- hardware: {platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}",
        f"- command: `python examples/train_tiny_model.py --steps {args.steps} --tokens {args.tokens} "
        f"--turns {args.turns} "
        f"--guide {args.guide} --lr {args.lr} "
        + (f"--init {args.init} " if args.init else "")
        + (f"--average {args.average} --average-weight {args.average_weight} " if args.average else "")
        + f"--doc-share {args.doc_share} "
        + ("--title-head " if args.title_head else "")
        + ("--copy-loss " if args.copy_loss else "")
        + ("--reset-title-words " if args.reset_title_words else "")
        + (f"--keys {args.keys} " if args.keys != "vocab" else "")
        + (f"--balance {args.balance} " if args.balance else "")
        + f"--seed {args.seed} --threads {args.threads} --chunk {args.chunk} --max-len {args.max_len} "
        f"--eval-lengths {args.eval_lengths} --eval-samples {args.eval_samples} --probe-every {args.probe_every}"
        + (f" --out {args.out}" if args.out.resolve() != DEFAULT_MODEL.resolve() else "")
        + "`",
        *earlier,
        "",
        f"## Scores (exact match, eval-split keys, {args.eval_samples} samples per cell, greedy, "
        f"chunked prefill + KV cache; {eval_s / 60:.1f} min)",
        "",
        "| task | " + " | ".join(args.eval_lengths.split(",")) + " |",
        "|---|" + "---|" * len(args.eval_lengths.split(",")),
    ]
    kinds = ("single", "distractor", "none", "document")
    for kind in kinds + tuple(f"{k}, open keys" for k in kinds):
        card.append(
            f"| {kind} | " + " | ".join(f"{scores[f'{kind}@{L}']:.0%}" for L in args.eval_lengths.split(",")) + " |"
        )
    if ema is not None:
        card += ["", f"Final training loss (EMA): {ema:.3f}. Log: `{log_path.name}` in this folder."]
    (args.out / "CARD.md").write_text("\n".join(card) + "\n")
    shutil.rmtree(args.out / "resume", ignore_errors=True)  # finished: the card marks it
    print("\n".join(card))


def training_lines(args, train_s: float) -> list[str]:
    """The card's data and training lines of a stage that trained."""
    return [
        f'- data: generated on the fly (seed {args.seed}): needles "{needles.NEEDLE}" in English sentences from '
        "Python's pydoc_data (a fifth in the five-sentence noise haystack): contexts with 1-12 needles, one needle, "
        f'4 needles (3 distractors), no needle (answer "{NOT_STATED}"), and which-document contexts of 3-8 packed '
        f"documents (3-20 from 768 tokens on) with chunk markers ({args.doc_share:.0%} of the rows); "
        f"up to {args.turns} chat turns of questions per context (single keys, two keys at once, keys not "
        "in the context); train-split keys only"
        + {
            "vocab": "",
            "open": " (open keys: words, codes and numbers, split by word; see longctx/tasks/needles.py)",
            "mix": f" ({MIX_OPEN:.0%} of the rows with open keys: words, codes and numbers, split by word; "
            "the rest vocab keys)",
        }[args.keys],
        f"- training: {args.steps} steps of ~{args.tokens} tokens, lengths up to {args.max_len} "
        + (
            "(a second stage: no warm-up"
            + (
                f"; from {args.average_weight} x `{args.average}`'s + {1 - args.average_weight} x the `--init` "
                "model's weights"
                if args.average
                else ""
            )
            + ")"
            if args.init
            else "(recall warm-up on needles alone or at 192-512, then a curriculum)"
        )
        + f", AdamW lr {args.lr}, loss on answer tokens only, plus attention guidance "
        f"(weight {args.guide}: local heads to the key, global heads to the needle's value; mimetic initialisation "
        f"of the global layers; see the script)"
        + (f", router load balancing (weight {args.balance})" if args.balance else "")
        + f"; {train_s / 60:.1f} min",
    ]


def average_line(args) -> str:
    """The card's line for a step that trained nothing but averaged two models' weights."""
    return (
        f"- weights: no training; {args.average_weight} x `{args.average}`'s + {1 - args.average_weight} x the "
        "`--init` model's (average_weights in the script)"
    )


# ---- checkpoint and resume -------------------------------------------------------------------
#
# A resumable state is everything the next step reads: weights, AdamW moments, the schedule's
# position, the data RNG (Python ``random.Random``) and torch's CPU RNG, the loss EMA and the log's
# length. Restored, the steps after it draw the same batches in the same order and do the same
# float operations, so a resumed run ends in the same bytes as one never stopped.

# Arguments that change the weights or the log lines: a resume with others is refused. threads
# is one of them, since the float sums' order (hence the bytes) follows the thread count.
SHAPING = (
    "steps",
    "tokens",
    "turns",
    "lr",
    "guide",
    "doc_share",
    "title_head",
    "reset_title_words",
    "copy_loss",
    "seed",
    "threads",
    "chunk",
    "max_len",
    "probe_every",
    "init",
    "keys",
    "balance",
)
# Shaping arguments added later: a checkpoint written before them was trained with these values.
SHAPING_DEFAULTS = {"keys": "vocab", "balance": 0.0}


def _args_json(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def save_resume(args, done: int, model, opt, sched, rng: random.Random, ema, elapsed: float, log_bytes: int) -> None:
    """Write the state after ``done`` steps to ``args.out/resume/`` atomically (a kill leaves the
    previous checkpoint or this one, whole): ``model.safetensors`` (the weights, tied ones once),
    ``optimizer.safetensors`` (AdamW's per-parameter tensors as ``{index}.{name}``, and torch's
    CPU RNG state as a uint8 tensor ``torch_rng``) and ``state.json`` (the rest)."""
    optim = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, st in optim["state"].items() for k, v in st.items()}
    tensors["torch_rng"] = torch.get_rng_state()
    sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    state = {
        "step": done,
        "rng": rng.getstate(),
        "ema": ema,
        "elapsed_s": elapsed,
        "log_bytes": log_bytes,
        "param_groups": optim["param_groups"],
        "scheduler": sched_state,
        "args": _args_json(args),
    }
    with atomic_folder(args.out / "resume") as tmp:
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        safetensors.torch.save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state))


def load_resume(args, model, opt, sched, rng: random.Random) -> tuple[int, float | None, float, int]:
    """Restore the state ``save_resume`` wrote into ``model``, ``opt``, ``sched``, ``rng`` and
    torch's RNG. Returns (steps done, loss EMA, elapsed seconds, train.log length in bytes).
    Raises ValueError when there is no checkpoint or a training-shaping argument differs."""
    folder = args.out / "resume"
    if not (folder / "state.json").exists():
        raise ValueError(f"--resume: no checkpoint in {folder} (write one with --checkpoint-every)")
    state = json.loads((folder / "state.json").read_text())
    now = _args_json(args)
    for name in SHAPING:
        then = state["args"].get(name, SHAPING_DEFAULTS.get(name))
        if then != now[name]:
            raise ValueError(
                f"--resume: --{name.replace('_', '-')} is {now[name]!r}, the checkpoint in {folder} "
                f"was trained with {then!r}"
            )
    safetensors.torch.load_model(model, str(folder / "model.safetensors"))
    tensors = safetensors.torch.load_file(str(folder / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng"))
    per_param: dict = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
    opt.load_state_dict({"state": per_param, "param_groups": groups})
    sched.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(groups)})
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return state["step"], state["ema"], state["elapsed_s"], state["log_bytes"]


if __name__ == "__main__":
    main()
