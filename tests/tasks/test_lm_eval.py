"""longctx as an lm-evaluation-harness model: a local multiple-choice task run through
``simple_evaluate`` and through the command line gets the log-likelihoods of a plain full
forward; rolling log-likelihoods and generation equal their direct computations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import longctx  # noqa: E402
from longctx.generate import prefill  # noqa: E402
from longctx.tasks.lm_eval import LongctxLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"question": "What colour is a clear sky?", "choices": ["blue", "green", "bright red"], "answer": 0},
    {"question": "How many legs has a spider?", "choices": ["six", "eight", "ten"], "answer": 1},
    {"question": "Which is a fruit?", "choices": ["a carrot", "a potato", "an apple"], "answer": 2},
    {"question": "What does ice turn into when it melts?", "choices": ["water", "steam", "sand"], "answer": 0},
    {"question": "Which planet do we live on?", "choices": ["Mars", "Earth", "Venus"], "answer": 1},
]
TASK = "longctx_mc_test"


def write_task(folder) -> None:
    """A multiple-choice task on a local JSONL file: lm-eval's ``json`` dataset builder, no download."""
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "mc.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )


@pytest.fixture(scope="module")
def model():
    return longctx.load_model()


def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 from one full forward, no cache: (len(ids) - 1,) float64."""
    logits = model(torch.tensor([ids]))[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].double()


def direct_loglikelihood(model, context: str, continuation: str) -> float:
    """The continuation's log-likelihood after BOS + context: the continuation's tokens are
    those the whole string has beyond the context's own."""
    tok = model.tokenizer
    ctx = [tok.bos_id, *tok.encode(context)]
    whole = [tok.bos_id, *tok.encode(context + continuation)]
    cont = whole[len(ctx) :]
    return float(token_logprobs(model, ctx + cont)[len(ctx) - 1 :].sum())


def check_samples(model, samples) -> None:
    """Every choice's log-likelihood equals the direct one, and acc follows from them. In memory
    a sample's arguments are (context, continuation) tuples; lm-eval's JSONL writes them as
    {"gen_args_i": {"arg_0": context, "arg_1": continuation}} and the numbers as strings."""
    assert sorted(s["doc_id"] for s in samples) == list(range(len(DOCS)))
    for s in samples:
        doc = DOCS[s["doc_id"]]
        context = f"Question: {doc['question']}\nAnswer:"
        args = s["arguments"]
        pairs = (
            [tuple(a) for a in args] if isinstance(args, list) else [(a["arg_0"], a["arg_1"]) for a in args.values()]
        )
        assert pairs == [(context, " " + c) for c in doc["choices"]]
        expected = [direct_loglikelihood(model, context, " " + c) for c in doc["choices"]]
        got = [float(r[0][0]) for r in s["resps"]]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert s["acc"] == float(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])


def test_registered_beside_lm_evals_own_models():
    assert get_model("longctx") is LongctxLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's registry still has its own models


def test_import_longctx_needs_no_lm_eval():
    code = "import sys, longctx, longctx.tasks; longctx.load_model; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_simple_evaluate_multiple_choice_matches_full_forward(tmp_path, model):
    write_task(tmp_path)
    # chunk_size 4: the shared context is prefilled, and choices scored, in several pieces.
    out = simple_evaluate(
        model="longctx",
        model_args={"chunk_size": 4},
        tasks=[TASK],
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    samples = out["samples"][TASK]
    check_samples(model, samples)
    assert out["results"][TASK]["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / len(DOCS))


def test_cli_multiple_choice_matches_full_forward(tmp_path, model):
    write_task(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "longctx.tasks.lm_eval",
        "run",
        "--model",
        "longctx",
        "--tasks",
        TASK,
        "--include_path",
        str(tmp_path),
        "--log_samples",
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = (tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")
    check_samples(model, [json.loads(line) for line in path.read_text().splitlines()])


def test_choices_sharing_a_context_score_as_alone(model, monkeypatch):
    """One prefill per context, forked per continuation: a continuation's score does not depend
    on the others scored after the same prefill, and continuations longer than chunk_size are
    scored piece by piece."""
    lm = LongctxLM(pretrained=model, chunk_size=3)
    context = "The report lists the totals for each region in the last year."
    conts = [" North had the most sales of all regions, by far.", " South", " East and West were level."]
    reqs = [Instance("loglikelihood", {}, (context, c), i) for i, c in enumerate(conts)]
    prefilled = []

    def counting(model, tokens, *args, **kwargs):
        prefilled.append(tokens.shape[1])
        return prefill(model, tokens, *args, **kwargs)

    monkeypatch.setattr("longctx.tasks.lm_eval.prefill", counting)
    together = lm.loglikelihood(reqs, disable_tqdm=True)
    # BOS + the context but its last token, which each fork feeds before its continuation
    assert prefilled == [len(model.tokenizer.encode(context))]
    alone = [lm.loglikelihood([r], disable_tqdm=True)[0] for r in reversed(reqs)][::-1]
    assert together == alone
    assert [lp for lp, _ in together] == pytest.approx(
        [direct_loglikelihood(model, context, c) for c in conts], rel=1e-5, abs=1e-4
    )


def test_is_greedy_is_the_argmax_continuation(model):
    lm = LongctxLM(pretrained=model)
    tok = model.tokenizer
    context = "Question: Which is a fruit?\nAnswer:"
    ids = [tok.bos_id, *tok.encode(context)]
    greedy = longctx.generate(model, ids, max_new_tokens=3, stop_ids=[]).tokens[0]
    other = (greedy[-1] + 1) % tok.vocab_size
    for cont, expected in ((greedy, True), (greedy[:-1] + [other], False)):
        text = tok.decode(cont)
        assert tok.encode(context + text)[len(ids) - 1 :] == cont, "the continuation must tokenize back to itself"
        ((_, is_greedy),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, text), 0)], disable_tqdm=True)
        assert is_greedy is expected


@pytest.mark.parametrize("max_length", [None, 120])
def test_loglikelihood_rolling_is_the_sum_over_the_harness_windows(model, max_length):
    """Without a limit, one full forward after BOS; with max_length L, the windows the harness
    defines: the first predicts tokens 0..L-1 after BOS, each next one the following L tokens
    from the L tokens before each, and the last its remaining tokens from the L tokens before."""
    tok = model.tokenizer
    # 300 tokens: past the embedded model's 128-token attention chunk, three windows of 120.
    text = " ".join(f"Item {i} weighs {i * 7 % 13} kilograms." for i in range(20))
    ids = tok.encode(text)
    n = len(ids)
    lm = LongctxLM(pretrained=model, max_length=max_length)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    if max_length is None:
        expected = token_logprobs(model, [tok.bos_id, *ids]).sum()
    else:
        L = max_length
        assert 2 * L < n < 3 * L, "the text must span three windows"
        expected = (
            token_logprobs(model, [tok.bos_id, *ids[:L]]).sum()
            + token_logprobs(model, ids[L - 1 : 2 * L]).sum()
            + token_logprobs(model, ids[n - L - 1 :])[L - (n - 2 * L) :].sum()
        )
    assert got == pytest.approx(float(expected), rel=1e-5, abs=1e-4)


def test_generate_until_equals_generate_and_stops_at_the_stop_string(model):
    tok = model.tokenizer
    context = "Question: What does ice turn into when it melts?\nAnswer:"
    ids = [tok.bos_id, *tok.encode(context)]
    lm = LongctxLM(pretrained=model)

    def run(**gen_kwargs):
        torch.manual_seed(0)
        (text,) = lm.generate_until([Instance("generate_until", {}, (context, gen_kwargs), 0)], disable_tqdm=True)
        return text

    def reference(**kw):
        torch.manual_seed(0)
        return tok.decode(longctx.generate(model, ids, max_new_tokens=24, **kw).tokens[0])

    assert run(until=[], max_gen_toks=24) == reference()
    sampled = reference(temperature=1.0)
    assert run(until=[], max_gen_toks=24, do_sample=True, temperature=1.0) == sampled
    stop = sampled[len(sampled) // 2 : len(sampled) // 2 + 3]
    assert len(stop) == 3 and stop in sampled
    cut = run(until=["\x00never", stop], max_gen_toks=24, do_sample=True, temperature=1.0)
    assert cut == sampled[: sampled.index(stop)]


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="max_length"):
        LongctxLM(pretrained=model, max_length=model.config.max_position_embeddings + 1)
    with pytest.raises(TypeError, match="pretrained"):
        LongctxLM(pretrained=3)
    lm = LongctxLM(pretrained=model, max_length=8)
    bos = model.tokenizer.bos_id
    with pytest.raises(ValueError, match="continuation has 9 tokens"):
        lm._loglikelihood_tokens([(None, [bos], [bos] * 9)])
