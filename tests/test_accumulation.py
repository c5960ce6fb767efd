"""Gradient accumulation is exact: with uneven text / frame masks across microbatches, the loss,
gradients, every loss term (time-delta and stop included) and the summed counts at M = 2 and 4 equal
one pass (M = 1) over the whole batch; each microbatch keeps rows on every batch-sharded device; and
the compiled microbatch loop body at M = 4 costs about a quarter of a one-pass step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spectron_jax import losses, trainer

ROWS, TEXT, FRAMES, MEL, VOCAB, HIDDEN, R = 8, 6, 12, 4, 7, 5, 2
WEIGHTS = losses.LossWeights(z_loss=1e-2, asr=0.7, lm=1.3, stop=0.5)
TERMS = ("loss", "text_loss", "ce_text", "ce_asr", "ce_lm", "z_loss", "spec_frames", "spec_freq_delta",
         "spec_time_delta_1", "spec_time_delta_2", "spec_time_delta_3", "spec_time_delta", "spec_total", "stop",
         "grad_norm")


def _batch(rows=ROWS, seed=0):
    rng = np.random.default_rng(seed)
    # Rows 0 and 4 (M = 4's first microbatch) are heavy, others light; row 6 has no frames, row 3 no text.
    text_valid = np.resize([6, 6, 1, 0, 5, 2, 6, 1], rows)
    frame_valid = np.resize([12, 2, 9, 1, 11, 3, 0, 8], rows)
    segments = np.where(np.arange(TEXT)[None] < (text_valid[:, None] + 1) // 2, 1, 2)
    return {
        "features": rng.normal(size=(rows, HIDDEN)).astype(np.float32),
        "text_targets": rng.integers(0, VOCAB, size=(rows, TEXT)).astype(np.int32),
        "text_weights": (np.arange(TEXT)[None] < text_valid[:, None]).astype(np.float32),
        "text_segments": segments.astype(np.int32),
        "cont_frames": rng.normal(size=(rows, FRAMES, MEL)).astype(np.float32),
        "cont_mask": np.arange(FRAMES)[None] < frame_valid[:, None],
    }


def _loss_fn(params, batch, rng):
    del rng
    h = jnp.tanh(batch["features"] @ params["w"])  # [rows, hidden]
    logits = jnp.einsum("bh,thv->btv", h, params["text"])  # [rows, text, vocab]
    frames = jnp.einsum("bh,fhm->bfm", h, params["spec"])  # [rows, frames, mel]
    stop = jnp.einsum("bh,sh->bs", h, params["stop"])  # [rows, frames / r]
    return losses.spectron_loss(logits, batch, frames, stop, weights=WEIGHTS)


def _normalizers(batch):
    return losses.loss_normalizers(batch, max_time_delta_order=3, reduction_factor=R)


def _params(hidden=HIDDEN):
    rng = np.random.default_rng(1)
    return {"w": rng.normal(size=(hidden, hidden)).astype(np.float32),
            "text": rng.normal(size=(TEXT, hidden, VOCAB)).astype(np.float32),
            "spec": rng.normal(size=(FRAMES, hidden, MEL)).astype(np.float32),
            "stop": rng.normal(size=(FRAMES // R, hidden)).astype(np.float32)}


# Unoptimised CPU code compiles in about half the time; the numbers are the same to float32 rounding.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _state(params, tx):
    return {"step": np.int32(0), "rng": jax.random.key_data(jax.random.key(0)), "params": params,
            "opt_state": tx.init(params)}


@pytest.fixture(scope="module")
def steps():
    """{M: (new state, metrics)} of one SGD step (lr 1: the new params expose the raw gradient)."""
    params, batch = _params(), _batch()
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    outs = {}
    for m in (1, 2, 4):
        step = trainer.make_train_step(_loss_fn, tx, schedule, trainer.StepConfig(microbatches=m), jnp.float32,
                                       normalizers_fn=_normalizers)
        state = _state(params, tx)
        outs[m] = jax.jit(step).lower(state, batch).compile(FAST_COMPILE)(state, batch)
    return outs


@pytest.mark.parametrize("microbatches", [2, 4])
def test_loss_gradients_every_term_and_counts_equal_one_pass(steps, microbatches):
    params, batch = _params(), _batch()
    (ref_state, ref), (state_m, got) = steps[1], steps[microbatches]
    # The masks are uneven: a microbatch's own means differ from the batch's, so equal weights would fail.
    first = jax.tree.map(lambda x: x[0::microbatches], batch)
    _, own = jax.jit(_loss_fn)(params, first, None)
    assert abs(float(own["spec_time_delta_3"]) - float(ref["spec_time_delta_3"])) > 1e-2
    for key in TERMS:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for key, mask in (("num_text_tokens", "text_weights"), ("num_frames", "cont_mask")):
        assert float(got[key]) == float(ref[key]) == float(np.sum(batch[mask])), key
    for name in params:
        np.testing.assert_allclose(state_m["params"][name], ref_state["params"][name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_one_pass_terms_match_numpy(steps):
    params, batch = _params(), _batch()
    got = steps[1][1]
    h = np.tanh(batch["features"] @ params["w"])
    logits = np.einsum("bh,thv->btv", h, params["text"])
    log_z = np.log(np.exp(logits).sum(-1))
    nll = log_z - np.take_along_axis(logits, batch["text_targets"][..., None], -1)[..., 0]
    w = batch["text_weights"]
    np.testing.assert_allclose(got["ce_text"], (nll * w).sum() / w.sum(), rtol=1e-5)
    asr = w * (batch["text_segments"] == 1)
    np.testing.assert_allclose(got["ce_asr"], (nll * asr).sum() / asr.sum(), rtol=1e-5)
    error = np.einsum("bh,fhm->bfm", h, params["spec"]) - batch["cont_frames"]
    valid = batch["cont_mask"]
    for k in (1, 3):
        pair = valid[:, k:] & valid[:, :-k]
        delta = (error[:, k:] - error[:, :-k])[pair]
        np.testing.assert_allclose(got[f"spec_time_delta_{k}"], (np.abs(delta).sum() + (delta ** 2).sum()) / delta.size,
                                   rtol=1e-5)
    stop_logits = np.einsum("bh,sh->bs", h, params["stop"])
    steps = valid.reshape(ROWS, FRAMES // R, R).any(-1)
    last = steps.sum(1) - 1
    targets = (np.arange(FRAMES // R)[None] == last[:, None]) & (last[:, None] >= 0)
    bce = np.logaddexp(0, stop_logits) - stop_logits * targets
    np.testing.assert_allclose(got["stop"], bce[steps].mean(), rtol=1e-5)


def test_microbatches_keep_rows_on_every_device():
    rows = np.arange(16)
    micro = trainer._split_microbatches({"x": jnp.asarray(rows)}, 4)["x"]
    devices = 2  # contiguous blocks of 8 rows
    for j in range(4):
        owners = {int(r) // (16 // devices) for r in np.asarray(micro[j])}
        assert owners == set(range(devices))
    assert sorted(np.asarray(micro).ravel().tolist()) == rows.tolist()


def test_compiled_flops_of_the_microbatch_loop_body_are_a_quarter_at_four_microbatches():
    """XLA counts a loop body once: the step at M = 4 reports about 1/4 of M = 1's per-device FLOPs
    (what `train` multiplies back by M), with the batch sharded over every device."""
    from spectron_jax import metrics

    def loss_fn(params, batch, rng):  # a two-layer regression: FLOPs proportional to the rows
        error = jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"] - batch["y"]
        return jnp.mean(jnp.square(error)), {}

    devices = len(jax.devices())
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    rows, width = 16 * devices, 64
    params = {"w1": rng.normal(size=(width, width)).astype(np.float32),
              "w2": rng.normal(size=(width, width)).astype(np.float32)}
    batch = {"x": rng.normal(size=(rows, width)).astype(np.float32),
             "y": rng.normal(size=(rows, width)).astype(np.float32)}
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    state = _state(params, tx)
    batch_sharding = {k: NamedSharding(mesh, P("data", None)) for k in batch}
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    flops = {}
    for m in (1, 4):
        step = trainer.make_train_step(loss_fn, tx, schedule, trainer.StepConfig(microbatches=m), jnp.float32)
        lowered = jax.jit(step, in_shardings=(replicated, batch_sharding)).lower(state, batch)
        flops[m] = metrics.compiled_flops(lowered.compile(FAST_COMPILE))
    assert flops[1] and flops[4]
    assert 0.2 <= flops[4] / flops[1] <= 0.35, flops
