"""Sweeps: a grid of training runs from one file, and the comparison of their evaluations.

`sweep_file` (the file format: parsing, the cartesian product, the points' names), `sweep_eval` (each
point's export and evaluation folders and commands, what a point holds) and `eval_table` (the table over
the points; `python -m spectron_jax.sweeps.eval_table`). The runner is `python -m spectron_jax.sweep`.
"""
