"""spectron_jax: Spectron (spoken LM reading and writing spectrograms) in JAX / Flax NNX."""

__version__ = "0.1.0"
