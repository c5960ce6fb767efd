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


def _gradient_keeper():
    """An optimizer that applies nothing and keeps the step's gradient as its state (exact, no rounding)."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


@pytest.mark.slow
def test_the_real_model_at_four_microbatches_equals_one_pass():
    """The Spectron model itself (fp32, dropout off, r = 2 with a stop head, ASR / LM segments) on a batch
    of the tiny run's shapes whose rows hold very different numbers of valid prompt frames, tokens and
    continuation frames: loss, every term, the counts and every gradient leaf at M = 4 equal M = 1."""
    from tests.test_spectron import make_batch, tiny_config

    config = tiny_config(reduction_factor=2, stop_head=True, prenet_input="all_frames",
                         loss_weights=losses.LossWeights(z_loss=1e-2, asr=0.7, lm=1.3, stop=0.5))
    model = trainer.FunctionalSpectron(config)
    prompt_len, text_len, cont_len = 240, 48, 160
    batch = make_batch(prompt_valid=(240, 31, 180, 12, 97, 240, 5, 60), text_valid=(48, 2, 30, 7, 48, 1, 12, 25),
                       cont_valid=(160, 3, 0, 77, 150, 9, 41, 1), prompt_len=prompt_len, text_len=text_len,
                       cont_len=cont_len)
    valid = batch["text_weights"].sum(1, keepdims=True)
    batch["text_segments"] = np.where(np.arange(text_len)[None] < valid // 2, 1, 2).astype(np.int32)
    params = model.init_params(0)
    tx = _gradient_keeper()
    outs = {}
    for m in (1, 4):
        step = trainer.make_train_step(model.loss_fn, tx, optax.constant_schedule(0.0), trainer.StepConfig(microbatches=m),
                                       jnp.float32, normalizers_fn=model.loss_normalizers)
        state = _state(params, tx)
        outs[m] = jax.jit(step).lower(state, batch).compile(FAST_COMPILE)(state, batch)
    (one_state, one), (four_state, four) = outs[1], outs[4]
    terms = [k for k in one if k not in ("learning_rate", "param_norm")]
    assert {"ce_asr", "ce_lm", "z_loss", "stop", "spec_time_delta_3", "grad_norm"} <= set(terms), terms
    for key in terms:
        np.testing.assert_allclose(four[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert float(four["num_frames"]) == float(batch["cont_mask"].sum())
    # The microbatches differ: a microbatch's own loss is far from the batch's.
    _, own = jax.jit(model.loss_fn)(params, jax.tree.map(lambda x: x[0::4], batch), jax.random.key(0))
    assert abs(float(own["spec_frames"]) - float(one["spec_frames"])) > 1e-3 * abs(float(one["spec_frames"]))
    grads_one = _leaves(one_state["opt_state"])
    grads_four = _leaves(four_state["opt_state"])
    assert grads_one.keys() == grads_four.keys() and len(grads_one) > 30
    top = max(float(np.max(np.abs(g))) for g in grads_one.values())
    for path, g in grads_one.items():
        scale = float(np.max(np.abs(g)))
        if path.endswith("attention/key_bias"):
            # softmax ignores a bias added to every key's logit: its gradient is rounding noise
            assert scale <= 1e-6 * top and float(np.max(np.abs(grads_four[path]))) <= 1e-6 * top, path
            continue
        assert scale > 1e-4 * top, path
        assert float(np.max(np.abs(grads_four[path] - g))) <= 1e-5 * scale, path


def _leaves(tree) -> dict:
    return {trainer.path_of(kp): np.asarray(x) for kp, x in jax.tree_util.tree_leaves_with_path(tree)}
