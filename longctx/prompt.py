"""The one prompt layout shared by training, needle tests and document QA.

A long context is prefilled once and many questions are asked after it, so the prompt is
built from separately encoded pieces (BPE never merges across them) and splits into a
context-only prefix and a question suffix:

    prefix = <|begin_of_text|> <|header_start|>user<|header_end|>\\n\\n  context
    suffix = \\n\\n question <|eot|> <|header_start|>assistant<|header_end|>\\n\\n
    answer = answer text <|eot|>

This is the Llama 4 instruct layout of one user turn whose content is context + "\\n\\n" +
question. The embedded model is trained on exactly these pieces; when it is not told the
answer it replies ``NOT_STATED``.
"""

from __future__ import annotations

import numpy as np

NOT_STATED = "not stated"


def context_prefix(tokenizer, context) -> list[int]:
    """Ids of the prefix for ``context``: a str, or token ids already encoded (e.g. ``Packed.ids``)."""
    ids = tokenizer.encode(context) if isinstance(context, str) else [int(t) for t in np.asarray(context)]
    return [tokenizer.bos_id, *tokenizer.header("user"), *ids]


def question_suffix(tokenizer, question: str) -> list[int]:
    """Ids that follow the context: the question, end of turn, and the assistant header."""
    return [*tokenizer.encode("\n\n" + question), tokenizer.eot_id, *tokenizer.header("assistant")]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Training target for an answer: its text and <|eot|>."""
    return [*tokenizer.encode(answer), tokenizer.eot_id]
