"""Validation during a training run: the run's `validation.Evaluator` over the validation split of
its task, and what one evaluation writes (TensorBoard `eval/*` scalars, a metrics.jsonl record with
split "validation", and an `eval step N | ...` progress line).

Every process calls `run` at the same steps (the evaluation's steps are collectives).
"""

from __future__ import annotations

from typing import Any


class TrainValidation:
    """The evaluation of a run every `TrainConfig.eval_every_steps`.

    Args:
      task_name: the run's TASK (its "validation" split is read from its start each time).
      config: the run's `TrainConfig` (batch_size, eval_batches, eval_media, eval_swapped_prefix, step).
      model_config: the `SpectronConfig` (evaluated without dropout: `validation.deterministic_model`).
      shard: this process's `partitioning.data_shard_info`.
      shapes: the pipeline's sequence lengths and feature options (`pipeline.make_pipeline` keywords).
      abstract_params: `jax.ShapeDtypeStruct` tree (with shardings) of the parameters.
      abstract_batch: `jax.ShapeDtypeStruct` tree (with shardings) of one global training batch.
      mesh, rules, compute_dtype: as the training step's.
      writer: the run's `metrics.MetricsWriter`; jsonl: its `metric_logs.JsonlLog`.
    """

    def __init__(self, task_name: str, config: Any, model_config: Any, shard: Any, shapes: dict,
                 abstract_params: Any, abstract_batch: Any, mesh: Any, rules: Any, compute_dtype: Any,
                 writer: Any, jsonl: Any):
        from spectron_jax import validation
        from spectron_jax.data import pipeline as pipeline_lib

        def validation_data():
            return pipeline_lib.make_pipeline(task_name, "validation", config.batch_size, shard.index, shard.count,
                                              seed=0, shuffle=False, repeat=False, drop_remainder=False, **shapes)

        self.writer, self.jsonl = writer, jsonl
        self.evaluator = validation.Evaluator(validation.deterministic_model(model_config), validation_data,
                                              config.eval_batches, abstract_params, abstract_batch, mesh, rules,
                                              compute_dtype, microbatches=config.step.microbatches,
                                              media=config.eval_media, writer=writer,
                                              swapped_prefix=config.eval_swapped_prefix)

    def run(self, step: int, params: Any) -> dict:
        """Evaluates `params` at `step` and writes the means; returns them ({} when the split has no
        valid row: nothing is written)."""
        from spectron_jax import metrics as metrics_lib

        means = self.evaluator.run(step, params)
        if means:
            self.writer.scalars(step, {f"eval/{k}": v for k, v in means.items()})
            self.jsonl.write({"step": step, "split": "validation", **means})
            print("eval " + metrics_lib.ProgressLog().format(step, means), flush=True)
        return means
