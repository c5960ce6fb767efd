"""`compute_dtype='auto'`: bfloat16 on every accelerator (a GPU included), float32 on the CPU; an explicit
dtype is kept whatever the platform."""

import jax.numpy as jnp
import pytest

from spectron_jax import trainer


@pytest.mark.parametrize("platform, expected", [("cpu", jnp.float32), ("gpu", jnp.bfloat16), ("tpu", jnp.bfloat16)])
def test_auto_is_bfloat16_on_accelerators_and_float32_on_the_cpu(platform, expected):
    assert trainer.resolve_compute_dtype("auto", platform) == jnp.dtype(expected)
    assert trainer.StepConfig().resolved_dtype(platform) == jnp.dtype(expected)  # the default is 'auto'


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_an_explicit_dtype_is_kept_on_every_platform(name, platform):
    assert trainer.StepConfig(compute_dtype=name).resolved_dtype(platform) == jnp.dtype(name)


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="StepConfig.compute_dtype"):
        trainer.StepConfig(compute_dtype="float16")
