"""Comparing variants: the exact paired test, and on the embedded model a damaged global layer
shows a drop whose interval excludes 0 while an identical variant differs by exactly 0."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import text_model
from longctx import load_model
from longctx.cli import main
from longctx.tasks.compare import (
    clopper_pearson,
    compare,
    load_variants,
    mcnemar_exact,
    paired_difference,
    weight_bytes,
)
from longctx.text.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_exact_tests_match_hand_computed_values():
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024) == mcnemar_exact(9, 1)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187086, abs=1e-5) and hi == pytest.approx(1 - 0.187086, abs=1e-5)


def test_interval_excludes_zero_exactly_when_the_test_rejects():
    for losses in range(13):
        for gains in range(13):
            ref = [True] * losses + [False] * gains + [True] * 5
            other = [False] * losses + [True] * gains + [True] * 5
            d = paired_difference(ref, other)
            assert d["difference"] == pytest.approx((gains - losses) / len(ref))
            assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
            excludes = d["ci95"][0] > 0 or d["ci95"][1] < 0
            assert excludes == (d["p"] < 0.05), (losses, gains, d)
    same = paired_difference([True, False, True], [True, False, True])
    assert same == {"difference": 0.0, "ci95": (0.0, 0.0), "p": 1.0, "gains": 0, "losses": 0, "n": 3}


def test_damaged_global_layer_drops_with_an_interval_excluding_zero_and_a_copy_differs_by_zero(tmp_path):
    model = load_model()
    damaged = copy.deepcopy(model)
    layer = model.config.layer_kinds.index("global")
    with torch.no_grad():
        damaged.layers[layer].self_attn.o_proj.weight.zero_()
    cmp = compare(
        {"fp32": model, "copy": copy.deepcopy(model), "damaged": damaged},
        tasks=["single"],
        lengths=[1024],
        depths=[0.25, 0.75],
        samples=4,
        heldout_tokens=256,
        decode_tokens=4,
        out=tmp_path,
        progress=False,
    )
    same, drop = cmp.difference("copy"), cmp.difference("damaged")
    assert same["difference"] == 0.0 and same["ci95"] == (0.0, 0.0) and same["p"] == 1.0 and same["n"] == 8
    assert cmp.accuracy("fp32")["accuracy"] >= 0.75  # the embedded model retrieves at 1K
    assert (
        drop["ci95"][1] < 0
        and drop["p"] < 0.05
        and drop["difference"] == cmp.accuracy("damaged")["accuracy"] - cmp.accuracy("fp32")["accuracy"]
    )
    assert cmp.stats["copy"]["agreement"] == 1.0 and cmp.stats["copy"]["kl"] == 0.0
    assert cmp.stats["damaged"]["agreement"] < 1.0 and cmp.stats["damaged"]["kl"] > 0.0
    assert cmp.stats["fp32"]["weight_bytes"] == cmp.stats["damaged"]["weight_bytes"] == weight_bytes(model)
    assert all(s["prefill_tok_s"] > 0 and s["decode_ms"] > 0 for s in cmp.stats.values())
    table = cmp.to_markdown()
    assert "| single | 1k |" in table and "Δ damaged vs fp32" in table and "| damaged | 10.51 |" in table
    assert len((tmp_path / "damaged" / "single.jsonl").read_text().splitlines()) == 8
    pytest.importorskip("matplotlib")
    fig = cmp.plot(tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 0 and len(fig.axes) == 1


def test_quantized_variants_are_smaller_and_compare_refuses_bad_input():
    v = load_variants([None], ["none", "int8", "int4"], group_size=64)
    assert list(v) == ["embedded", "embedded-int8", "embedded-int4"]
    sizes = [weight_bytes(m) for m in v.values()]
    assert sizes[0] > sizes[1] > sizes[2]
    with pytest.raises(ValueError, match="non-empty dict"):
        compare({})
    with pytest.raises(ValueError, match="metric must be"):
        compare(v, metric="ruler")
    other = text_model(Tokenizer.default())
    other.tokenizer = None
    with pytest.raises(ValueError, match="'x' has no tokenizer"):
        compare({"a": v["embedded"], "x": other})
    assert math.isclose(weight_bytes(v["embedded"]), 4 * v["embedded"].config.num_parameters(), rel_tol=1e-9)


def test_cli_compare_prints_the_table_and_errors_in_one_line(tmp_path, capsys):
    rc = main(
        [
            "compare",
            "--quantize",
            "none,int8",
            "--tasks",
            "single",
            "--lengths",
            "600",
            "--depths",
            "0.5",
            "--samples",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "| embedded-int8 |" in out and "Δ embedded-int8 vs embedded" in out
    assert main(["compare", "--quantize", "int4", "--group-size", "128"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longctx compare: --group-size:") and "192" in err and "\n" not in err
    assert main(["compare", "--tasks", "single,bogus"]) == 2
    assert "--tasks: 'single,bogus': not a list of" in capsys.readouterr().err
