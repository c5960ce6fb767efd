"""Importers of open checkpoints (Hugging Face layout) into spectron_jax parameter trees."""
