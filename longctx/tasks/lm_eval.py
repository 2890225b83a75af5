"""longctx as an lm-evaluation-harness model: ``--model longctx``.

    python -m longctx.tasks.lm_eval run --model longctx --model_args quantize=int8 \\
        --tasks my_task --include_path my_tasks/

    import lm_eval, longctx.tasks.lm_eval                    # the import registers "longctx"
    lm_eval.simple_evaluate(model="longctx", model_args={"quantize": "int4"}, tasks=[...])

lm-eval finds models only in its own registry (no entry-point discovery), so the name
``longctx`` exists once this module is imported; ``python -m longctx.tasks.lm_eval`` imports it
and then runs lm-eval's own command line with the same arguments.

Model arguments (``--model_args key=value,...``): ``pretrained`` a checkpoint folder or hub id
(empty / None: the embedded model; from Python also a loaded ``longctx.Model``, used as it is), ``dtype``,
``device`` (default: a GPU if there is one), ``quantize`` (none | int8 | int4), ``group_size``,
``offload`` (device budget of the KV cache in bytes, the rest in CPU memory; none: unbounded),
``max_length`` (tokens; default the model's ``max_position_embeddings``), ``max_gen_toks``,
``chunk_size`` (prefill piece in tokens) and ``add_bos_token`` (start every context with BOS,
as Llama 4 is trained).

The three request kinds run through ``longctx.generate.prefill`` and the KV cache:
loglikelihood requests with the same context tokens share one prefilled cache, forked for
each continuation, so the choices of one question cost one prefill plus their own tokens.
Continuations and rolling windows are scored ``chunk_size`` tokens at a time, so memory is
O(chunk_size x vocab) whatever the text length.
"""

from __future__ import annotations

import logging
import sys

import torch
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("longctx.tasks.lm_eval needs lm-evaluation-harness: pip install 'longctx[eval]'") from e

from ..checkpoint import load_model
from ..generate import check_int, check_sampling, decode_steps, prefill
from ..model import Model
from ..offload import OffloadPolicy

log = logging.getLogger(__name__)

MODEL_NAME = "longctx"


class LongctxLM(TemplateLM):
    """An lm-eval ``LM`` over a longctx ``Model`` (arguments: module docstring)."""

    def __init__(
        self,
        pretrained: str | Model | None = None,
        dtype: str | None = None,
        device: str | None = None,
        quantize: str | None = None,
        group_size: int = 128,
        offload: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        chunk_size: int = 2048,
        add_bos_token: bool = True,
        batch_size=None,
        max_batch_size=None,
    ):
        super().__init__()
        # batch_size / max_batch_size come from lm-eval's own flags; requests run one
        # continuation per forward on a forked cache, so they have nothing to set.
        if isinstance(pretrained, Model):
            self.model = pretrained
        else:
            if pretrained is not None and not isinstance(pretrained, str):
                raise TypeError(
                    f"pretrained must be a checkpoint path, a hub id or a longctx.Model, "
                    f"got {type(pretrained).__name__}"
                )
            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line asks for cuda:0 unless told otherwise; its own HF
                # model falls back to the CPU then, and so does this one.
                log.warning("device %s asked for, but torch sees no CUDA GPU: running on the CPU", device)
                device = "cpu"
            scheme = None if quantize in (None, "", "none") else quantize
            self.model = load_model(
                pretrained or None,
                device=device or "auto",
                dtype=dtype,
                quantize=scheme,
                group_size=check_int("group_size", group_size, 1),
            )
        self.model.eval()
        if self.model.tokenizer is None:
            raise ValueError("pretrained: the model has no tokenizer; lm-eval requests are text")
        self.tokenizer = self.model.tokenizer
        self._device = self.model.device
        limit = self.model.config.max_position_embeddings
        self.max_length = limit if max_length is None else check_int("max_length", max_length, 2)
        if self.max_length > limit:
            raise ValueError(f"max_length {self.max_length} is over the model's max_position_embeddings {limit}")
        self.max_gen_toks = check_int("max_gen_toks", max_gen_toks, 1)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        if isinstance(offload, float) and offload.is_integer():
            offload = int(offload)  # "1e9" on the command line
        self.offload = None if offload is None else OffloadPolicy(device_bytes=check_int("offload", offload, 0))
        if not isinstance(add_bos_token, bool):
            raise TypeError(f"add_bos_token must be true or false, got {add_bos_token!r}")
        self.add_bos_token = add_bos_token

    # ---- tokens ------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS."""
        return self.tokenizer.bos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``, after BOS when ``add_special_tokens`` (None: ``add_bos_token``)."""
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, bos=bos)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _cache(self):
        return self.model.new_cache(offload=self.offload)

    def _prefilled(self, ids: list[int]):
        """A cache holding ``ids`` (may be empty) and the logits (1, V) after the last one (or None)."""
        cache = self._cache()
        logits = None
        if ids:
            logits = prefill(self.model, torch.tensor([ids]), cache, self.chunk_size, progress=False)
        return cache, logits

    # ---- scoring -----------------------------------------------------------------------

    def _score(self, cache, inputs: list[int], targets: list[int]) -> tuple[float, bool]:
        """Feed ``inputs`` after ``cache``'s tokens; (sum of log p(targets[i]) at input i, whether
        every target is the argmax). Pieces of ``chunk_size`` keep the logits O(chunk x vocab)."""
        total = torch.zeros((), dtype=torch.float64)
        greedy = True
        for lo in range(0, len(inputs), self.chunk_size):
            piece = torch.tensor([inputs[lo : lo + self.chunk_size]], device=self.model.device)
            logits = self.model(piece, cache)[0].float()  # (n, V)
            want = torch.tensor(targets[lo : lo + self.chunk_size], device=logits.device)
            logp = torch.log_softmax(logits, -1).gather(-1, want[:, None])
            total += logp.double().sum().cpu()
            greedy = greedy and bool((logits.argmax(-1) == want).all())
        return float(total), greedy

    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context, cut from the left so that the model reads at most ``max_length`` tokens
        (context + continuation minus its last token), as the harness does."""
        if not continuation:
            raise ValueError("loglikelihood: the continuation has no tokens to score")
        if len(continuation) > self.max_length:
            raise ValueError(
                f"loglikelihood: the continuation has {len(continuation)} tokens, over max_length {self.max_length}"
            )
        if not context:
            raise ValueError("loglikelihood: the context has no tokens (the prefix token must be there)")
        return context[-(self.max_length + 1 - len(continuation)) :]

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or Nones, context ids, continuation ids).

        Requests are grouped by their context minus its last token; each group prefills that
        once and forks the cache per request, which then feeds the last context token and the
        continuation (but its last token) and scores the continuation."""
        groups: dict[tuple[int, ...], list[int]] = {}
        fitted = []
        for i, (_, context, continuation) in enumerate(requests):
            context = self._fit(list(context), list(continuation))
            fitted.append((context, list(continuation)))
            groups.setdefault(tuple(context[:-1]), []).append(i)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm, leave=False) as bar:
            for shared, members in groups.items():
                base, _ = self._prefilled(list(shared))
                for i in members:
                    context, continuation = fitted[i]
                    out[i] = self._score(base.fork(), [context[-1], *continuation[:-1]], continuation)
                    strings = requests[i][0]
                    if strings is not None and strings[0] is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, out[i])
                    bar.update(1)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (no BOS of its own; the first token conditions on
        the prefix token), scored in the harness's disjoint windows of ``max_length`` tokens:
        every token is predicted once, each window with as much preceding text as fits."""
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm, leave=False):
            (string,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(lp for lp, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ---- generation --------------------------------------------------------------------

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string of ``until`` (cut off, not returned), an
        end-of-turn token, or ``max_gen_toks`` tokens. Greedy unless ``do_sample`` (then
        ``temperature``, default 1, and ``top_p``); other generation arguments are ignored with
        a warning."""
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm, leave=False):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = check_int("max_gen_toks", kw.pop("max_gen_toks", self.max_gen_toks), 1)
            sampled = bool(kw.pop("do_sample", False))
            temperature = kw.pop("temperature", 1.0)
            top_p = kw.pop("top_p", 1.0)
            temperature = float(temperature) if sampled else 0.0
            top_p = 1.0 if top_p is None else float(top_p)
            check_sampling(temperature, top_p)
            if kw:
                log.warning("generate_until: ignoring generation arguments %s", sorted(kw))
            if max_new >= self.max_length:
                raise ValueError(
                    f"generate_until: max_gen_toks {max_new} leaves no room for a context within "
                    f"max_length {self.max_length}"
                )
            ids = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.prefix_token_id]
            cache, logits = self._prefilled(ids)
            steps = decode_steps(
                self.model,
                cache,
                logits,
                max_new_tokens=max_new,
                stop_ids=self.model.config.stop_ids,
                temperature=temperature,
                top_p=top_p,
            )
            kept: list[int] = []
            for (token,) in steps:
                if token is None:
                    break
                kept.append(token)
                # Decoding the whole answer each step is fine at max_gen_toks sizes; a stop
                # string may straddle tokens, so the text, not the last piece, is searched.
                if until and any(s in self.tok_decode(kept) for s in until):
                    break
            steps.close()
            text = self.tok_decode(kept)
            for s in until:
                text = text.split(s, 1)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


# A lazy "module:attribute" entry, not the class itself: under ``python -m`` this file runs as
# __main__ and is imported again by its name, and both registrations must name the same target.
if MODEL_NAME not in model_registry:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)

    model_registry.register(MODEL_NAME, target="longctx.tasks.lm_eval:LongctxLM")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with ``longctx`` registered: ``python -m longctx.tasks.lm_eval run --model
    longctx ...`` takes every argument ``lm_eval`` takes."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
