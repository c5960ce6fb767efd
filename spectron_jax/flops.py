"""Analytic FLOPs of one Spectron training step (the useful work; MFU's numerator in the MaxText sense).

`step_flops(config, batch_size=, prompt_len=, text_len=, cont_len=)` counts the multiply-adds of every
matrix product the model does on a batch of fixed shapes (2 FLOPs each), from the configs alone:

* weight products (a trainable or frozen parameter times activations): the Conformer's subsampling
  convs or feature projection, its FFNs, attention projections (query / key / value / output, the
  Transformer-XL position projection or the relative-key table), conv-module pointwise and depthwise
  convs; the projection P; the pre-net, the decoder's attention projections and gated MLP, the output
  logits (tied: the embedding table), the post-net and the stop head. In training each costs its
  forward F (2 FLOPs per multiply-add), a weight gradient F (when the weight is trained) and an input
  gradient F (when anything upstream of its input is trained): 3F for a trained layer inside the
  network (MaxText's "6 x parameters per token"), 2F for a frozen one that gradients pass through
  ("4 x" instead of "6 x") and for a trained first layer (its input is data), F for a frozen one with
  nothing trained below it.
* activation products: attention scores and values (and the Conformer's relative-position logits),
  forward F and, when gradients flow through them, 2F backward: 3F. The decoder counts only the
  key/query pairs its prefix-LM mask lets through: the bidirectional prefix block (F x F), then the
  causal remainder (query slot i sees the i + 1 slots up to it); a sliding-window layer counts the
  pairs within its window. The Conformer attends over all its frames.

Not counted (as in MaxText): norms, softmax, activations, rotary embedding, losses, the optimizer,
the embedding lookup (a gather), and anything XLA recomputes (remat) or pads. Rows are taken as full
(every slot valid): the count is a function of the shapes, not of a batch's padding.

Frozen parameters are given as `OptimizerConfig.freeze` regexes, matched against parameter paths of
the form the train state uses ('decoder/layers/3/mlp/up', 'encoder/blocks/0/conv/pointwise_in/kernel').
Norm scales and biases are not tracked: a term's input gradient is counted when any matmul weight
upstream of it is trained.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step over the global batch.

    Attributes:
      forward: {group: forward FLOPs} (groups such as 'decoder/mlp', 'encoder/attention').
      training: {group: forward + backward FLOPs}.
      batch_size: rows the counts are for.
    """

    forward: dict
    training: dict
    batch_size: int

    @property
    def total(self) -> float:
        """Training FLOPs of the step (forward + backward, all rows)."""
        return float(sum(self.training.values()))

    @property
    def forward_total(self) -> float:
        return float(sum(self.forward.values()))

    @property
    def per_sample(self) -> float:
        return self.total / self.batch_size


def decoder_visible_pairs(prefix_len: int, length: int, window: int | None = None) -> int:
    """(query, key) slot pairs the prefix-LM mask lets through in one full row of `length` slots.

    Query slot i sees key j iff `j <= i or j < prefix_len`, and with a window also `|i - j| < window`.
    """
    i = np.arange(length, dtype=np.int64)
    if window is None:
        return int(np.sum(np.where(i < prefix_len, prefix_len, i + 1)))
    in_prefix = np.minimum(prefix_len, i + window) - np.maximum(0, i - window + 1)  # prefix queries
    causal = np.minimum(i + 1, window)
    return int(np.sum(np.where(i < prefix_len, np.maximum(in_prefix, 0), causal)))


class _Ledger:
    """Accumulates forward and training FLOPs per group, tracking which streams carry gradients."""

    def __init__(self, frozen: Sequence[str]):
        self.patterns = [re.compile(p) for p in frozen]
        self.forward: dict[str, float] = {}
        self.training: dict[str, float] = {}

    def trained(self, path: str) -> bool:
        return not any(p.search(path) for p in self.patterns)

    def _add(self, group: str, forward: float, training: float) -> None:
        self.forward[group] = self.forward.get(group, 0.0) + forward
        self.training[group] = self.training.get(group, 0.0) + training

    def weight(self, group: str, path: str, flops: float, grad_in: bool) -> bool:
        """A product with parameter `path`; `grad_in`: a gradient reaches its input. Returns whether a
        gradient leaves its output (so the next layer's input needs one)."""
        trained = self.trained(path)
        self._add(group, flops, flops * (1 + int(trained) + int(grad_in)))
        return grad_in or trained

    def activations(self, group: str, flops: float, grad: bool) -> None:
        """A product of two activations (attention): 3x when gradients flow through it, else 1x."""
        self._add(group, flops, flops * (3 if grad else 1))


def _encoder(ledger: _Ledger, cfg: Any, batch: int, prompt_len: int) -> tuple[int, bool]:
    """Conformer terms; returns (encoder frames, whether a gradient leaves the encoder)."""
    from spectron_jax.models.relative_attention import relative_distance_window

    d, hidden, heads = cfg.model_dim, cfg.ffn_hidden_dim, cfg.num_heads
    if cfg.frontend == "conv_subsampling":
        c = cfg.subsampling_channels
        t1, m1 = (prompt_len + 1) // 2, (cfg.input_dim + 1) // 2  # stride 2, padding 1: ceil(n / 2)
        t2, m2 = (t1 + 1) // 2, (m1 + 1) // 2
        grad = ledger.weight("encoder/frontend", "encoder/subsampling/conv1_kernel", 2 * batch * t1 * m1 * 9 * c, False)
        grad = ledger.weight("encoder/frontend", "encoder/subsampling/conv2_kernel", 2 * batch * t2 * m2 * 9 * c * c, grad)
        grad = ledger.weight("encoder/frontend", "encoder/subsampling/projection/kernel",
                             2 * batch * t2 * m2 * c * d, grad)
        frames = t2
    else:
        frames = prompt_len
        grad = ledger.weight("encoder/frontend", "encoder/feature_projection/projection/kernel",
                             2 * batch * frames * cfg.input_dim * d, False)
    bf = batch * frames
    for layer in range(cfg.num_layers):
        base = f"encoder/blocks/{layer}"
        # macaron FFN (first half)
        g = ledger.weight("encoder/ffn", f"{base}/ffn_in/hidden/kernel", 2 * bf * d * hidden, grad)
        grad = ledger.weight("encoder/ffn", f"{base}/ffn_in/output/kernel", 2 * bf * hidden * d, g)
        # relative-position self-attention
        qkv = [ledger.weight("encoder/attention_projections", f"{base}/attention/{name}_kernel", 2 * bf * d * d, grad)
               for name in ("query", "key", "value")]
        flows = any(qkv)
        ledger.activations("encoder/attention", 2 * bf * frames * d, flows)  # content logits
        if cfg.position_encoding == "transformer_xl":
            distances = 2 * relative_distance_window(frames, cfg.max_relative_distance) + 1
            rel = ledger.weight("encoder/attention_projections", f"{base}/attention/position_kernel",
                                2 * distances * d * d, False)  # once per step: sinusoids x kernel
            ledger.activations("encoder/attention", 2 * bf * distances * d, flows or rel)  # position logits
        else:
            distances = cfg.left_relative_distance + cfg.right_relative_distance + 1
            ledger.weight("encoder/attention", f"{base}/attention/distance_embedding",
                          2 * bf * heads * distances * (d // heads), flows)
        ledger.activations("encoder/attention", 2 * bf * frames * d, flows)  # probabilities x values
        grad = ledger.weight("encoder/attention_projections", f"{base}/attention/output_kernel", 2 * bf * d * d,
                             flows)
        # conv module
        grad = ledger.weight("encoder/conv_module", f"{base}/conv/pointwise_in/kernel", 2 * bf * d * 2 * d, grad)
        grad = ledger.weight("encoder/conv_module", f"{base}/conv/depthwise_kernel",
                             2 * bf * cfg.conv_kernel_size * d, grad)
        grad = ledger.weight("encoder/conv_module", f"{base}/conv/pointwise_out/kernel", 2 * bf * d * d, grad)
        # macaron FFN (second half)
        g = ledger.weight("encoder/ffn", f"{base}/ffn_out/hidden/kernel", 2 * bf * d * hidden, grad)
        grad = ledger.weight("encoder/ffn", f"{base}/ffn_out/output/kernel", 2 * bf * hidden * d, g)
    return frames, grad


def step_flops(config: Any, *, batch_size: int, prompt_len: int, text_len: int, cont_len: int,
               frozen: Sequence[str] = ()) -> StepFlops:
    """Analytic FLOPs of one training step of `config` (a SpectronConfig) on full rows of the given shapes.

    Args:
      batch_size: rows of the (global) batch.
      prompt_len: prompt frames per row ([batch, prompt_len, mel]).
      text_len: text slots per row.
      cont_len: continuation frames per row (a multiple of the reduction factor r: S = cont_len / r
        speech slots).
      frozen: `OptimizerConfig.freeze` regexes over parameter paths ('^decoder/' freezes the LM).
    """
    for name, value in (("batch_size", batch_size), ("prompt_len", prompt_len), ("text_len", text_len),
                        ("cont_len", cont_len)):
        if int(value) < 1:
            raise ValueError(f"step_flops: {name} must be >= 1, got {value}")
    ledger = _Ledger(frozen)
    batch = int(batch_size)
    enc, dec, ac = config.encoder, config.decoder, config.acoustic
    r = ac.reduction_factor
    if cont_len % r:
        raise ValueError(f"step_flops: cont_len={cont_len} is not a multiple of the reduction factor {r}")
    steps = cont_len // r
    d = dec.model_dim

    frames, enc_grad = _encoder(ledger, enc, batch, prompt_len)
    proj_grad = ledger.weight("projection", "projection/kernel", 2 * batch * frames * enc.model_dim * d, enc_grad)
    if config.encoder_ctc:  # training only; its CTC recursion is elementwise, not counted
        ledger.weight("ctc_head", "ctc_head/kernel", 2 * batch * frames * enc.model_dim * dec.vocab_size, enc_grad)

    # pre-net on every speech step (step 0's output is replaced by the eos embedding)
    grad, in_dim, pre = False, ac.prenet_input_dim, "prenet"
    for i, hidden in enumerate(ac.prenet_dims):
        grad = ledger.weight(pre, f"prenet/hidden_layers/{i}/kernel", 2 * batch * steps * in_dim * hidden, grad)
        in_dim = hidden
    pre_grad = ledger.weight(pre, "prenet/output_layer/kernel", 2 * batch * steps * in_dim * d, grad)

    # decoder stack over [prefix | text | speech]
    length = frames + text_len + steps
    tokens = batch * length
    table = "decoder/embedder/table"
    grad = proj_grad or pre_grad or ledger.trained(table)  # the embedding lookup is a gather, no FLOPs
    heads, kv, hd = dec.num_heads, dec.num_kv_heads, dec.head_dim
    for layer in range(dec.num_layers):
        base = f"decoder/layers/{layer}"
        qkv = [ledger.weight("decoder/attention_projections", f"{base}/attn/{name}", 2 * tokens * d * n * hd, grad)
               for name, n in (("q", heads), ("k", kv), ("v", kv))]
        flows = any(qkv)
        window = dec.attention_config(layer).window
        pairs = batch * decoder_visible_pairs(frames, length, window)
        ledger.activations("decoder/attention", 2 * 2 * pairs * heads * hd, flows)  # scores + values
        attn_grad = ledger.weight("decoder/attention_projections", f"{base}/attn/o", 2 * tokens * heads * hd * d,
                                  flows)
        up = [ledger.weight("decoder/mlp", f"{base}/mlp/{name}", 2 * tokens * d * dec.mlp_dim, grad)
              for name in ("gate", "up")]
        mlp_grad = ledger.weight("decoder/mlp", f"{base}/mlp/down", 2 * tokens * dec.mlp_dim * d, any(up))
        grad = grad or attn_grad or mlp_grad

    output = table if dec.tie_embeddings else "decoder/embedder/output"
    ledger.weight("logits", output, 2 * batch * text_len * d * dec.vocab_size, grad)
    out_dim = r * ac.num_mel
    if ac.postnet_hidden > 0:
        g = ledger.weight("postnet", "postnet/hidden_layer/kernel", 2 * batch * steps * d * ac.postnet_hidden, grad)
        ledger.weight("postnet", "postnet/output_layer/kernel", 2 * batch * steps * ac.postnet_hidden * out_dim, g)
    else:
        ledger.weight("postnet", "postnet/output_layer/kernel", 2 * batch * steps * d * out_dim, grad)
    if ac.stop_head:
        ledger.weight("stop_head", "stop_head/projection/kernel", 2 * batch * steps * d, grad)
    return StepFlops(forward=dict(ledger.forward), training=dict(ledger.training), batch_size=batch)


def step_flops_for_converter(config: Any, converter: Any, batch_size: int, frozen: Sequence[str] = ()) -> StepFlops:
    """`step_flops` with the row shapes of a `SpectronFeatureConverter` (prompt_len, text_len, cont_len)."""
    return step_flops(config, batch_size=batch_size, prompt_len=converter.prompt_len, text_len=converter.text_len,
                      cont_len=converter.cont_len, frozen=frozen)


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: flops_per_step / (step_seconds x num_devices x peak FLOP/s per device)."""
    return float(flops_per_step) / (float(step_seconds) * num_devices * float(peak_flops_per_device))
