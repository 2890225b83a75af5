"""The tokenizer's vocabulary files: tiktoken rank files, the Llama 4 special-token table, the sidecar.

Rank file (Llama 4's `tokenizer.model`): one line per rank, `base64(token_bytes) rank`.
A tokenizer whose special tokens are not the default Llama 4 layout (2048 ids right after the
ranks) is saved with a JSON sidecar next to the rank file (`tokenizer.model` -> `tokenizer.json`)
that lists them; the sidecar carries `"format": "longctx-tokenizer"` so a Hugging Face
`tokenizer.json` in the same folder is never mistaken for it (nor overwritten).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["DEFAULT_NUM_RESERVED", "TokenizerError", "llama4_special_tokens", "load_ranks", "save_ranks"]

SIDECAR_FORMAT = "longctx-tokenizer"
DEFAULT_NUM_RESERVED = 2048


class TokenizerError(ValueError):
    """A tokenizer file, special-token table or chat message is invalid."""


# --------------------------------------------------------------------------------------------
# Special tokens
# --------------------------------------------------------------------------------------------


def _llama4_named_specials() -> list[str]:
    """The 1144 named Llama 4 special tokens, in id order (offsets 0..1143 after the ranks)."""

    def numbered(prefix: str, start: int, stop: int) -> list[str]:
        return [f"<|{prefix}_{i}|>" for i in range(start, stop)]

    text = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text += ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]  # +5..+9
    text += numbered("text_post_train_reserved_special_token", 0, 6)  # +10..+15
    text += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]  # +16..+18
    text += numbered("text_post_train_reserved_special_token", 8, 69)  # +19..+79
    vision = ["<|image_start|>", "<|image_end|>"]  # +80, +81
    vision += numbered("vision_reserved_special_token", 0, 2)
    vision += ["<|tile_x_separator|>", "<|tile_y_separator|>"]  # +84, +85
    vision += numbered("vision_reserved_special_token", 2, 6)
    vision += ["<|image|>"]  # +90
    vision += numbered("vision_reserved_special_token", 6, 7)
    vision += ["<|patch|>"]  # +92
    vision += numbered("vision_reserved_special_token", 7, 1048)  # +93..+1133
    reasoning = numbered("reasoning_reserved_special_token", 0, 8)  # +1134..+1141
    reasoning += ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]  # +1142, +1143
    names = text + vision + reasoning
    assert len(names) == 1144 and len(set(names)) == len(names)
    return names


def llama4_special_tokens(base: int, num_reserved: int = DEFAULT_NUM_RESERVED) -> dict[str, int]:
    """The Llama 4 special-token layout: `num_reserved` ids starting at `base` (= number of ranks).

    Offset k gets the k-th Llama 4 name (begin_of_text +0, end_of_text +1, header_start +5,
    header_end +6, eom +7, eot +8, python_start +16, python_end +17, finetune_right_pad +18, ...,
    vision +80..+1133, reasoning +1134..+1143), and offsets past the 1144 named ones are
    `<|reserved_special_token_{k-1144}|>`. With `base=200000, num_reserved=2048` this is exactly
    Scout's table; a smaller `num_reserved` (>= 19) keeps the same offsets, truncated.
    """
    named = _llama4_named_specials()
    if num_reserved < 19:
        raise TokenizerError(
            f"num_reserved_special_tokens={num_reserved} is too small: the Llama 4 layout needs at "
            "least 19 ids (offsets 0..18 hold begin_of_text .. finetune_right_pad)"
        )
    names = named[:num_reserved]
    names += [f"<|reserved_special_token_{i}|>" for i in range(num_reserved - len(names))]
    return {name: base + k for k, name in enumerate(names)}


# --------------------------------------------------------------------------------------------
# Rank files
# --------------------------------------------------------------------------------------------


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file (`base64(token_bytes) rank` per line) into {token bytes: rank}.

    Blank lines are skipped (as tiktoken does). Raises TokenizerError naming the file and the
    1-based line for a malformed line, a duplicate token or a duplicate rank, and naming the path
    for a missing file. Rank density (0..n-1) is checked by `Tokenizer.from_ranks`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
    ranks: dict[bytes, int] = {}
    seen_ranks: dict[int, int] = {}  # rank -> line number, to name both lines of a duplicate
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.decode("utf-8", errors="replace").split()
        where = f"{path}:{lineno}"
        if len(fields) != 2:
            raise TokenizerError(
                f"{where}: expected 'base64_token rank', got {line[:80].decode('utf-8', errors='replace')!r}"
            )
        try:
            token = base64.b64decode(fields[0], validate=True)
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{where}: invalid base64 token {fields[0][:40]!r}") from None
        if not fields[1].isdigit():
            raise TokenizerError(f"{where}: rank must be a non-negative integer, got {fields[1][:40]!r}")
        rank = int(fields[1])
        if not token:
            raise TokenizerError(f"{where}: empty token")
        if token in ranks:
            raise TokenizerError(f"{where}: duplicate token {token!r} (also rank {ranks[token]})")
        if rank in seen_ranks:
            raise TokenizerError(f"{where}: duplicate rank {rank} (also on line {seen_ranks[rank]})")
        ranks[token] = rank
        seen_ranks[rank] = lineno
    if not ranks:
        raise TokenizerError(f"{path}: no ranks in tokenizer file")
    return ranks


def save_ranks(ranks: Mapping[bytes, int], path: str | os.PathLike) -> None:
    """Write {token bytes: rank} as a tiktoken BPE file, one `base64 rank` line per rank, in rank order."""
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    Path(path).write_text("".join(lines), encoding="ascii")


def read_sidecar(path: Path) -> dict[str, int] | None:
    """The special tokens {name: id} listed by our sidecar next to the rank file `path`, or None
    if there is none or it is not ours (e.g. a Hugging Face tokenizer.json)."""
    side = path.with_suffix(".json")
    if not _is_our_sidecar(side):
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        return {str(k): int(v) for k, v in meta["special_tokens"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TokenizerError(f"{side}: malformed tokenizer sidecar: {e}") from None


def save_files(path: Path, ranks: Mapping[bytes, int], special_tokens: Mapping[str, int]) -> None:
    """Write the rank file at `path` and, when `special_tokens` are not the default Llama 4
    layout, the sidecar `path.with_suffix('.json')` listing them in id order (else a stale
    sidecar of ours is removed: it would override the default layout on reload). Refuses to
    overwrite a JSON file there that is not a longctx sidecar (e.g. a Hugging Face tokenizer.json)."""
    side = path.with_suffix(".json")
    needs_sidecar = dict(special_tokens) != llama4_special_tokens(len(ranks), DEFAULT_NUM_RESERVED)
    if side.exists() and not _is_our_sidecar(side) and needs_sidecar:
        raise TokenizerError(f"{side} exists and is not a longctx tokenizer sidecar; save the tokenizer elsewhere")
    save_ranks(ranks, path)
    if needs_sidecar:
        specials = dict(sorted(special_tokens.items(), key=lambda kv: kv[1]))
        meta = {"format": SIDECAR_FORMAT, "version": 1, "n_ranks": len(ranks), "special_tokens": specials}
        side.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    elif _is_our_sidecar(side):
        side.unlink()


def _is_our_sidecar(side: Path) -> bool:
    # Peek at the head only: an HF tokenizer.json can be tens of MB and is never ours.
    try:
        with open(side, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return re.search(rb'"format"\s*:\s*"' + SIDECAR_FORMAT.encode() + rb'"', head) is not None
