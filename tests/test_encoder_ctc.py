"""The encoder's auxiliary CTC head: the loss against a NumPy forward algorithm, and the whole model's
objective with it (a term of the loss, exact under microbatches, a gradient into the encoder)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_spectron as ts
from spectron_jax import trainer
from spectron_jax.models import encoder_ctc


def _numpy_ctc(log_probs, labels, blank):
    """-log p(labels) by the CTC forward recursion over the blank-extended label sequence."""
    ext = [blank]
    for label in labels:
        ext += [label, blank]
    t_len, s_len = log_probs.shape[0], len(ext)
    alpha = np.full((t_len, s_len), -np.inf)
    alpha[0, 0] = log_probs[0, blank]
    if s_len > 1:
        alpha[0, 1] = log_probs[0, ext[1]]
    for t in range(1, t_len):
        for s in range(s_len):
            terms = [alpha[t - 1, s]]
            if s >= 1:
                terms.append(alpha[t - 1, s - 1])
            if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
                terms.append(alpha[t - 1, s - 2])
            alpha[t, s] = np.logaddexp.reduce(terms) + log_probs[t, ext[s]]
    return -np.logaddexp(alpha[-1, -1], alpha[-1, -2] if s_len > 1 else -np.inf)


def test_ctc_loss_sum_matches_the_forward_algorithm():
    rng = np.random.default_rng(0)
    batch, frames, vocab, blank = 4, 9, 6, 0
    logits = rng.normal(size=(batch, frames, vocab)).astype(np.float32)
    frame_counts = [9, 7, 9, 5]
    label_rows = [[1, 2, 2, 3], [4], [], [5, 1]]   # a repeat, one label, none (not counted), two
    valid = np.arange(frames)[None, :] < np.array(frame_counts)[:, None]
    labels = np.zeros((batch, 6), np.int32)
    label_valid = np.zeros((batch, 6), bool)
    for i, row in enumerate(label_rows):
        labels[i, :len(row)] = row
        label_valid[i, :len(row)] = True
    labels[~label_valid] = 3  # garbage past the labels changes nothing
    got = float(encoder_ctc.ctc_loss_sum(jnp.asarray(logits), valid, labels, label_valid, blank))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    want = sum(_numpy_ctc(np.asarray(log_probs[i, :frame_counts[i]]), row, blank)
               for i, row in enumerate(label_rows) if row)
    assert got == pytest.approx(want, rel=1e-4)


def _ctc_batch(seed=0):
    batch = ts.make_batch(seed=seed, prompt_valid=(16, 11, 13, 16), text_valid=(6, 3, 5, 4), cont_valid=(8, 5, 6, 7))
    segments = np.zeros_like(batch["text_targets"])
    for i, prompt_part in enumerate((3, 1, 2, 0)):  # the prompt's share of each row's targets
        n = int(batch["text_weights"][i].sum())
        segments[i, :n] = 2
        segments[i, :prompt_part] = 1
    batch["text_segments"] = segments
    return batch


def test_the_model_adds_the_ctc_term_and_trains_the_encoder_with_it():
    config = ts.tiny_config(encoder_ctc=True)
    model = trainer.FunctionalSpectron(config)
    params = model.init_params(0)
    assert "ctc_head" in params and "ctc_head" not in trainer.FunctionalSpectron(ts.tiny_config()).init_params(0)
    batch = _ctc_batch()
    loss, metrics = jax.jit(model.eval_fn)(params, batch)
    assert float(metrics["ctc"]) > 0
    without = trainer.FunctionalSpectron(ts.tiny_config())  # same parameters but the head: same other terms
    plain = {k: v for k, v in params.items() if k != "ctc_head"}
    loss0, metrics0 = jax.jit(without.eval_fn)(plain, batch)
    assert float(loss) == pytest.approx(float(loss0) + float(metrics["ctc"]), rel=1e-5)
    # the gradient of the CTC term alone reaches the encoder
    def ctc_only(p):
        return model.eval_fn(p, batch)[1]["ctc"]
    grads = jax.grad(ctc_only)(params)
    encoder_norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads["encoder"]))
    assert encoder_norm > 0
    assert all(float(jnp.sum(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads["decoder"]))


def test_ctc_term_is_exact_under_microbatches():
    config = ts.tiny_config(encoder_ctc=True)
    model = trainer.FunctionalSpectron(config)
    params = model.init_params(1)
    batch = _ctc_batch(seed=3)
    norms = model.loss_normalizers(batch)
    whole = float(model.eval_fn(params, batch)[1]["ctc"])
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        piece = {k: v[rows] for k, v in batch.items()}
        piece["loss_normalizers"] = norms
        parts += float(model.eval_fn(params, piece)[1]["ctc"])
    assert parts == pytest.approx(whole, rel=1e-5)


def test_ctc_needs_the_text_segments():
    model = trainer.FunctionalSpectron(ts.tiny_config(encoder_ctc=True))
    batch = ts.make_batch()
    with pytest.raises(ValueError, match="TaskConfig.phi_split=True"):
        model.eval_fn(model.init_params(0), batch)
