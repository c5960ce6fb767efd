"""The text reads its prefix: a model trained on four prompts with four different texts scores its
own rows far better than rows whose prompts were swapped (`validation.swap_prefixes`). A model whose
prefix could not reach the text slots (a mask, a projection or an encoder that drops it) cannot pass."""

import jax
import jax.numpy as jnp
import optax
import pytest

import test_spectron as ts
from spectron_jax import validation
from spectron_jax.models.spectron_model import SpectronModel


@pytest.mark.slow  # 150 jitted steps of a micro model
@pytest.mark.parametrize("encoder_ctc", [False, True])
def test_text_cross_entropy_depends_on_the_prefix(encoder_ctc):
    model = SpectronModel(ts.tiny_config(encoder_ctc=encoder_ctc))
    params, _ = model.init(seed=0)
    batch = ts.make_batch(seed=0, prompt_valid=(16, 16, 16, 16), text_valid=(6, 6, 6, 6), cont_valid=(8, 8, 8, 8))
    # every row starts with sos, so its first target can only be told apart by the prefix
    batch["text_segments"] = jnp.where(jnp.asarray(batch["text_weights"]) > 0, 1, 0).astype(jnp.int32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        (_, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
            params, batch, jax.random.key(0), deterministic=True)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(150):
        params, opt_state = step(params, opt_state)
    own = float(model.eval_fn(params, batch)[1]["ce_text"])
    swapped = float(model.eval_fn(params, validation.swap_prefixes(batch))[1]["ce_text"])
    assert own < 0.2, own
    assert swapped > own + 0.5, (own, swapped)
