"""The seqio Tasks of Spectron: TFRecord shards of log-mel utterances -> prompt, continuation, text.

Three Tasks share one recipe and differ only in where their shards live:

    spectron_embedded     the small corpus shipped in data/embedded (tests, CPU runs)
    spectron_librispeech  LibriSpeech (continuation evaluation on test-clean)
    spectron_librilight   Libri-Light with pseudo-label transcripts (the paper's training data)

Each reads `DATA_DIR/<split>.tfrecord-NNNNN-of-NNNNN` (split in train / validation / test, written by
`python -m spectron_jax.data.prepare`) and yields, per utterance,

    prompt         float32 [prompt_frames, 128]  the first 3 s (240 frames), SpecAugmented on train
                   or [149, 160] with TaskConfig.prompt_features='w2v_bert_fbank' (stacked fbank)
    continuation   float32 [cont_frames, 128]    the frames after the prompt, cropped
    text           int32   [tokens]              the whole transcript, tokenised (no bos / eos); with
                                                 TaskConfig.sep_id the separator token at phi
    text_segments  int32   [tokens]              with TaskConfig.phi_split: 1 prompt part, 2 the rest
    id, transcript, speaker (tf.string []), split (tf.string []), total_frames (int32 [])

`register_tasks` is library code: it takes plain values (an entry point parses gin and calls it).
Registering again replaces the Tasks, so a changed config always takes effect.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping

import seqio
import tensorflow as tf

from spectron_jax import filesystem
from spectron_jax.data import augment as augment_lib
from spectron_jax.data import converter as converter_lib
from spectron_jax.data import features as features_lib
from spectron_jax.data import preprocessors
from spectron_jax.data import prompt_features as prompt_features_lib
from spectron_jax.data import tfrecords

TASK_NAMES = ("spectron_embedded", "spectron_librispeech", "spectron_librilight")
SPLITS = ("train", "validation", "test")

# Where each Task looks for its shards when `register_tasks` is given no directory for it; relative
# paths resolve against the working directory (the repository root for the documented commands).
DEFAULT_DATA_DIRS = {
    "spectron_embedded": os.path.join("data", "embedded", "tfrecords"),
    "spectron_librispeech": os.path.join("data", "librispeech", "tfrecords"),
    "spectron_librilight": os.path.join("data", "librilight", "tfrecords"),
}
DEFAULT_VOCAB_PATH = os.path.join("data", "embedded", "spm", "spectron_tiny.model")
SHARD_PATTERN = "{split}.tfrecord-*-of-*"


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Every knob of the Tasks' preprocessing."""

    # Prompt length: the paper's fixed 3 s.
    prompt_seconds: float = 3.0
    # Utterances shorter than prompt_seconds + this are dropped (the paper drops those under 3 s).
    # DEFAULT, not in the paper.
    min_continuation_seconds: float = 0.5
    # The continuation is cropped to this many seconds (None: no crop). 10 s = 800 frames matches the
    # generation cap used at inference. DEFAULT, not in the paper.
    max_continuation_seconds: float | None = 10.0
    # Write `text_segments` (1 = prompt's share of the tokens, 2 = continuation's) from the phi split.
    phi_split: bool = False
    # The reserved separator token written into the text target at phi (the prompt's end, at a word
    # boundary), between the prompt's transcript and the continuation's: `SpectronConfig.sep_id`, a
    # reserved piece of the tokenizer (`check_separator`; the project's model has '<sep>' at 4).
    # None: no marker. Beyond the paper (its target is the whole transcript with no marker).
    sep_id: int | None = None
    # When the continuation is cropped, drop the tokens past the kept audio (phi approximation).
    # DEFAULT, not in the paper.
    trim_transcript_to_audio: bool = True
    # SpecAugment of the prompt; None turns it off.
    spec_augment: preprocessors.SpecAugmentConfig | None = preprocessors.SpecAugmentConfig()
    # The splits SpecAugment and the utterance augmentation apply to (training only).
    augment_splits: tuple[str, ...] = ("train",)
    # Speed, mel-shift and later-start augmentation of whole utterances before the prompt split
    # (`augment.UtteranceAugmentConfig`; the default changes nothing). DEFAULT, not in the paper.
    utterance_augment: augment_lib.UtteranceAugmentConfig = augment_lib.UtteranceAugmentConfig()
    # The features the shards hold (80 frames per second, 128 mel bins).
    feature_spec: features_lib.FeatureSpec = features_lib.SPECTRON_FEATURES
    # Shuffle buffer of `Task.get_dataset`; the training input's default shuffle window (records).
    # DEFAULT, not in the paper.
    shuffle_buffer_size: int = 1000
    # The encoder's input (`prompt_features.KINDS`): 'log_mel' (the prompt's own frames) or
    # 'w2v_bert_fbank' (stacked fbank from shards prepared with --prompt_features=w2v_bert_fbank).
    prompt_features: str = "log_mel"

    def __post_init__(self):
        if self.prompt_seconds <= 0:
            raise ValueError(f"TaskConfig.prompt_seconds must be > 0, got {self.prompt_seconds}")
        if self.min_continuation_seconds < 0:
            raise ValueError(f"TaskConfig.min_continuation_seconds must be >= 0, got {self.min_continuation_seconds}")
        if self.max_continuation_seconds is not None and self.max_continuation_seconds <= 0:
            raise ValueError(f"TaskConfig.max_continuation_seconds must be > 0 or None, got {self.max_continuation_seconds}")
        if self.max_continuation_seconds is not None and self.max_continuation_seconds < self.min_continuation_seconds:
            raise ValueError("TaskConfig.max_continuation_seconds is below min_continuation_seconds")
        if self.sep_id is not None and self.sep_id < 0:
            raise ValueError(f"TaskConfig.sep_id must be >= 0 or None, got {self.sep_id}")
        if self.utterance_augment.active and self.prompt_features != "log_mel":
            raise ValueError("TaskConfig.utterance_augment needs prompt_features='log_mel' (the stored fbank of "
                             "the prompt window cannot follow a speed change or a later start)")
        if self.prompt_features not in prompt_features_lib.KINDS:
            raise ValueError(f"TaskConfig.prompt_features must be one of {prompt_features_lib.KINDS}, "
                             f"got {self.prompt_features!r}")

    @property
    def prompt_frames(self) -> int:
        """Frames in the prompt (240 for 3 s)."""
        return features_lib.frames_for_seconds(self.prompt_seconds, self.feature_spec)

    @property
    def min_frames(self) -> int:
        """Shortest utterance kept, in frames."""
        return self.prompt_frames + max(
            1, features_lib.frames_for_seconds(self.min_continuation_seconds, self.feature_spec)
        )

    @property
    def max_continuation_frames(self) -> int | None:
        """The continuation crop in frames (None: no crop)."""
        if self.max_continuation_seconds is None:
            return None
        return features_lib.frames_for_seconds(self.max_continuation_seconds, self.feature_spec)


class SplitTaggedTFExampleSource(seqio.TFExampleDataSource):
    """A TFExampleDataSource that also writes the split's name into every example (`split`, tf.string []).

    Preprocessors see no split argument in seqio; the tag lets SpecAugment run on the training split
    only while every split shares one Task. Shards on an object store are listed and read through
    `spectron_jax.filesystem` (TensorFlow's own GCS client is not used; see that module).
    """

    def list_shards(self, split: str):
        pattern = self._split_to_filepattern[split]
        if isinstance(pattern, str) and filesystem.is_remote(pattern):
            return filesystem.glob(pattern)
        return super().list_shards(split)

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed=None, shard_info=None, **kwargs):
        dataset = super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)
        tag = tf.constant(split, tf.string)
        return dataset.map(lambda ex: {**ex, "split": tag}, num_parallel_calls=tf.data.AUTOTUNE)

    def parse_serialized(self, serialized: tf.Tensor, split: str) -> dict:
        """One serialized record (tf.string []) as `get_dataset` yields it: parsed and split-tagged."""
        return {**self.parse_fn(serialized), "split": tf.constant(split, tf.string)}


def load_vocabulary(vocab_path: str) -> seqio.SentencePieceVocabulary:
    """Loads a SentencePiece model and checks the ids the batches rely on.

    The vocabulary is a property of the Task (the shards store transcripts as text), so one set of
    shards serves every tokenizer: the project's (pad 0, eos 1, unk 2, bos 3) or a pretrained LM's,
    e.g. Gemma's (pad 0, eos 1, bos 2, unk 3). pad must be 0 and eos 1; bos (the `sos` that starts
    every text input) may be any other id and reaches the batches through `token_ids`.
    """
    if not filesystem.exists(vocab_path):
        raise FileNotFoundError(f"SentencePiece model not found: {vocab_path}")
    vocabulary = seqio.SentencePieceVocabulary(filesystem.local_copy(vocab_path))
    wanted = {
        "pad": (vocabulary.pad_id, converter_lib.PAD_ID),
        "eos": (vocabulary.eos_id, converter_lib.EOS_ID),
    }
    wrong = [f"{name} is {got}, expected {want}" for name, (got, want) in wanted.items() if got != want]
    bos = vocabulary.bos_id
    if bos is None or bos < 0 or bos in (converter_lib.PAD_ID, converter_lib.EOS_ID):
        wrong.append(f"bos is {bos}, expected an id other than pad and eos")
    if wrong:
        raise ValueError(f"SentencePiece model {vocab_path}: {'; '.join(wrong)}")
    return vocabulary


# The project's separator piece (a user-defined symbol of data/build_corpus.py's tokenizer) and the
# pieces of a pretrained LM's tokenizer that may serve as one (Gemma's '<unused0>', '<unused1>', ...).
SEP_PIECE = "<sep>"
UNUSED_PIECE_PREFIX = "<unused"


def reserved_piece_ids(model_proto: bytes) -> dict[int, str]:
    """{id: piece} of the pieces of a serialised SentencePiece model that no text segmentation yields
    (user-defined, control and unused pieces, other than pad / eos / unk / bos)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    kinds = (model.SentencePiece.USER_DEFINED, model.SentencePiece.CONTROL, model.SentencePiece.UNUSED)
    spec = model.trainer_spec
    special = {spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id}
    return {i: p.piece for i, p in enumerate(model.pieces) if p.type in kinds and i not in special}


def check_separator(vocabulary: seqio.SentencePieceVocabulary, sep_id: int, where: str = "") -> None:
    """Raises ValueError (one line) unless `sep_id` is a reserved piece of `vocabulary` (`reserved_piece_ids`)."""
    reserved = reserved_piece_ids(vocabulary.sp_model)
    if sep_id not in reserved:
        got = "out of range" if sep_id >= vocabulary.vocab_size else repr(vocabulary.tokenizer.id_to_piece(sep_id))
        hint = (f"its reserved pieces: {', '.join(f'{p} = {i}' for i, p in sorted(reserved.items())[:4])}"
                if reserved else f"it has no reserved piece (train it with user_defined_symbols={SEP_PIECE!r})")
        raise ValueError(f"tokenizer {where or 'model'} lacks the separator sep_id={sep_id} (that id is {got}; "
                         f"{hint})")


def separator_candidate(model_proto: bytes) -> int | None:
    """The id of a tokenizer's separator: its '<sep>' piece, else its first '<unusedN>' piece; None if neither."""
    reserved = reserved_piece_ids(model_proto)
    by_piece = {p: i for i, p in reserved.items()}
    if SEP_PIECE in by_piece:
        return by_piece[SEP_PIECE]
    number = {i: p[len(UNUSED_PIECE_PREFIX):-1] for i, p in reserved.items()
              if p.startswith(UNUSED_PIECE_PREFIX) and p.endswith(">")}
    unused = sorted((int(n), i) for i, n in number.items() if n.isdigit())
    return unused[0][1] if unused else None


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The special ids of a Task's tokenizer and its size."""

    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int


def token_ids(vocabulary: seqio.Vocabulary) -> TokenIds:
    """bos / eos / pad ids and the size of `vocabulary` (a Task's `text` vocabulary)."""
    return TokenIds(bos_id=int(vocabulary.bos_id), eos_id=int(vocabulary.eos_id), pad_id=int(vocabulary.pad_id),
                    vocab_size=int(vocabulary.vocab_size))


def output_features(vocabulary: seqio.Vocabulary, phi_split: bool = False) -> dict[str, seqio.Feature]:
    """The Tasks' output features: two rank-2 float spectrograms and the text tokens."""
    features = {
        "prompt": seqio.ContinuousFeature(dtype=tf.float32, rank=2),
        "continuation": seqio.ContinuousFeature(dtype=tf.float32, rank=2),
        "text": seqio.Feature(vocabulary=vocabulary, add_eos=False, dtype=tf.int32, rank=1),
    }
    if phi_split:
        features["text_segments"] = seqio.ContinuousFeature(dtype=tf.int32, rank=1, required=False)
    return features


def task_preprocessors(config: TaskConfig) -> list:
    """The preprocessing chain of every Spectron Task, bound to `config`'s knobs."""
    chain = [
        functools.partial(preprocessors.parse_example, num_mel_bins=config.feature_spec.num_mel),
        functools.partial(augment_lib.augment_utterance, config=config.utterance_augment,
                          splits=config.augment_splits,
                          frames_per_second=config.feature_spec.frames_per_second, min_frames=config.min_frames),
        functools.partial(preprocessors.filter_short, min_frames=config.min_frames),
        functools.partial(
            preprocessors.split_prompt_continuation,
            prompt_frames=config.prompt_frames,
            max_continuation_frames=config.max_continuation_frames,
        ),
        functools.partial(
            preprocessors.tokenize_transcript,
            phi_split=config.phi_split,
            trim_to_kept_audio=config.trim_transcript_to_audio,
            sep_id=config.sep_id,
            seconds_per_frame=1.0 / config.feature_spec.frames_per_second,
        ),
    ]
    fbank = config.prompt_features == "w2v_bert_fbank"
    if fbank:  # the encoder reads the stored fbank of the prompt window, normalised, stacked last
        chain.insert(4, functools.partial(
            preprocessors.fbank_prompt, num_frames=prompt_features_lib.fbank_frames(config.prompt_seconds)))
    if config.spec_augment is not None:
        chain.append(
            functools.partial(preprocessors.spec_augment, config=config.spec_augment, splits=config.augment_splits)
        )
    if fbank:
        chain.append(preprocessors.stack_prompt)
    return chain


def shard_patterns(data_dir: str) -> dict[str, str]:
    """{split: file pattern of its shards} under `data_dir`."""
    return {split: filesystem.join(data_dir, SHARD_PATTERN.format(split=split)) for split in SPLITS}


def feature_description(config: TaskConfig) -> dict:
    """What the Task parses of each record: the shard schema, plus the stored fbank when the encoder reads it."""
    if config.prompt_features == "w2v_bert_fbank":
        return {**preprocessors.FEATURE_DESCRIPTION, **tfrecords.prompt_fbank_feature()}
    return preprocessors.FEATURE_DESCRIPTION


def register_task(
    name: str, data_dir: str, vocabulary: seqio.Vocabulary, config: TaskConfig = TaskConfig()
) -> seqio.Task:
    """Registers (or replaces) one Task reading the shards under `data_dir`."""
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=SplitTaggedTFExampleSource(
            split_to_filepattern=shard_patterns(data_dir),
            feature_description=feature_description(config),
            reader_cls=filesystem.tfrecord_reader(data_dir),
        ),
        preprocessors=task_preprocessors(config),
        output_features=output_features(vocabulary, config.phi_split),
        shuffle_buffer_size=config.shuffle_buffer_size,
    )


def register_tasks(
    data_dir_by_task: Mapping[str, str] | None = None,
    vocab_path: str = DEFAULT_VOCAB_PATH,
    config: TaskConfig = TaskConfig(),
) -> dict[str, seqio.Task]:
    """Registers the three Spectron Tasks, replacing earlier registrations of the same names.

    Args:
      data_dir_by_task: {task name: directory of its shards}; a Task left out reads
        DEFAULT_DATA_DIRS[name]. Shards are listed when a dataset is built, so a directory that does
        not exist yet is no error here.
      vocab_path: the SentencePiece model (ids pad 0, eos 1, unk 2, bos 3).
      config: the preprocessing knobs, shared by the three Tasks; with `config.sep_id` the tokenizer must
        hold that id as a reserved piece (ValueError otherwise).

    Returns:
      {task name: the registered seqio.Task}.
    """
    data_dirs = dict(DEFAULT_DATA_DIRS)
    for name, data_dir in (data_dir_by_task or {}).items():
        if name not in TASK_NAMES:
            raise ValueError(f"unknown Spectron task {name!r}; known: {', '.join(TASK_NAMES)}")
        data_dirs[name] = os.fspath(data_dir)
    vocabulary = load_vocabulary(os.fspath(vocab_path))
    if config.sep_id is not None:
        check_separator(vocabulary, config.sep_id, os.fspath(vocab_path))
    return {name: register_task(name, data_dirs[name], vocabulary, config) for name in TASK_NAMES}
