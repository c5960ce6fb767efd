"""What a run's command line must agree on before training starts: the tokenizer of the run, the model's
special ids and separator, and the architecture recorded by every converted checkpoint it loads.

Each mismatch is a one-line `cli.UsageError` (or `cli.InputError` for a tokenizer that cannot be read)
naming the knob to change.
"""

from __future__ import annotations

import dataclasses

from spectron_jax import cli, filesystem


def tokenizer_of_run(config, model_config, task_config=None):
    """`config` with the run's tokenizer resolved and checked against the model, as are the conversions it loads.

    Every converted checkpoint the run initialises from (`PretrainedInit`, `TrainConfig.init_from`) must
    record the architecture of the model part it fills (`convert/metadata.py`; `PretrainedInit.allow_changes`
    accepts deliberate differences). Without `TrainConfig.vocab_path`, a run initialised from a converted
    LM (`PretrainedInit.lm_checkpoint`) uses that checkpoint's `tokenizer.model` (and is refused when it
    has none). The tokenizer's bos / eos / pad must be the model's sos / eos / pad ids (a converted
    `decoder.gin` binds them) and its pieces must fit the vocabulary. With a text separator
    (`TaskConfig.sep_id`), the model records the same id (`SpectronConfig.sep_id`) and the tokenizer holds
    it as a reserved piece.
    """
    from etils import epath

    from spectron_jax import checkpoints
    from spectron_jax.convert import metadata
    from spectron_jax.data import tasks as tasks_lib

    pretrained = getattr(model_config, "pretrained", None)
    allow = getattr(pretrained, "allow_changes", ())
    loads = [(getattr(pretrained, "encoder_checkpoint", None), "encoder", "PretrainedInit.encoder_checkpoint"),
             (getattr(pretrained, "lm_checkpoint", None), "decoder", "PretrainedInit.lm_checkpoint")]
    loads += [(init.checkpoint, init.target_prefix.split("/")[0] or None, "TrainConfig.init_from")
              for init in config.init_from]
    for path, component, knob in loads:
        record = metadata.read(path) if path and filesystem.is_dir(path) else None
        component = component or (record or {}).get("component")
        part = getattr(model_config, component or "", None)
        if record is None or part is None:
            continue
        try:
            metadata.check_record(path, record, part, component=component, allow=allow)
        except ValueError as e:
            raise cli.UsageError(f"{knob}: {e}") from None
    lm = getattr(pretrained, "lm_checkpoint", None)
    if not config.vocab_path and lm and filesystem.is_dir(lm):
        if not (epath.Path(lm) / checkpoints.TOKENIZER_FILENAME).exists():
            raise cli.UsageError(f"PretrainedInit.lm_checkpoint={lm} has no {checkpoints.TOKENIZER_FILENAME} (its "
                                 "source checkpoint had none): set TrainConfig.vocab_path to the LM's SentencePiece "
                                 "model")
        config = dataclasses.replace(config, vocab_path=str(epath.Path(lm) / checkpoints.TOKENIZER_FILENAME))
    path = config.vocab_path or tasks_lib.DEFAULT_VOCAB_PATH
    try:
        vocabulary = tasks_lib.load_vocabulary(path)
        ids = tasks_lib.token_ids(vocabulary)
    except (FileNotFoundError, ValueError) as e:
        raise cli.InputError(" ".join(str(e).split())) from None
    for name, got in (("sos_id", ids.bos_id), ("eos_id", ids.eos_id), ("pad_id", ids.pad_id)):
        if getattr(model_config, name) != got:
            raise cli.UsageError(f"SpectronConfig.{name}={getattr(model_config, name)} but the tokenizer {path} "
                                 f"has {got} (include the converted LM's decoder.gin or bind SpectronConfig.{name})")
    if ids.vocab_size > model_config.decoder.vocab_size:
        raise cli.UsageError(f"DecoderConfig.vocab_size={model_config.decoder.vocab_size} is smaller than the "
                             f"{ids.vocab_size} pieces of the tokenizer {path}")
    sep_id = getattr(model_config, "sep_id", None)
    if task_config is not None and task_config.sep_id != sep_id:
        raise cli.UsageError(f"TaskConfig.sep_id={task_config.sep_id} but SpectronConfig.sep_id={sep_id}; "
                             "bind both the same (the run gins' SEP_ID)")
    if sep_id is not None:
        try:
            tasks_lib.check_separator(vocabulary, sep_id, path)
        except ValueError as e:
            raise cli.UsageError(f"{e}; rebuild it with a reserved separator or set SEP_ID = None") from None
    return config
