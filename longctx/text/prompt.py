"""The one prompt layout shared by training, needle tests and document QA.

A long context is prefilled once and many questions are asked after it, so the prompt is
built from separately encoded pieces (BPE never merges across them) and splits into a
context-only prefix and a question suffix:

    prefix = <|begin_of_text|> <|header_start|>user<|header_end|>\\n\\n  context
    suffix = [\\n ...] \\n\\n question <|eot|> <|header_start|>assistant<|header_end|>\\n\\n
    answer = answer text <|eot|>

This is the Llama 4 instruct layout of one user turn whose content is context + "\\n\\n" +
question. The embedded model is trained on exactly these pieces (without the newlines that
move a question to a chunk start, see ``question_suffix``); when it is not told the answer it
replies ``NOT_STATED``.
"""

from __future__ import annotations

import numpy as np

NOT_STATED = "not stated"


def context_prefix(tokenizer, context) -> list[int]:
    """Ids of the prefix for ``context``: a str, or token ids already encoded (e.g. ``Packed.ids``)."""
    ids = tokenizer.encode(context) if isinstance(context, str) else [int(t) for t in np.asarray(context)]
    return [tokenizer.bos_id, *tokenizer.header("user"), *ids]


def question_suffix(tokenizer, question: str, *, at: int | None = None, chunk: int | None = None) -> list[int]:
    """Ids that follow the context: the question, end of turn, and the assistant header.

    at, chunk: the suffix's prompt position (the context's length in tokens) and the local
    layers' attention chunk (`ModelConfig.local_chunk`). Given both, a suffix that would cross a
    chunk start gets newline tokens in front (fewer than it has tokens) so that it starts one:
    the local layers at the answer then see the whole question, not just its tail. (Cut off
    from the words "Which document", the embedded model answered the needle's value to 4 of 7
    such which-document questions; see benchmarks/results/tiny_model_aligned_questions.md.)
    Training data never moves a question, so the model also learned to answer one that straddles.
    """
    ids = [*tokenizer.encode("\n\n" + question), tokenizer.eot_id, *tokenizer.header("assistant")]
    if at is not None and chunk and at % chunk + len(ids) > chunk and len(ids) <= chunk:
        ids = tokenizer.encode("\n") * (chunk - at % chunk) + ids
    return ids


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Training target for an answer: its text and <|eot|>."""
    return [*tokenizer.encode(answer), tokenizer.eot_id]
