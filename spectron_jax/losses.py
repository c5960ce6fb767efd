"""Spectron's joint objective: text cross-entropy (+ z-loss), spectrogram L1+L2 with delta terms, stop BCE.

    L = w_text · CE(y)                                     (L_ASR + L_LM, the whole transcript)
      + w_spec · ( w_frames · L12(x̂ − x)
                 + w_freq   · L12(Δf x̂ − Δf x)
                 + w_time   · Σ_{k=1..K} L12(Δt_k x̂ − Δt_k x) )
      + w_stop · BCE(stop)                                 (only with a stop head)
      + w_z    · mean(log² Z)                              (PaLM's z-loss on the text softmax)
      + w_ctc  · CTC(prompt transcript | encoder frames)   (only with the encoder's CTC head; beyond
                                                            the paper, `models.encoder_ctc`)

    L12(e) = mean |e| + mean e²     over valid elements only
    Δf z = z[:, :, 1:] − z[:, :, :-1]          (neighbouring mel bins)
    Δt_k z = z[:, k:] − z[:, :-k]              (frames k apart; valid where both frames are valid)

The paper gives the form of every term but no weight λ and no reduction (paper.md §4); every weight here
defaults to 1.0 and each term is a mean over valid elements. Text CE is normalised per valid target token.

Each mean is (sum over valid elements) / (normaliser). `loss_normalizers` gives every term's normaliser
for a batch; a batch may carry precomputed ones under `NORMALIZERS_KEY` (e.g. those of the whole batch
when it is one microbatch of an accumulated step), so that microbatch terms add up exactly to the
whole batch's.
All arithmetic is float32 whatever the dtype of the logits or predictions. Padded positions are removed
with `where` before any arithmetic, so garbage there (even NaN) changes neither the loss nor its gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from spectron_jax.models import acoustic, encoder_ctc

Array = jax.Array

# A batch entry {name: float32 []} of normalisers (see `loss_normalizers`) that replace the batch's own.
NORMALIZERS_KEY = "loss_normalizers"


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the terms of `spectron_loss`. The paper gives none (paper.md §4): all DEFAULT.

    Attributes:
      text: weight of the token cross-entropy over the whole transcript. DEFAULT, not in the paper: 1.0.
      asr: extra factor on the prompt-transcript tokens (text_segments == 1), when the batch has
        `text_segments`. DEFAULT, not in the paper: 1.0.
      lm: extra factor on the continuation-transcript tokens (text_segments == 2). DEFAULT, not in the
        paper: 1.0.
      spectrogram: overall factor on the spectrogram terms (w_spec). DEFAULT, not in the paper: 1.0.
      spec_frames: weight of L12 on the frames. DEFAULT, not in the paper: 1.0.
      freq_delta: weight of L12 on the frequency deltas. DEFAULT, not in the paper: 1.0.
      time_delta: weight of the sum over k of L12 on the time deltas. DEFAULT, not in the paper: 1.0.
      stop: weight of the stop BCE (used only when stop logits are given). DEFAULT, not in the paper: 1.0.
      z_loss: coefficient of log² Z on the text softmax. DEFAULT, not in the paper: 1e-4 (PaLM).
      ctc: weight of the encoder's CTC loss of the prompt transcript, per transcript token (used only
        when the model has the head, `SpectronConfig.encoder_ctc`). DEFAULT, not in the paper: 1.0.
    """

    text: float = 1.0
    asr: float = 1.0
    lm: float = 1.0
    spectrogram: float = 1.0
    spec_frames: float = 1.0
    freq_delta: float = 1.0
    time_delta: float = 1.0
    stop: float = 1.0
    z_loss: float = 1e-4
    ctc: float = 1.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value >= 0.0:
                raise ValueError(f"LossWeights.{field.name} must be >= 0, got {value}")


def _safe_divide(numerator: Array, denominator: Array) -> Array:
    """numerator / denominator, or 0 where the denominator is 0."""
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


def token_nll_and_log_z(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """Per-token negative log-likelihood and log-normaliser, in float32.

    Args:
      logits: `[batch, length, vocab]`.
      targets: `[batch, length]` int token ids.
      weights: `[batch, length]`; where 0 both outputs are 0, whatever the logits hold.

    Returns:
      nll: `[batch, length]`, log Z − logit[target].
      log_z: `[batch, length]`, logsumexp over the vocabulary.
    """
    active = jnp.asarray(weights) != 0
    logits = jnp.where(active[..., None], jnp.asarray(logits, jnp.float32), 0.0)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
    # A one-hot contraction rather than a gather keeps a vocabulary-sharded layout cheap.
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)  # [batch, length, vocab]
    target_logit = jnp.einsum("blv,blv->bl", logits, one_hot)
    nll = jnp.where(active, log_z - target_logit, 0.0)
    return nll, jnp.where(active, log_z, 0.0)


def weighted_cross_entropy(logits: Array, targets: Array, weights: Array,
                           z_loss: float = 0.0) -> tuple[Array, Array, Array]:
    """Token cross-entropy with optional z-loss, summed with per-token weights (t5x convention).

    Args:
      logits: `[batch, length, vocab]`, any float dtype (computed in float32).
      targets: `[batch, length]` int token ids.
      weights: `[batch, length]`, 0.0 at positions to ignore (their logits and targets may be anything).
      z_loss: coefficient of log² Z, Z the softmax normaliser.

    Returns:
      sum_loss: Σ w · (−log p(target) + z_loss · log² Z), the z-loss included (float32 scalar).
      sum_z_loss: Σ w · z_loss · log² Z, the z-loss part alone.
      sum_weights: Σ w.
    """
    weights = jnp.asarray(weights, jnp.float32)
    nll, log_z = token_nll_and_log_z(logits, targets, weights)
    sum_z_loss = jnp.sum(z_loss * jnp.square(log_z) * weights)
    sum_loss = jnp.sum(nll * weights) + sum_z_loss
    return sum_loss, sum_z_loss, jnp.sum(weights)


def _l12_sum(error: Array, valid: Array) -> Array:
    """Σ|e| + Σe² over valid elements. `error` and `valid` broadcast."""
    error = jnp.where(jnp.broadcast_to(valid, error.shape), error, 0.0)
    return jnp.sum(jnp.abs(error)) + jnp.sum(jnp.square(error))


def loss_normalizers(batch: Mapping[str, Array], max_time_delta_order: int = 3,
                     reduction_factor: int | None = None) -> dict[str, Array]:
    """The normaliser of every mean in `spectron_loss`, from the batch's masks alone (float32 scalars).

    Args:
      batch: `text_weights [batch, text_len]`, optional `text_segments [batch, text_len]`,
        `cont_frames [batch, T, mel]` (its shape only) and `cont_mask [batch, T]`.
      max_time_delta_order: K of the time-delta terms.
      reduction_factor: r of the stop head's steps; None = no stop term.

    Returns:
      `text_tokens` (Σ text weights: ce_text, z_loss, text_loss), `asr_tokens` / `lm_tokens` (with
      `text_segments`), `frame_cells` (valid frames · mel), `freq_cells` (valid frames · (mel − 1)),
      `time_cells_{k}` (valid frame pairs k apart · mel) for k = 1..K, `stop_steps` (valid steps, with r).
    """
    text_weights = jnp.asarray(batch["text_weights"], jnp.float32)
    out = {"text_tokens": jnp.sum(text_weights)}
    if "text_segments" in batch:
        segments = jnp.asarray(batch["text_segments"])
        out["asr_tokens"] = jnp.sum(jnp.where(segments == 1, text_weights, 0.0))
        out["lm_tokens"] = jnp.sum(jnp.where(segments == 2, text_weights, 0.0))
    valid = jnp.asarray(batch["cont_mask"]) > 0  # [batch, T]
    mel = batch["cont_frames"].shape[-1]
    frames = jnp.sum(valid.astype(jnp.float32))
    out["frame_cells"] = frames * mel
    out["freq_cells"] = frames * (mel - 1)
    for k in range(1, max_time_delta_order + 1):
        pairs = jnp.sum((valid[:, k:] & valid[:, :-k]).astype(jnp.float32))
        out[f"time_cells_{k}"] = pairs * mel
    if reduction_factor is not None:
        out["stop_steps"] = jnp.sum(acoustic.group_mask(valid, reduction_factor).astype(jnp.float32))
    return out


def spectrogram_loss(pred: Array, target: Array, mask: Array, max_time_delta_order: int = 3, *,
                     frames_weight: float = 1.0, freq_delta_weight: float = 1.0,
                     time_delta_weight: float = 1.0,
                     normalizers: Mapping[str, Array] | None = None) -> dict[str, Array]:
    """L1+L2 regression of frames, frequency deltas and time deltas of orders 1..K, over valid frames.

    Args:
      pred: `[batch, T, mel]` predicted log-mel frames (post-net output, groups flattened).
      target: `[batch, T, mel]` target log-mel frames.
      mask: `[batch, T]`, 1 = valid frame. Padded frames of pred and target may hold anything.
      max_time_delta_order: K, the highest time-delta order (0 disables the time-delta terms).
      frames_weight, freq_delta_weight, time_delta_weight: weights of the three groups in `spec_total`.
      normalizers: `frame_cells`, `freq_cells`, `time_cells_{k}` of `loss_normalizers` to divide by
        (None: this batch's own).

    Returns:
      A dict of float32 scalars: `spec_frames`, `spec_freq_delta`, `spec_time_delta_{k}` for k = 1..K,
      `spec_time_delta` (their sum), `spec_total` (the weighted sum), `num_frames` (valid frames).
    """
    if pred.shape != target.shape or pred.ndim != 3 or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"spectrogram_loss expects pred and target [batch, T, mel] and mask [batch, T]; got "
            f"{pred.shape}, {target.shape}, {mask.shape}"
        )
    if max_time_delta_order < 0:
        raise ValueError(f"max_time_delta_order must be >= 0, got {max_time_delta_order}")
    valid = jnp.asarray(mask) > 0  # [batch, T]
    # Every term is linear in the error, so deltas of (pred − target) equal differences of deltas.
    error = jnp.where(valid[..., None], jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32), 0.0)

    if normalizers is None:
        normalizers = loss_normalizers({"text_weights": jnp.zeros((1, 1)), "cont_frames": pred, "cont_mask": mask},
                                       max_time_delta_order)
    terms: dict[str, Array] = {}
    terms["spec_frames"] = _safe_divide(_l12_sum(error, valid[..., None]), normalizers["frame_cells"])

    freq_error = error[:, :, 1:] - error[:, :, :-1]  # [batch, T, mel-1]
    terms["spec_freq_delta"] = _safe_divide(_l12_sum(freq_error, valid[..., None]), normalizers["freq_cells"])

    time_delta_sum = jnp.zeros((), jnp.float32)
    for k in range(1, max_time_delta_order + 1):
        time_error = error[:, k:] - error[:, :-k]  # [batch, T-k, mel]
        pair_valid = valid[:, k:] & valid[:, :-k]  # [batch, T-k]
        terms[f"spec_time_delta_{k}"] = _safe_divide(_l12_sum(time_error, pair_valid[..., None]),
                                                     normalizers[f"time_cells_{k}"])
        time_delta_sum = time_delta_sum + terms[f"spec_time_delta_{k}"]
    terms["spec_time_delta"] = time_delta_sum

    terms["spec_total"] = (frames_weight * terms["spec_frames"] + freq_delta_weight * terms["spec_freq_delta"]
                           + time_delta_weight * time_delta_sum)
    terms["num_frames"] = jnp.sum(valid.astype(jnp.float32))
    return terms


def stop_loss(logits: Array, targets: Array, step_mask: Array, num_steps: Array | None = None) -> Array:
    """Binary cross-entropy of stop logits, averaged over valid steps.

    Args:
      logits: `[batch, steps]` stop logits.
      targets: `[batch, steps]` in {0, 1} (see `acoustic.stop_targets`).
      step_mask: `[batch, steps]`, 1 = valid step.
      num_steps: the normaliser (None: the valid steps of `step_mask`).

    Returns:
      float32 scalar; 0 when no step is valid.
    """
    valid = jnp.asarray(step_mask) > 0
    logits = jnp.where(valid, jnp.asarray(logits, jnp.float32), 0.0)
    targets = jnp.asarray(targets, jnp.float32)
    # −[z log σ(x) + (1−z) log(1−σ(x))] written stably.
    bce = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    total = jnp.sum(jnp.where(valid, bce, 0.0))
    return _safe_divide(total, jnp.sum(valid.astype(jnp.float32)) if num_steps is None else num_steps)


def spectron_loss(text_logits: Array, batch: Mapping[str, Array], spec_pred: Array,
                  stop_logits: Array | None = None, weights: LossWeights = LossWeights(),
                  max_time_delta_order: int = 3, ctc_logits: Array | None = None,
                  ctc_valid: Array | None = None, blank_id: int = 0) -> tuple[Array, dict[str, Array]]:
    """The joint training loss of one batch and every term of it.

    Args:
      text_logits: `[batch, text_len, vocab]` decoder logits at the text slots.
      batch: the model batch (`text_targets`, `text_weights`, optional `text_segments`, `cont_frames`,
        `cont_mask`; see the batch contract), optionally with `NORMALIZERS_KEY`: the normalisers
        (`loss_normalizers`) every mean divides by instead of this batch's own.
      spec_pred: `[batch, cont_len, mel]` post-net frames aligned with `cont_frames`, or the post-net's
        grouped `[batch, cont_len / r, r, mel]`.
      stop_logits: `[batch, cont_len / r]` stop logits, or None without a stop head.
      weights: the term weights.
      max_time_delta_order: K of the time-delta terms (3 in the paper).
      ctc_logits: `[batch, F, vocab]` of the encoder's CTC head, or None; with them `ctc_valid` bool
        [batch, F] (valid encoder frames) and `blank_id` (the pad id). The CTC labels are the targets of
        `text_segments == 1` (the prompt's transcript and the separator); the term is their −log
        likelihood summed over rows, per such token (`asr_tokens`).

    Returns:
      total: float32 scalar to minimise.
      metrics: float32 scalars — `loss`, `text_loss` (weighted text CE incl. any asr/lm factors),
        `ce_text`, `ce_asr` and `ce_lm` (with `text_segments`), `z_loss` (mean log² Z · coefficient),
        `ctc` (with `ctc_logits`),
        the spectrogram terms of `spectrogram_loss`, `stop` (with stop logits), `num_text_tokens`,
        `num_frames`.
    """
    targets = batch["text_targets"]
    text_weights = jnp.asarray(batch["text_weights"], jnp.float32)
    cont_mask = batch["cont_mask"]
    reduction_factor = None
    if stop_logits is not None:
        steps = stop_logits.shape[1]
        if steps == 0 or cont_mask.shape[1] % steps:
            raise ValueError(
                f"stop_logits {stop_logits.shape} do not divide cont_mask {cont_mask.shape} into groups")
        reduction_factor = cont_mask.shape[1] // steps
    norms = batch.get(NORMALIZERS_KEY)
    if norms is None:
        norms = loss_normalizers(batch, max_time_delta_order, reduction_factor)
    metrics: dict[str, Array] = {}

    # Unweighted CE and z-loss, per valid token.
    nll, log_z = token_nll_and_log_z(text_logits, targets, text_weights)  # [batch, text_len] each
    num_tokens = norms["text_tokens"]
    metrics["ce_text"] = _safe_divide(jnp.sum(nll * text_weights), num_tokens)
    metrics["z_loss"] = weights.z_loss * _safe_divide(jnp.sum(jnp.square(log_z) * text_weights), num_tokens)
    text_ce = metrics["ce_text"]
    if "text_segments" in batch:
        segments = jnp.asarray(batch["text_segments"])
        for name, segment_id in (("ce_asr", 1), ("ce_lm", 2)):
            seg_weights = jnp.where(segments == segment_id, text_weights, 0.0)
            metrics[name] = _safe_divide(jnp.sum(nll * seg_weights), norms[f"{name[3:]}_tokens"])
        factor = jnp.where(segments == 1, weights.asr, jnp.where(segments == 2, weights.lm, 1.0))
        text_ce = _safe_divide(jnp.sum(nll * text_weights * factor), num_tokens)
    metrics["text_loss"] = weights.text * text_ce

    # Spectrogram regression over the valid continuation frames.
    cont_frames = batch["cont_frames"]
    if spec_pred.ndim == 4:
        spec_pred = acoustic.flatten_groups(spec_pred)
    metrics.update(spectrogram_loss(
        spec_pred, cont_frames, cont_mask, max_time_delta_order,
        frames_weight=weights.spec_frames, freq_delta_weight=weights.freq_delta,
        time_delta_weight=weights.time_delta, normalizers=norms))

    total = metrics["text_loss"] + metrics["z_loss"] + weights.spectrogram * metrics["spec_total"]

    if stop_logits is not None:
        if "stop_steps" not in norms:
            raise ValueError(f"batch[{NORMALIZERS_KEY!r}] has no 'stop_steps' for the stop logits")
        metrics["stop"] = stop_loss(stop_logits, acoustic.stop_targets(cont_mask, reduction_factor),
                                    acoustic.group_mask(cont_mask, reduction_factor), norms["stop_steps"])
        total = total + weights.stop * metrics["stop"]

    if ctc_logits is not None:
        if "text_segments" not in batch or "asr_tokens" not in norms:
            raise ValueError("the encoder's CTC loss needs text_segments in the batch (TaskConfig.phi_split=True)")
        labels = encoder_ctc.ctc_label_mask(text_weights, batch["text_segments"])
        metrics["ctc"] = _safe_divide(
            encoder_ctc.ctc_loss_sum(ctc_logits, ctc_valid, targets, labels, blank_id), norms["asr_tokens"])
        total = total + weights.ctc * metrics["ctc"]

    metrics["num_text_tokens"] = jnp.sum(text_weights)
    metrics["loss"] = total
    return total, metrics
