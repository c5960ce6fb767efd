"""An auxiliary CTC head on the speech encoder, trained on the prompt's transcript (beyond the paper).

The paper's encoder is pretrained (a 600M Conformer trained on speech) before the LM ever reads it. A
model trained from random initialisation on a small corpus has no such encoder: its LM learns the text
statistics long before it learns to read the prefix, and its transcript of the prompt ignores the audio.
Joint CTC-attention training (Kim, Hori & Watanabe 2017, "Joint CTC-attention based end-to-end speech
recognition using multi-task learning") gives the encoder a direct signal: a linear layer maps every
encoder frame to the vocabulary plus a blank (the pad id), and the CTC loss of the prompt's transcript
(the text targets of segment 1, the separator included: `text_segments == 1`) is added to the objective
(`LossWeights.ctc`). The head is used for training only; inference never reads it.

Shapes: encoder output [batch, F, enc] -> logits [batch, F, vocab]; labels int32 [batch, text_len].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from spectron_jax.models.sharding import constrain, logical_param


class EncoderCTCHead(nnx.Module):
    """A linear layer from the encoder width to the vocabulary: kernel [enc, vocab], bias [vocab]."""

    def __init__(self, in_dim: int, vocab_size: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = logical_param(init, rngs.params(), (in_dim, vocab_size), (None, "vocab"), param_dtype)
        self.bias = logical_param(jax.nn.initializers.zeros, None, (vocab_size,), ("vocab",), param_dtype)

    def __call__(self, encoded: jax.Array) -> jax.Array:
        """[batch, F, enc] -> float32 logits [batch, F, vocab]."""
        logits = jnp.einsum("bfe,ev->bfv", encoded.astype(self.dtype), self.kernel[...].astype(self.dtype))
        logits = logits + self.bias[...].astype(self.dtype)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def ctc_label_mask(weights: jax.Array, segments: jax.Array, segment_id: int = 1) -> jax.Array:
    """bool [batch, text_len]: the text targets CTC reads, those of `segment_id` with weight > 0 (a
    prefix of each row: the prompt's transcript comes first in the text)."""
    return (jnp.asarray(segments) == segment_id) & (jnp.asarray(weights) > 0)


def ctc_loss_sum(logits: jax.Array, logit_valid: jax.Array, labels: jax.Array, label_valid: jax.Array,
                 blank_id: int) -> jax.Array:
    """Σ over rows that have labels of −log p(labels | frames) (float32 []).

    Args:
      logits: float32 [batch, F, vocab], one distribution per encoder frame.
      logit_valid: bool [batch, F], valid encoder frames (a prefix of each row).
      labels: int32 [batch, L]; the valid ones (`label_valid`, a prefix of each row) are the target.
      label_valid: bool [batch, L].
      blank_id: the blank symbol (the pad id, never a target).
    """
    label_valid = jnp.asarray(label_valid, bool)
    per_row = optax.ctc_loss(logits, 1.0 - jnp.asarray(logit_valid, jnp.float32),
                             jnp.where(label_valid, labels, blank_id).astype(jnp.int32),
                             1.0 - label_valid.astype(jnp.float32), blank_id=blank_id)
    has_labels = jnp.any(label_valid, axis=1)
    return jnp.sum(jnp.where(has_labels, per_row, 0.0))
