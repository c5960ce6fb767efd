"""A training run's starting state: the exact resume from its newest checkpoint, or a fresh state
initialised directly in its shards (optionally with parts copied from other checkpoints).

A resume restores the train state, the RNG and each process's data position. When the checkpoint's
data stream differs from this run's (`data_change`: seed, shards, record order, input files) the resume
is refused unless `TrainConfig.accept_data_change`; when only the process count changed, every
process's data restarts at the start of the oldest saved epoch (another count has no position that
continues the saved ones).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from spectron_jax import cli

logger = logging.getLogger("spectron_jax.train")


def data_change(meta: dict, seed: int, shard, process_index: int, order_version: int | None = None,
                fingerprint: dict | None = None) -> str:
    """What differs between a checkpoint's data stream (its `meta`) and this run's ('' when nothing).

    A checkpoint without `input_order` counted its position in the first record order (version 1).
    `fingerprint` is this run's `pipeline.order_fingerprint`, compared with the meta's
    `input_fingerprint` (absent in older checkpoints: not compared); its order settings only count
    when `order_version` is given (the same process count: an exact resume is attempted).
    """
    from spectron_jax.data import pipeline as pipeline_lib

    changes = []
    if "seed" in meta and int(meta["seed"]) != seed:
        changes.append(f"data_seed {meta['seed']} -> {seed}")
    if order_version is not None and "seed" in meta and int(meta.get("input_order", 1)) != order_version:
        changes.append(f"input record order version {meta.get('input_order', 1)} -> {order_version}")
    if "num_shards" in meta and int(meta["num_shards"]) != shard.count:
        changes.append(f"data shard count {meta['num_shards']} -> {shard.count}")
    saved_index = meta.get("shard_index")
    if isinstance(saved_index, list) and process_index < len(saved_index) and int(saved_index[process_index]) != shard.index:
        changes.append(f"data shard index {saved_index[process_index]} -> {shard.index}")
    if fingerprint is not None:
        changes += pipeline_lib.fingerprint_changes(meta.get("input_fingerprint"), fingerprint,
                                                    settings=order_version is not None)
    return ", ".join(changes)


def restore(ckpt: Any, step: int, abstract: dict, shardings: dict, config: Any, shard: Any, train_input: Any) -> dict:
    """The train state of checkpoint `step`; positions `train_input` where that step's data left off.

    Args:
      ckpt: the run's `checkpoints.TrainCheckpointer`.
      step: the checkpoint to restore (its newest).
      abstract, shardings: the state's shapes and shardings (`trainer.train_state_layout`).
      config: the run's `TrainConfig` (data_seed, accept_data_change).
      shard: this process's `partitioning.data_shard_info`.
      train_input: the train pipeline (`pipeline.make_pipeline`), restored in place.

    Raises:
      cli.InputError: the data stream changed and `accept_data_change` is not set.
    """
    import jax
    import numpy as np

    from spectron_jax import checkpoints
    from spectron_jax.data import pipeline as pipeline_lib

    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    meta = ckpt.meta(step)
    count = int(meta.get("process_count", jax.process_count()))
    same_count = count == jax.process_count()
    # A new process count is an expected change (handled below); a new seed or sharding is not.
    changed = data_change(meta if same_count else {"seed": meta.get("seed", config.data_seed),
                                                   "input_fingerprint": meta.get("input_fingerprint")},
                          config.data_seed, shard, jax.process_index(),
                          pipeline_lib.ORDER_VERSION if same_count else None, train_input.order_fingerprint())
    if changed and not config.accept_data_change:
        raise cli.InputError(f"{ckpt.directory}/{step}: the checkpoint's data stream differs from this run's "
                             f"({changed}); set --gin.TrainConfig.accept_data_change=True to resume anyway "
                             f"(the data restarts at the saved epoch's start)")
    target["input"] = {k: np.zeros((count,), np.int32) for k in checkpoints.INPUT_KEYS}
    state, _ = ckpt.restore(step, target)
    input_arrays = state.pop("input")
    position = None if changed else checkpoints.input_state_for_process(
        input_arrays, jax.process_index(), jax.process_count())
    if position is not None:
        position.update(seed=config.data_seed, shard_index=shard.index, num_shards=shard.count)
    else:
        position = _restart_position(input_arrays, meta, changed, train_input.record_counts)
    train_input.restore(position)
    print(f"resumed from step {step} in {ckpt.directory}", flush=True)
    return state


def _restart_position(input_arrays: dict, meta: dict, changed: str, record_counts) -> dict:
    """The data position of a resume that cannot continue the saved positions: the oldest saved epoch,
    from its start (every process's stream is a permutation of its own files)."""
    import jax
    import numpy as np

    from spectron_jax.data import epoch_order

    epochs, positions = np.asarray(input_arrays["epoch"]), np.asarray(input_arrays["position"])
    epoch = int(epochs.min())
    saved_indices = meta.get("shard_index")
    if changed:
        logger.warning("the data stream changed (%s): data restarts at epoch %d, position 0", changed, epoch)
    else:
        replayed = epoch_order.replayed_records(
            record_counts, int(meta.get("num_shards", len(epochs))), epochs, positions,
            saved_indices if isinstance(saved_indices, list) and len(saved_indices) == len(epochs) else None)
        logger.warning("checkpoint written by %d processes, now %d: data restarts at epoch %d, position 0 "
                       "(%d of the %d records of an epoch are seen again)",
                       len(epochs), jax.process_count(), epoch, replayed, sum(record_counts))
    return {"epoch": epoch, "position": 0, "batches": 0}


def initialise(init_state: Any, shardings: dict, config: Any, model_config: Any) -> dict:
    """A fresh train state built directly in its shards (`init_state` jitted with `shardings` as its
    output shardings: never a full copy on one device), then the parts named by `TrainConfig.init_from`
    and the model's `PretrainedInit` (encoder / LM checkpoints) copied in."""
    import jax

    from spectron_jax import checkpoints

    state = jax.jit(init_state, out_shardings=shardings)()
    inits = list(config.init_from)
    pretrained: Optional[Any] = getattr(model_config, "pretrained", None)
    for component, path in (("encoder", getattr(pretrained, "encoder_checkpoint", None)),
                            ("decoder", getattr(pretrained, "lm_checkpoint", None))):
        if path:
            inits.append(checkpoints.component_init(path, component))
    if inits:
        params, copied = checkpoints.apply_partial_init(state["params"], inits)
        state["params"] = params
        print(f"initialised {len(copied)} parameter arrays from {len(inits)} checkpoint(s)", flush=True)
    return state
