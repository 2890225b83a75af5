"""RULER's families: exact lengths, answers present (aggregation: truly the most frequent), an
oracle scores 100 % and a constant answerer what chance predicts; QA files; the RULER table."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import text_model
from longctx import niah
from longctx.tasks import needles, ruler
from longctx.tasks.results import Results, recall, score
from longctx.text.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TOK = Tokenizer.default()
HAY = niah.make_haystack(TOK, "english", 4000, seed=5)


def write_qa(path, n: int = 6) -> None:
    """n SQuAD-style records, each with its own paragraph and answer."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "question": f"What colour is the box number {i}?",
                        "answers": [f"tint{i}x"],
                        "context": f"The box number {i} is painted tint{i}x. " + "It sits on a shelf. " * 25,
                    }
                )
                + "\n"
            )


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "squad.jsonl"
    write_qa(path)
    return ruler.load_qa(path)


def context_text(cell) -> str:
    """The decoded context (between the user header and the question)."""
    head = len(niah.context_prefix(TOK, []))
    return TOK.decode(cell.prompt[head:]).rsplit("\n\n" + cell.question, 1)[0]


def counted(task: str, text: str) -> Counter:
    """What an aggregation task's answer counts, recounted from the prompt's text."""
    words = re.findall(r"\d+\. ([a-z]+)", text) if task == "common_words" else text.split()
    return Counter(words)


@pytest.mark.parametrize("task", ruler.TASKS)
@settings(max_examples=5, deadline=None)
@given(length=st.integers(700, 2500), seed=st.integers(0, 10**6), sample=st.integers(0, 5), depth=st.floats(0.0, 1.0))
def test_cells_have_exact_length_present_answers_and_an_oracle_scores_100(task, length, seed, sample, depth, qa):
    cell = niah.make_cell(TOK, task, length, depth, sample, seed, HAY, data=qa)
    assert len(cell.prompt) == length
    assert cell == niah.make_cell(TOK, task, length, depth, sample, seed, HAY, data=qa)  # deterministic
    text = context_text(cell)
    if task in ruler.DEPTHLESS:
        counts = counted(task, text)
        top = counts.most_common()
        k = len(cell.expected)
        assert set(cell.expected) == {w for w, _ in top[:k]} and top[k - 1][1] > top[k][1]
    elif task == "qa":
        assert any(a in text for a in cell.expected) and cell.needles[0]["text"].strip() in text
    else:
        assert all(e in text for e in cell.expected)
        for n in cell.needles:
            i = n["token_index"]
            ids = TOK.encode(" " + n["text"])
            assert cell.prompt[i : i + len(ids)] == ids  # the recorded index is exact
    oracle = cell.expected[0] if cell.any_of else ", ".join(cell.expected)
    assert recall(oracle, cell.expected, any_of=cell.any_of) == 1.0
    assert score(oracle, cell.expected, ordered=cell.ordered, any_of=cell.any_of) == (True, True)


def test_variable_tracking_is_one_chain_in_order():
    cell = niah.make_cell(TOK, "variable_tracking", 1500, 0.3, 2, 9, HAY)
    text = context_text(cell)
    chain = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text)
    assert [name for name, _ in chain] == cell.expected and len(chain) == 5
    assert chain[0][1].isdigit() and all(v == f"VAR {a}" for (a, _), (_, v) in zip(chain, chain[1:]))
    assert cell.question.endswith(f"value {chain[0][1]}?")


def test_multi_key_haystack_is_needles_with_other_keys():
    for task, kind in (("multi_key_needles", "number"), ("multi_key_uuid", "uuid")):
        cell = niah.make_cell(TOK, task, 1200, 0.5, 0, 1, HAY)
        key = cell.question.split(" for ")[1].rstrip("?")
        sentences = re.findall(rf"One of the special magic {kind}s for (\S+) is: (\S+)\.", context_text(cell))
        assert len(sentences) > 10 and [v for k, v in sentences if k == key] == cell.expected


def test_aggregation_streams_extend_so_lengths_share_prefixes():
    for task in ruler.DEPTHLESS:
        short, long = (niah.make_cell(TOK, task, L, 0.0, 1, 3, HAY) for L in (800, 3000))
        shared = next(i for i, (a, b) in enumerate(zip(short.prompt, long.prompt)) if a != b)
        assert shared > 800 - 40  # all but the short cell's padding and question
    assert ruler.top_labels(["b", "a", "b", "c", "a", "b"], 2, 99) == ["b", "a"]
    with pytest.raises(ValueError, match="length 99 is too short for an aggregation task"):
        ruler.top_labels(["a", "b", "c", "a", "b"], 1, 99)  # a tie for first


def chance_mean(task: str, answer: str, cells: int = 150, length: int = 900) -> float:
    return float(
        np.mean(
            [
                recall(answer, c.expected, any_of=c.any_of)
                for c in (niah.make_cell(TOK, task, length, 0.5, s, 11, HAY) for s in range(cells))
            ]
        )
    )


@pytest.mark.parametrize(
    "task, space",
    [("niah_words", needles._NOUNS), ("common_words", ruler.vocabulary()), ("frequent_words", ruler.vocabulary())],
)
def test_a_constant_answerer_scores_what_chance_predicts(task, space):
    answer = " ".join(sorted(space)[::2])  # every other word of the value space
    predicted = float(np.mean([w in answer for w in space]))  # RULER matches substrings: "art" in "start"
    n = 150 * {"niah_words": 1, "common_words": 10, "frequent_words": 3}[task]
    assert abs(chance_mean(task, answer) - predicted) < 4 * np.sqrt(predicted * (1 - predicted) / n) + 0.02


@pytest.mark.parametrize("task", ["niah_uuid", "multi_key_needles", "multi_key_uuid", "variable_tracking"])
def test_a_constant_answerer_scores_zero_where_answers_are_random_numbers_or_ids(task):
    assert chance_mean(task, "not stated 1234567", cells=20) == 0.0


def test_qa_constant_answer_scores_its_share_of_questions(qa):
    # Samples 0-5 ask each of the 6 questions once; one constant gold answer is right for one.
    got = [
        recall("tint0x", niah.make_cell(TOK, "qa", 900, 0.5, s, 0, HAY, data=qa).expected, any_of=True)
        for s in range(6)
    ]
    assert sum(got) == 1.0


def test_load_qa_reads_squad_and_hotpotqa_styles_and_names_bad_records(tmp_path):
    hot = tmp_path / "hotpot.json"
    hot.write_text(
        json.dumps(
            [
                {
                    "question": "Who?",
                    "answer": "Ann",
                    "context": [["A", ["Ann wrote it. ", "Then left."]], ["B", ["Bob read it."]], ["C", ["Cy slept."]]],
                    "supporting_facts": [["A", 0], ["B", 0]],
                }
            ]
        )
    )
    q = ruler.load_qa(hot)
    assert q.items == (("Who?", ("Ann",), (0, 1)),) and q.paragraphs[0] == "A\nAnn wrote it. Then left."
    cell = niah.make_cell(TOK, "qa", 400, 0.0, 0, 0, HAY, data=q)
    assert len(cell.needles) == 2 and len(cell.prompt) == 400 and "Cy slept." in context_text(cell)
    squad = tmp_path / "squad.jsonl"
    squad.write_text(
        json.dumps({"question": "Q?", "answers": {"text": ["a1", "a2"]}, "context": "P one."})
        + "\n"
        + json.dumps({"question": "R?", "answers": ["b"], "context": "P two."})
        + "\n"
    )
    assert ruler.load_qa(squad).items[0][1] == ("a1", "a2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: record 1 is neither"):
        ruler.load_qa(bad)
    with pytest.raises(ValueError, match="needs data"):
        niah.make_cell(TOK, "qa", 400, 0.0, 0, 0, HAY)


def test_ruler_scores():
    assert recall("HRFCY, LCMTO and xyz", ["HRFCY", "LCMTO", "NHUQS", "WAZBE"]) == 0.5
    assert recall("it is Tint0X", ["tint0x", "other"], any_of=True) == 1.0
    assert score("the answer is b", ["a", "b"], any_of=True) == (False, True)
    assert score("B.", ["a", "b"], any_of=True) == (True, True)


def test_table_average_and_effective_length():
    def recs(task, accs):
        return Results(
            [
                {
                    "task": task,
                    "length": L,
                    "depth": 0.5,
                    "sample": s,
                    "answer": "",
                    "expected": ["x"],
                    "ruler": float(s < round(10 * a)),
                }
                for L, a in accs.items()
                for s in range(10)
            ]
        )

    res = ruler.RulerResults(
        {"a": recs("a", {1024: 1.0, 2048: 0.9, 4096: 0.6}), "b": recs("b", {1024: 0.9, 2048: 0.8, 4096: 0.9})}
    )
    assert res.average() == pytest.approx({1024: 0.95, 2048: 0.85, 4096: 0.75})
    assert res.effective_length() == 1024 and res.effective_length(0.8) == 2048 and res.effective_length(0.99) == 0
    table = res.to_markdown()
    assert "| a | 100.0 | 90.0 | 60.0 |" in table and "| **average** | 95.0 | 85.0 | 75.0 |" in table
    assert "effective length" in table and ": 1k" in table


def test_run_journals_and_resumes_every_task(tmp_path):
    model = text_model(TOK)
    kw = dict(
        tasks=("variable_tracking", "common_words", "single"),
        lengths=[700],
        samples=1,
        out=tmp_path,
        progress=False,
        max_new_tokens=4,
    )
    first = ruler.run(model, **kw)
    assert [len(r.records) for r in first.by_task.values()] == [2, 1, 2]  # aggregation: one depth
    rec = first.by_task["common_words"].records[0]
    assert rec["haystack"] == "word list" and 0.0 <= rec["ruler"] <= 1.0 and len(rec["expected"]) == 10
    lines = {t: (tmp_path / f"{t}.jsonl").read_text() for t in kw["tasks"]}
    again = ruler.run(model, **kw)
    assert {t: (tmp_path / f"{t}.jsonl").read_text() for t in kw["tasks"]} == lines  # nothing redone
    assert again.to_markdown() == first.to_markdown()
    with pytest.raises(ValueError, match="tasks: unknown"):
        ruler.run(model, tasks=("bogus",))
