"""Evaluation of exported Spectron models: scorers, datasets, suites and reports (`python -m spectron_jax.eval`)."""
