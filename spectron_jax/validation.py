"""The validation loss of a training run, as one mean over every valid token and frame it reads.

`Evaluator.run(step, params)` reads the first `eval_batches` global batches of the validation split
(from its start each time) and returns every loss term as if those batches were one batch: each term's
sum over all their valid elements divided by its count over all of them (`losses.loss_normalizers`).
The figure therefore does not depend on how the rows fall into batches, on batches that are mostly
padding, or on the number of processes that read them. It takes two passes over the data: the first
sums the normalisers (masks only), the second runs the model with those totals as every mean's
divisor (`losses.NORMALIZERS_KEY`) and adds the terms up, so the result is exact, `loss` included.

The pass is teacher-forced with every dropout off, the pre-net's included (`deterministic_model`):
its inference-time dropout (`AcousticConfig.prenet_dropout_at_inference`) draws its masks by the
row's position in the batch, which would make the figure depend on the batch layout and the process
count.

Each batch is evaluated in `microbatches` strided pieces (the training step's split), so evaluation
needs no more activation memory than a training microbatch. Every function is compiled when the
evaluator is built (before the training loop's first collective; see `multihost.meet`), not at the
first evaluation hours into a run.

With `swapped_prefix`, the text terms are also computed with every row reading another row's prompt
(row i gets row i+1's, cyclically within each global batch): `ce_text_swapped_prefix`,
`ce_asr_swapped_prefix`, `ce_lm_swapped_prefix`. A model that reads its prefix scores worse there
than with its own; one that ignores it scores the same (the conditioning check of a learning run).

Process 0 also writes a predicted-vs-target spectrogram image and Griffin-Lim audio of the first
validation row (`media`); every process runs the forward pass (it may need collectives), only
process 0 turns it into media.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax import losses, partitioning, trainer

logger = logging.getLogger(__name__)


def deterministic_model(model_config) -> "trainer.FunctionalSpectron":
    """The model of `model_config` with the pre-net's inference-time dropout off (same parameters)."""
    import dataclasses

    acoustic = dataclasses.replace(model_config.acoustic, prenet_dropout_at_inference=False)
    return trainer.FunctionalSpectron(dataclasses.replace(model_config, acoustic=acoustic))


def make_count_step(normalizers_fn: Callable) -> Callable:
    """`count_step(totals, batch) -> totals + normalizers_fn(batch)` ({name: float32 []})."""

    def count_step(totals, batch):
        return jax.tree.map(jnp.add, totals, normalizers_fn(batch))

    return count_step


# The batch entries of the prompt (the prefix the model reads), rolled by `swap_prefixes`.
PROMPT_KEYS = ("prompt_frames", "prompt_mask")
# The terms a swapped-prefix pass reports (with SWAPPED_SUFFIX).
SWAPPED_TERMS = ("ce_text", "ce_asr", "ce_lm")
SWAPPED_SUFFIX = "_swapped_prefix"


def swap_prefixes(batch: Mapping[str, Any]) -> dict:
    """The batch with row i's prompt (`prompt_frames` [batch, frames, mel], `prompt_mask` [batch,
    frames]) replaced by row (i + 1) mod batch's; the text and the continuation stay in place."""
    return {k: (jnp.roll(v, -1, axis=0) if k in PROMPT_KEYS else v) for k, v in batch.items()}


def make_eval_step(eval_fn: Callable, compute_dtype, microbatches: int = 1) -> Callable:
    """`eval_step(params, batch, normalizers, totals=None) -> totals + this batch's terms`.

    eval_fn: `(params, batch) -> (loss, metrics)`, deterministic (`FunctionalSpectron.eval_fn`); it
      divides every mean by `batch[losses.NORMALIZERS_KEY]`, here the counts of the whole evaluation,
      so the terms of its batches (and of their microbatches) add up to the evaluation's means.
    microbatches: the batch is evaluated in this many strided pieces (`trainer._split_microbatches`),
      one after the other in a `lax.scan`.
    Terms: {name: float32 []}, `loss` and every metric of `eval_fn`; totals None: this batch's alone.
    """

    def one_pass(params, one, normalizers):
        loss, metrics = eval_fn(params, dict(one, **{losses.NORMALIZERS_KEY: normalizers}))
        return {k: jnp.asarray(v, jnp.float32) for k, v in dict(metrics, loss=loss).items()}

    def eval_step(params, batch, normalizers, totals=None):
        params = trainer.cast_floating(params, compute_dtype)
        if microbatches == 1:
            terms = one_pass(params, batch, normalizers)
        else:
            micro = trainer._split_microbatches(batch, microbatches)
            shapes = jax.eval_shape(one_pass, params, jax.tree.map(lambda x: x[0], micro), normalizers)

            def accumulate(carry, one):
                return jax.tree.map(jnp.add, carry, one_pass(params, one, normalizers)), None

            terms, _ = jax.lax.scan(accumulate, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), micro)
        return terms if totals is None else jax.tree.map(jnp.add, totals, terms)

    return eval_step


class Evaluator:
    """Loss terms on the validation split (see the module docstring); all processes call `run`.

    Args:
      model: a `trainer.FunctionalSpectron`.
      make_data: `() -> iterator of host batches` with a `batch_spec` {name: (shape, dtype)}, the
        validation split of this process from its start (called twice per evaluation).
      eval_batches: global batches per evaluation.
      abstract_params: `jax.ShapeDtypeStruct` tree (with shardings) of the parameters.
      abstract_batch: `jax.ShapeDtypeStruct` tree (with shardings) of one global batch.
      mesh, rules: the device mesh and its logical-axis rules.
      compute_dtype: the resolved compute dtype.
      microbatches: pieces per batch (the training step's `StepConfig.microbatches`).
      media: also compile the teacher-forced prediction and write media (process 0).
      writer: a `metrics.MetricsWriter` (scalars, image, audio) or None.
    """

    def __init__(self, model, make_data: Callable, eval_batches: int, abstract_params: Any,
                 abstract_batch: Mapping[str, jax.ShapeDtypeStruct], mesh, rules, compute_dtype,
                 microbatches: int = 1, media: bool = True, writer: Any = None, swapped_prefix: bool = False):
        self.make_data, self.eval_batches, self.mesh, self.rules = make_data, eval_batches, mesh, rules
        self.media, self.writer = media, writer
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        count_step = make_count_step(model.loss_normalizers)
        eval_step = make_eval_step(model.eval_fn, compute_dtype, microbatches)
        norm_shapes = jax.eval_shape(model.loss_normalizers, abstract_batch)
        term_shapes = jax.eval_shape(eval_step, abstract_params, abstract_batch, norm_shapes)

        def on_every_device(shapes):
            return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)

        def zeros(shapes):
            return jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                           out_shardings=jax.tree.map(lambda _: replicated, shapes)).lower().compile()

        with partitioning.sharding_context(mesh, rules):
            self.zero_counts, self.zero_terms = zeros(norm_shapes), zeros(term_shapes)
            counts, terms = on_every_device(norm_shapes), on_every_device(term_shapes)
            self.count_step = jax.jit(count_step, out_shardings=jax.tree.map(lambda _: replicated, norm_shapes)).lower(
                counts, abstract_batch).compile()
            self.eval_step = jax.jit(eval_step, out_shardings=jax.tree.map(lambda _: replicated, term_shapes)).lower(
                abstract_params, abstract_batch, counts, terms).compile()
            self.swapped_step = None
            if swapped_prefix:
                # rolled before the microbatch split, so a row reads another row of the global batch
                def swapped_step(params, batch, normalizers, totals):
                    terms = eval_step(params, swap_prefixes(batch), normalizers)
                    return {k: totals[k] + terms[k] for k in SWAPPED_TERMS if k in terms}

                swapped_shapes = {k: v for k, v in term_shapes.items() if k in SWAPPED_TERMS}
                self.zero_swapped = zeros(swapped_shapes)
                self.swapped_step = jax.jit(
                    swapped_step, out_shardings=jax.tree.map(lambda _: replicated, swapped_shapes)).lower(
                    abstract_params, abstract_batch, counts, on_every_device(swapped_shapes)).compile()
            self.predict = (jax.jit(model.predict_frames).lower(abstract_params, abstract_batch).compile()
                            if media else None)

    def _batches(self):
        """The evaluation's global batches; a host that ran out yields an all-padding batch (every
        process runs every batch: they stay in lockstep)."""
        data = self.make_data()
        for _ in range(self.eval_batches):
            host_batch = next(data, None)
            if host_batch is None:
                host_batch = {k: np.zeros(s, d) for k, (s, d) in data.batch_spec.items()}
            yield host_batch, partitioning.global_batch_from_host(host_batch, self.mesh, self.rules)

    def run(self, step: int, params) -> dict:
        """The evaluation's means {term: float} at `step` ({} when the split has no valid row); writes
        media through `writer` (process 0)."""
        with partitioning.sharding_context(self.mesh, self.rules):
            counts = self.zero_counts()
            for _, batch in self._batches():
                counts = self.count_step(counts, batch)
            totals, first = self.zero_terms(), None
            swapped = self.zero_swapped() if self.swapped_step is not None else None
            for host_batch, batch in self._batches():
                totals = self.eval_step(params, batch, counts, totals)
                if swapped is not None:
                    swapped = self.swapped_step(params, batch, counts, swapped)
                first = first if first is not None else (host_batch, batch)
        means = {k: float(np.asarray(v)) for k, v in jax.device_get(totals).items()}
        if swapped is not None:
            means.update({k + SWAPPED_SUFFIX: float(np.asarray(v)) for k, v in jax.device_get(swapped).items()})
        if means.get("num_text_tokens", 0.0) <= 0 and means.get("num_frames", 0.0) <= 0:
            return {}
        if self.media and first is not None:
            self._write_media(step, params, *first)
        return means

    def _write_media(self, step: int, params, host_batch, batch) -> None:
        with partitioning.sharding_context(self.mesh, self.rules):
            frames = self.predict(params, batch)
        if self.writer is None or not self.writer.enabled:
            return
        from spectron_jax import metrics as metrics_lib

        # This host's row 0 is the lowest global row among its shards (global_batch_from_host).
        first_shard = min(frames.addressable_shards, key=lambda shard: shard.index[0].start or 0)
        frames = np.asarray(jax.device_get(first_shard.data))[0]
        valid = int(host_batch["cont_mask"][0].sum())
        if valid == 0:  # this host's first row is padding
            return
        target = np.asarray(host_batch["cont_frames"][0][:valid])
        self.writer.image(step, "eval/spectrogram", metrics_lib.spectrogram_image(target, frames[:valid]))
        try:
            from spectron_jax import vocoder
            voc = vocoder.GriffinLimVocoder()
            self.writer.audio(step, "eval/continuation", voc(frames[:valid]), voc.sample_rate)
        except Exception as e:  # noqa: BLE001 - audio is a convenience, never fatal
            logger.warning("eval audio skipped: %s", e)

