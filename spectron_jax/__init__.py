"""spectron_jax: Spectron (spoken LM reading and writing spectrograms) in JAX / Flax NNX."""

from spectron_jax import quiet_libtpu as _quiet_libtpu
from spectron_jax import quiet_tensorflow as _quiet_tensorflow

__version__ = "0.1.0"

# TensorFlow only reads data here: its first import hides its GPUs and its C++ start-up notices.
_quiet_tensorflow.install()
# JAX does not load libtpu (and print its start-up errors) on a host that cannot have a TPU.
_quiet_libtpu.install()
