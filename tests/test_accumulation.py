"""Gradient accumulation is exact: with uneven text / frame masks across microbatches, the loss,
gradients, mean terms and summed counts at M = 2 and 4 equal one pass (M = 1) over the whole batch,
and each microbatch keeps rows on every batch-sharded device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectron_jax import losses, trainer

ROWS, TEXT, FRAMES, MEL, VOCAB, HIDDEN = 8, 6, 10, 4, 7, 5
# The time-delta terms are normalised by frame pairs, not frames (see StepConfig.microbatches).
WEIGHTS = losses.LossWeights(time_delta=0.0, z_loss=1e-2)


def _batch():
    rng = np.random.default_rng(0)
    text_valid = np.array([6, 6, 1, 0, 5, 2, 6, 1])  # rows 0, 4 (M=4's first microbatch) heavy, others light
    frame_valid = np.array([10, 2, 9, 1, 10, 3, 0, 8])
    return {
        "features": rng.normal(size=(ROWS, HIDDEN)).astype(np.float32),
        "text_targets": rng.integers(0, VOCAB, size=(ROWS, TEXT)).astype(np.int32),
        "text_weights": (np.arange(TEXT)[None] < text_valid[:, None]).astype(np.float32),
        "cont_frames": rng.normal(size=(ROWS, FRAMES, MEL)).astype(np.float32),
        "cont_mask": np.arange(FRAMES)[None] < frame_valid[:, None],
    }


def _loss_fn(params, batch, rng):
    del rng
    h = jnp.tanh(batch["features"] @ params["w"])  # [rows, hidden]
    logits = jnp.einsum("bh,thv->btv", h, params["text"])  # [rows, text, vocab]
    frames = jnp.einsum("bh,fhm->bfm", h, params["spec"])  # [rows, frames, mel]
    return losses.spectron_loss(logits, batch, frames, weights=WEIGHTS)


def _params():
    rng = np.random.default_rng(1)
    return {"w": rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32),
            "text": rng.normal(size=(TEXT, HIDDEN, VOCAB)).astype(np.float32),
            "spec": rng.normal(size=(FRAMES, HIDDEN, MEL)).astype(np.float32)}


@pytest.mark.parametrize("microbatches", [2, 4])
def test_loss_gradients_and_counts_equal_one_pass(microbatches):
    params, batch = _params(), _batch()
    # An optimizer that applies the raw gradient (SGD with lr 1) exposes it in the new params.
    import optax
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    state = {"step": np.int32(0), "rng": jax.random.key_data(jax.random.key(0)), "params": params,
             "opt_state": tx.init(params)}
    outs = {}
    for m in (1, microbatches):
        step = trainer.make_train_step(_loss_fn, tx, schedule, trainer.StepConfig(microbatches=m), jnp.float32)
        outs[m] = jax.jit(step)(state, batch)
    (ref_state, ref), (state_m, got) = outs[1], outs[microbatches]
    for key in ("loss", "ce_text", "z_loss", "spec_frames", "spec_freq_delta", "grad_norm"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
    for key in ("num_text_tokens", "num_frames"):
        assert float(got[key]) == float(ref[key]) == float(np.sum(batch["text_weights" if "text" in key else "cont_mask"]))
    for name in params:
        np.testing.assert_allclose(state_m["params"][name], ref_state["params"][name], rtol=1e-5, atol=1e-6)
    # Independent reference of the one-pass loss: NumPy.
    h = np.tanh(batch["features"] @ params["w"])
    logits = np.einsum("bh,thv->btv", h, params["text"])
    log_z = np.log(np.exp(logits).sum(-1))
    nll = log_z - np.take_along_axis(logits, batch["text_targets"][..., None], -1)[..., 0]
    ce = (nll * batch["text_weights"]).sum() / batch["text_weights"].sum()
    np.testing.assert_allclose(ref["ce_text"], ce, rtol=1e-5)


def test_microbatches_keep_rows_on_every_device():
    rows = np.arange(16)
    micro = trainer._split_microbatches({"x": jnp.asarray(rows)}, 4)["x"]
    devices = 2  # contiguous blocks of 8 rows
    for j in range(4):
        owners = {int(r) // (16 // devices) for r in np.asarray(micro[j])}
        assert owners == set(range(devices))
    assert sorted(np.asarray(micro).ravel().tolist()) == rows.tolist()
