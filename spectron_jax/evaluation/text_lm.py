"""Text language models that score transcripts: the perplexity figures of the continuation suite.

    lm = make_text_lm("bundle", bundle)       # the exported model's own decoder (default; a proxy)
    lm = make_text_lm("hf:/path/to/gpt2-medium")  # a transformers causal LM (the paper scored with GPT-2 Medium)
    scores = lm.score(["a sentence", ...])    # list[TextScore]
    perplexity(scores)                        # exp(-Σ log p / Σ tokens) over all of them
    empty_count(scores)                       # texts with no token (left out of the pooled figure)

A `TextScore` holds Σ log p(token | preceding tokens) over a text's tokens and their count, where the
first token is conditioned on the LM's start token (`sos` for the bundle, `bos` for a transformers LM
that has one; without one, the first token is context only and is not scored). The end-of-text token is
not scored, so that figures of LMs with different tokenizers are comparable in what they cover.

`BundleTextLM` runs the Spectron decoder with an empty speech prefix: it is the LM the model learned its
text from, not an external judge, so its perplexities are labelled a proxy in the report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, Sequence

import numpy as np

HF_PREFIX = "hf:"
DEFAULT_MAX_TOKENS = 256  # texts are cut to this many tokens (DEFAULT; continuations are a few dozen)


@dataclasses.dataclass(frozen=True)
class TextScore:
    """log_likelihood: Σ natural-log p over the scored tokens; num_tokens: how many were scored."""

    log_likelihood: float
    num_tokens: int

    @property
    def perplexity(self) -> float:
        return perplexity([self])


def perplexity(scores: Sequence[TextScore]) -> float:
    """exp(-Σ log p / Σ tokens) pooled over `scores`; NaN when no token was scored.

    A score of an empty text (no token scored) adds nothing to either sum: count such texts with
    `empty_count` and report them beside the figure (an empty ASR transcript is a failure of the
    speech, not a text with a good perplexity).
    """
    tokens = sum(s.num_tokens for s in scores)
    if tokens == 0:
        return float("nan")
    return float(math.exp(-sum(s.log_likelihood for s in scores) / tokens))


def empty_count(scores: Sequence[TextScore]) -> int:
    """How many of `scores` scored no token (empty texts): what `perplexity` leaves out."""
    return sum(1 for s in scores if s.num_tokens == 0)


def empty_note(scores: Sequence[TextScore], figure: str, what: str) -> str | None:
    """A report note counting the empty texts that `figure` leaves out (None when there are none)."""
    empty = empty_count(scores)
    if not empty:
        return None
    return (f"{empty} of {len(scores)} {what} were empty (no token to score): `{figure}` pools the other "
            f"{len(scores) - empty}, so it says nothing about those rows.")


class TextLM(Protocol):
    """Scores texts; `name` says which LM produced a figure."""

    name: str

    def score(self, texts: Sequence[str]) -> list[TextScore]:
        ...


def _bucket(length: int) -> int:
    """Pads sequence lengths to powers of two (>= 8) so few shapes are compiled."""
    return max(8, 1 << (max(length, 1) - 1).bit_length())


class BundleTextLM:
    """The exported Spectron decoder as a text LM (prefix of zero speech frames)."""

    def __init__(self, bundle: Any, max_tokens: int = DEFAULT_MAX_TOKENS, batch_size: int = 8):
        import jax
        import jax.numpy as jnp

        self.name = "the model's own decoder (proxy LM)"
        self._bundle = bundle
        self._max_tokens = max_tokens
        self._batch_size = batch_size
        model, config = bundle.model, bundle.model.config
        self._sos = int(config.sos_id)
        embed_dim = int(config.decoder.model_dim)

        def log_probs(params, tokens, valid):
            """tokens int [batch, T] (sos y_1 … y_{T-1}), valid bool [batch, T] -> log p float32 [batch, T, vocab]."""
            batch = tokens.shape[0]
            prefix = jnp.zeros((batch, 0, embed_dim), jnp.float32)
            prefix_valid = jnp.zeros((batch, 0), bool)
            cache = model.init_cache(batch, tokens.shape[1])
            logits, _ = model.prefill(params, prefix, prefix_valid, tokens, valid, cache)
            return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

        self._log_probs = jax.jit(log_probs)

    def _ids(self, text: str) -> list[int]:
        return [int(i) for i in self._bundle.tokenizer.encode(text)][: self._max_tokens]

    def score(self, texts: Sequence[str]) -> list[TextScore]:
        out = []
        for begin in range(0, len(texts), self._batch_size):
            chunk = [self._ids(t) for t in texts[begin:begin + self._batch_size]]
            length = _bucket(max(len(ids) for ids in chunk) + 1)
            rows = self._batch_size
            tokens = np.zeros((rows, length), np.int32)
            valid = np.zeros((rows, length), bool)
            for row, ids in enumerate(chunk):
                tokens[row, : len(ids) + 1] = [self._sos] + ids
                valid[row, : len(ids) + 1] = True
            logp = np.asarray(self._log_probs(self._bundle.params, tokens, valid))  # [rows, length, vocab]
            for row, ids in enumerate(chunk):
                # Slot t predicts token t+1: log p(y_{t+1} | sos y_1 … y_t), for t = 0 … len-1.
                picked = logp[row, np.arange(len(ids)), np.asarray(ids, np.int64)] if ids else np.zeros(0)
                out.append(TextScore(float(np.sum(picked)), len(ids)))
        return out


class HFTextLM:
    """A `transformers` causal LM (AutoModelForCausalLM + AutoTokenizer) from a local folder or cache."""

    def __init__(self, name_or_path: str, max_tokens: int = DEFAULT_MAX_TOKENS):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"transformers causal LM ({name_or_path})"
        self._torch = torch
        self._max_tokens = max_tokens
        self._tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self._model = AutoModelForCausalLM.from_pretrained(name_or_path).eval()

    def score(self, texts: Sequence[str]) -> list[TextScore]:
        torch = self._torch
        bos = self._tokenizer.bos_token_id
        out = []
        for text in texts:
            ids = list(self._tokenizer(text, add_special_tokens=False)["input_ids"])[: self._max_tokens]
            context = ([bos] if bos is not None else []) + ids
            if len(context) < 2:
                out.append(TextScore(0.0, 0))
                continue
            with torch.no_grad():
                logits = self._model(torch.tensor([context])).logits[0].float()  # [len, vocab]
            logp = torch.log_softmax(logits[:-1], dim=-1)
            targets = torch.tensor(context[1:])
            picked = logp.gather(1, targets[:, None])[:, 0]
            out.append(TextScore(float(picked.sum()), len(context) - 1))
        return out


def make_text_lm(spec: str, bundle: Any = None) -> TextLM:
    """`bundle` (needs `bundle`) or `hf:<name-or-path>` -> a TextLM. ValueError on anything else."""
    if spec == "bundle":
        if bundle is None:
            raise ValueError("the bundle text LM needs an export bundle")
        return BundleTextLM(bundle)
    if spec.startswith(HF_PREFIX) and spec[len(HF_PREFIX):]:
        return HFTextLM(spec[len(HF_PREFIX):])
    raise ValueError(f"unknown text LM {spec!r} (use bundle or hf:<name-or-path>)")
