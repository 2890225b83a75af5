"""Tokenizer: round trips, special-token hygiene, chat layout, Scout ids, file errors, long inputs, arrays."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx.text.split import MAX_WS_RUN, may_hold_long_space_run, split_for_encoding
from longctx.text.tokenizer import Tokenizer, TokenizerError, llama4_special_tokens, load_default_tokenizer, load_ranks

BYTE_RANKS = {bytes([i]): i for i in range(256)}
SPECIAL_NAMES = [
    "<|begin_of_text|>",
    "<|eot|>",
    "<|eom|>",
    "<|header_start|>",
    "<|end_of_text|>",
    "<|finetune_right_pad|>",
]

# Characters that matter to the regex: every kind of whitespace (and look-alikes that are NOT
# regex whitespace: U+001C..U+001F, U+200B), "/" (absorbed after punctuation), apostrophes
# (contractions), digits, upper/lower letters, combining marks, CJK, emoji.
TRICKY = list(" \t\n\r\x0b\x0c\x85\xa0\u2028\u2029\u3000\x1c\x1f\u200b/.,!'-sStTdD1٣aAé\u0301中😀")
tricky_text = st.lists(
    st.one_of(
        st.sampled_from(TRICKY),
        st.sampled_from(SPECIAL_NAMES),
        st.sampled_from(["  ", "\n\n", " \n ", "'s", "1234567"]),
    ),
    max_size=40,
).map("".join)
any_text = st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80), tricky_text)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return Tokenizer.from_ranks(BYTE_RANKS, special_tokens=llama4_special_tokens(256, 32))


# ---- default asset ----------------------------------------------------------------------------


def test_default_tokenizer_layout(tok):
    assert Tokenizer.default() is tok
    assert tok.n_ranks == 8192 and len(tok.special_tokens) == 256 and tok.vocab_size == 8448
    assert (tok.bos_id, tok.eos_id, tok.eom_id, tok.eot_id, tok.pad_id) == (8192, 8193, 8199, 8200, 8210)
    assert tok.special_tokens["<|header_start|>"] == 8197 and tok.special_tokens["<|header_end|>"] == 8198
    assert tok.special_tokens["<|python_start|>"] == 8208 and tok.special_tokens["<|python_end|>"] == 8209
    assert tok.stop_ids == {8193, 8199, 8200}
    assert [tok.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    assert len(tok.fingerprint) == 64
    assert tok.fingerprint == Tokenizer.from_file(tok_path()).fingerprint  # stable across loads


def tok_path():
    from importlib.resources import files

    return files("longctx").joinpath("assets", "default", "tokenizer.model")


def test_default_tokenizer_compresses_english_and_splits_digits(tok):
    text = "The tokenizer splits text into pieces, then merges frequent byte pairs."
    ids = tok.encode(text)
    assert len(ids) < len(text) / 3
    assert tok.decode(ids) == text
    # \p{N}{1,3}: digits come in groups of at most three
    assert [tok.decode([i]) for i in tok.encode("1234567")] == ["123", "456", "7"]


# ---- round trips ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_roundtrip_default(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert all(0 <= i < tok.n_ranks for i in ids)  # plain text never yields a special id


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_roundtrip_byte_only(byte_tok, s):
    ids = byte_tok.encode(s)
    assert ids == list(s.encode("utf-8"))  # no merges: one token per byte
    assert byte_tok.decode(ids) == s
    assert byte_tok.decode_bytes(ids) == s.encode("utf-8")


def test_roundtrip_whitespace_runs_and_literals(tok):
    for s in ["", " ", "\n", " " * 1000, "\t \t\n\n  x  ", "a\r\n\r\nb", "<|eot|><|begin_of_text|>", "x" * 5000]:
        assert tok.decode(tok.encode(s)) == s


# ---- special tokens ---------------------------------------------------------------------------


def test_specials_only_where_asked(tok):
    text = "Say <|begin_of_text|> and <|eot|> or <|eom|><|header_start|>user<|header_end|>"
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special_tokens.values())
    assert tok.decode(plain) == text
    assert tok.encode(text, bos=True) == [tok.bos_id] + plain
    assert tok.encode(text, eos=True) == plain + [tok.eos_id]
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + plain + [tok.eos_id]
    assert tok.encode_batch([text, "", text], num_threads=2) == [plain, [], plain]


def test_decode_renders_special_names(tok):
    ids = [tok.bos_id] + tok.encode("hi") + [tok.eot_id]
    assert tok.decode(ids) == "<|begin_of_text|>hi<|eot|>"
    assert tok.token_bytes(tok.eom_id) == b"<|eom|>"
    import torch

    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    with pytest.raises(TokenizerError, match="8448"):
        tok.decode([1, 8448])
    with pytest.raises(TokenizerError):
        tok.token_bytes(-1)


def test_explicit_special_tokens_small_vocab():
    specials = {
        "<|begin_of_text|>": 300,
        "<|end_of_text|>": 301,
        "<|header_start|>": 302,
        "<|header_end|>": 303,
        "<|eom|>": 304,
        "<|eot|>": 305,
        "<|finetune_right_pad|>": 306,
    }
    ranks = dict(BYTE_RANKS)
    ranks.update({b"ab": 256, b"abab": 257})
    ranks.update({bytes([0, i]): 258 + i for i in range(42)})  # filler ranks up to 299
    t = Tokenizer.from_ranks(ranks, special_tokens=specials)
    assert t.vocab_size == 307 and t.bos_id == 300 and t.pad_id == 306
    assert t.encode("ababab") == [257, 256]
    with pytest.raises(TokenizerError, match="missing"):
        Tokenizer.from_ranks(ranks, special_tokens={"<|begin_of_text|>": 300})
    with pytest.raises(TokenizerError, match=">= 300"):
        Tokenizer.from_ranks(ranks, special_tokens={**specials, "<|eot|>": 5})


# ---- chat -------------------------------------------------------------------------------------


def test_chat_layout_exact(tok):
    msgs = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Who are you? <|eot|><|begin_of_text|>"},
    ]
    S = tok.special_tokens
    nl2 = tok.encode("\n\n")

    def header(role):
        return [S["<|header_start|>"]] + tok.encode(role) + [S["<|header_end|>"]] + nl2

    expected = (
        [S["<|begin_of_text|>"]]
        + header("system") + tok.encode(msgs[0]["content"]) + [S["<|eot|>"]]
        + header("user") + tok.encode(msgs[1]["content"]) + [S["<|eot|>"]]
        + header("assistant")
    )  # fmt: skip
    ids = tok.chat(msgs)
    assert ids == expected
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eot_id) == 2  # user text injected nothing
    assert tok.render_chat(msgs) == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a helpful assistant<|eot|>"
        "<|header_start|>user<|header_end|>\n\nWho are you? <|eot|><|begin_of_text|><|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    assert tok.decode(ids) == tok.render_chat(msgs)
    assert tok.chat(msgs, add_generation_prompt=False) == expected[: -len(header("assistant"))]


def test_chat_roles_and_eom(tok):
    msgs = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "<|python_start|>get()<|python_end|>", "eom": True},
        {"role": "tool", "content": '{"t": 21}'},
    ]
    ids = tok.chat(msgs)
    assert ids.count(tok.eom_id) == 1 and ids.count(tok.eot_id) == 2
    assert '<|header_start|>ipython<|header_end|>\n\n{"t": 21}<|eot|>' in tok.render_chat(msgs)
    assert tok.chat([]) == [tok.bos_id] + tok.chat([], add_generation_prompt=True)[1:]
    for bad, match in [
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": ["x"]}], "content"),
        ([{"role": "user", "content": "x", "name": "bob"}], "unsupported keys"),
        ([{"role": "ipython", "content": "x", "eom": True}], "eom"),
        (["user: hi"], "dict"),
        ("hi", "list"),
    ]:
        with pytest.raises(TokenizerError, match=match):
            tok.chat(bad)


# ---- Scout layout -----------------------------------------------------------------------------


def test_scout_special_layout():
    sp = llama4_special_tokens(200000)
    assert len(sp) == 2048 and sorted(sp.values()) == list(range(200000, 202048))
    expect = {
        "<|begin_of_text|>": 200000,
        "<|end_of_text|>": 200001,
        "<|fim_prefix|>": 200002,
        "<|fim_suffix|>": 200004,
        "<|header_start|>": 200005,
        "<|header_end|>": 200006,
        "<|eom|>": 200007,
        "<|eot|>": 200008,
        "<|step|>": 200009,
        "<|text_post_train_reserved_special_token_0|>": 200010,
        "<|python_start|>": 200016,
        "<|python_end|>": 200017,
        "<|finetune_right_pad|>": 200018,
        "<|text_post_train_reserved_special_token_8|>": 200019,
        "<|text_post_train_reserved_special_token_68|>": 200079,
        "<|image_start|>": 200080,
        "<|image_end|>": 200081,
        "<|tile_x_separator|>": 200084,
        "<|tile_y_separator|>": 200085,
        "<|image|>": 200090,
        "<|patch|>": 200092,
        "<|reasoning_reserved_special_token_0|>": 201134,
        "<|reasoning_thinking_start|>": 201142,
        "<|reasoning_thinking_end|>": 201143,
        "<|reserved_special_token_0|>": 201144,
        "<|reserved_special_token_903|>": 202047,
    }
    assert {k: sp[k] for k in expect} == expect
    # A small table keeps the same offsets.
    small = llama4_special_tokens(8192, 256)
    assert all(small[k] - 8192 == sp[k] - 200000 for k in small)
    with pytest.raises(TokenizerError, match="too small"):
        llama4_special_tokens(256, 10)


def test_default_layout_vocab_size_and_ids(byte_tok):
    t = Tokenizer.from_ranks(BYTE_RANKS)  # default 2048 reserved ids
    assert t.vocab_size == 256 + 2048
    assert (t.bos_id, t.eom_id, t.eot_id, t.pad_id) == (256, 263, 264, 274)


# ---- files ------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found.*nope.model"):
        Tokenizer.from_file(tmp_path / "nope.model")


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ("QUJD", "expected 'base64_token rank'"),
        ("QUJD 300 7", "expected 'base64_token rank'"),
        ("Q!JD 300", "invalid base64"),
        ("QUJD -3", "non-negative integer"),
        ("AA== 300", "duplicate token"),
        ("QUJD 5", "duplicate rank 5"),
    ],
)
def test_malformed_line(tmp_path, bad_line, match):
    p = tmp_path / "bad.model"
    good = p.with_name("good.model")
    Tokenizer.from_ranks(BYTE_RANKS).save(good)
    lines = good.read_text().splitlines()
    lines.insert(100, bad_line)  # becomes line 101
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(TokenizerError, match=rf"bad\.model:101: .*{match}"):
        Tokenizer.from_file(p)


def test_rank_gaps_and_missing_bytes(tmp_path):
    with pytest.raises(TokenizerError, match="rank 256 is missing"):
        Tokenizer.from_ranks({**BYTE_RANKS, b"ab": 257})
    with pytest.raises(TokenizerError, match="single byte"):
        Tokenizer.from_ranks({bytes([i]): i for i in range(255)} | {b"ab": 255})
    (tmp_path / "empty.model").write_text("\n")
    with pytest.raises(TokenizerError, match="no ranks"):
        load_ranks(tmp_path / "empty.model")


def test_save_load_sidecar(tmp_path, tok):
    path = tmp_path / "tokenizer.model"
    tok.save(path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["format"] == "longctx-tokenizer"
    again = Tokenizer.from_file(tmp_path)  # a folder means folder/tokenizer.model
    assert again.special_tokens == tok.special_tokens and again.fingerprint == tok.fingerprint
    assert again.encode("round trip") == tok.encode("round trip")
    # Explicit special tokens beat the sidecar; without sidecar the 2048 layout applies.
    assert Tokenizer.from_file(path, special_tokens=llama4_special_tokens(8192, 64)).vocab_size == 8192 + 64
    (tmp_path / "tokenizer.json").unlink()
    assert Tokenizer.from_file(path).vocab_size == 8192 + 2048


def test_hf_tokenizer_json_is_ignored_and_kept(tmp_path, tok):
    hf = tmp_path / "tokenizer.json"
    hf.write_text('{"version": "1.0", "truncation": null, "added_tokens": []}')
    default_layout = Tokenizer.from_ranks(tok._ranks)
    default_layout.save(tmp_path / "tokenizer.model")  # no sidecar needed: HF file untouched
    assert Tokenizer.from_file(tmp_path / "tokenizer.model").vocab_size == 8192 + 2048
    with pytest.raises(TokenizerError, match="not a longctx tokenizer sidecar"):
        tok.save(tmp_path / "tokenizer.model")
    assert hf.read_text().startswith('{"version": "1.0"')


def test_fingerprint_sensitive_to_ranks_and_specials():
    a = Tokenizer.from_ranks(BYTE_RANKS)
    b = Tokenizer.from_ranks({**BYTE_RANKS, b"ab": 256})
    c = Tokenizer.from_ranks(BYTE_RANKS, num_reserved_special_tokens=64)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.fingerprint == Tokenizer.from_ranks(dict(reversed(list(BYTE_RANKS.items())))).fingerprint


# ---- long inputs ------------------------------------------------------------------------------

# English, code, numbers, Unicode and emoji (the opening lines of test_bpe's training corpus).
PROSE = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.\n"
    "Tokenizers split text into pieces and merge frequent pairs of bytes.\n"
    "Numbers like 1234567 and 2024 are split into groups of three digits.\n"
    "    indented code:  x = foo(bar, baz)  # comment\n\n"
    "Ünïcödé wörds, 中文字符, and emoji 😀😀 are bytes too. It's, we're, they'll.\n"
)


def _encode_parts(t: Tokenizer, parts) -> list[int]:
    return [
        i for p in parts for i in (t._enc.encode_ordinary(p) if isinstance(p, str) else t._enc._encode_single_piece(p))
    ]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tricky_text, st.integers(1, 8), st.integers(1, 5))
def test_split_never_changes_tokens(tok, s, chunk_chars, max_ws_run):
    """Cutting with tiny limits (many cuts) gives exactly one tiktoken call's result."""
    parts = split_for_encoding(s, chunk_chars=chunk_chars, max_ws_run=max_ws_run)
    assert "".join(p if isinstance(p, str) else p.decode() for p in parts) == s
    assert _encode_parts(tok, parts) == tok._enc.encode_ordinary(s)


def test_split_cuts_where_expected():
    assert split_for_encoding("ab\ncd\n/e\n f", chunk_chars=1) == ["ab\n", "cd\n/e\n f"]
    assert split_for_encoding("a" + " " * 5 + "b", max_ws_run=3) == ["a", b"    ", " b"]
    assert split_for_encoding("a" + " " * 5, max_ws_run=3) == ["a", b"     "]  # at the end: one piece
    assert split_for_encoding("a" + " " * 5 + "\nb", max_ws_run=3) == ["a     \nb"]  # newline follows: regex copes


def test_long_inputs_exact_and_fast(tok):
    block = PROSE + "<|eot|> 3.14159 " + "word" * 50 + "\n"
    text = block * (2_000_000 // len(block))  # ~2 MB, many lines
    t0 = time.perf_counter()
    ids = tok.encode(text)
    dt = time.perf_counter() - t0
    assert ids == tok._enc.encode_ordinary(text)  # one tiktoken call copes with this size
    assert dt < 5.0, f"2 MB took {dt:.1f} s"
    assert tok.encode_batch([text[:100_000], text]) == [tok.encode(text[:100_000]), ids]

    # 200k spaces: taken out of the regex (> MAX_WS_RUN) yet identical to one tiktoken call.
    mid = "x\n" + " " * 200_000 + "y z" + " " * 200_000
    assert tok.encode(mid) == tok._enc.encode_ordinary(mid)

    # 1.2M spaces: one tiktoken call panics here (over ~1e6); the result follows the regex's definition:
    # "\s+(?!\S)" takes all but the last space, which joins the next word.
    run = " " * 1_200_000
    huge = "start\n" + run + "end\n" + run
    t0 = time.perf_counter()
    ids = tok.encode(huge)
    dt = time.perf_counter() - t0
    expect = (
        tok._enc.encode_ordinary("start\n")
        + tok._enc._encode_single_piece(run[:-1].encode())
        + tok._enc.encode_ordinary(" end\n")
        + tok._enc._encode_single_piece(run.encode())
    )
    assert ids == expect and tok.decode(ids) == huge
    assert dt < 5.0, f"2.4 MB of spaces took {dt:.1f} s"


def test_long_space_run_check():
    assert not may_hold_long_space_run("word " * 100_000)
    for offset in (0, 1, 12_345, MAX_WS_RUN // 2 - 1):
        text = "x" * offset + " " * (MAX_WS_RUN - 1) + "y" * 1000
        assert may_hold_long_space_run(text), offset


# ---- int32 arrays -----------------------------------------------------------------------------


def test_encode_arrays_equal_encode(tok):
    texts = [
        "",
        "footer\n",
        "Lorem ipsum dolor sit amet, 123456 times.\n" * 5_000,  # cut into several jobs
        "footer\n",  # a repeated short text: encoded once, the same ids
        "before" + " " * 70_000 + "after",  # a whitespace run taken out of the regex
        "<|eot|> is plain text here",
    ]
    arrays = list(tok.encode_arrays(texts, num_threads=2))
    assert all(a.dtype == np.int32 for a in arrays)
    assert [a.tolist() for a in arrays] == [tok._enc.encode_ordinary(t) for t in texts]
    assert tok.encode_batch(texts) == [a.tolist() for a in arrays]
    stream = tok.encode_arrays(texts * 50, num_threads=2)
    assert next(stream).tolist() == []
    stream.close()  # stops the pool early
    with pytest.raises(TypeError, match="expects str"):
        tok.encode_arrays(["ok", b"bytes"])
