"""What the speech encoder reads: the prompt's input features, log-mel or w2v-BERT fbank.

The decoder always regresses the 128-bin log-mel of `features.SPECTRON_FEATURES`. The encoder's input
is a separate choice, `PromptFeatures.kind`:

    'log_mel'         the prompt's log-mel frames themselves, [prompt_frames, 128] at 80 frames/s (the
                      native Conformer; the default)
    'w2v_bert_fbank'  the front-end w2v-BERT 2.0 was pre-trained on (`features.w2v_bert_features`):
                      80-bin Kaldi fbank at 100 frames/s, normalised per bin over the prompt window and
                      stacked in pairs, [stacked_frames, 160] at 50 frames/s

Fbank cannot be computed from log-mel, so `prepare --prompt_features=w2v_bert_fbank` stores the raw
(unnormalised) fbank of each utterance's first `seconds` of audio in the shard feature
`prompt_fbank` [fbank_frames * 80]; the Task normalises and stacks it (`preprocessors.fbank_prompt`,
`preprocessors.stack_prompt`) and `infer` computes the same thing from the prompt wave
(`encoder_input`). Shards without the feature still read; a Task that needs it then fails on the first
example with a one-line message naming the flag.

Frame counts for a prompt of `s` seconds at 16 kHz (`n = round(16000 s)` samples, no centring):
fbank frames `1 + (n - 400) // 160`, stacked frames half of that rounded down; 3 s: 298 and 149.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spectron_jax.data import features

KINDS = ("log_mel", "w2v_bert_fbank")
FBANK_KEY = "prompt_fbank"  # the shard feature: raw fbank, float_list [fbank_frames * 80]
FBANK = features.W2V_BERT_FBANK


@dataclasses.dataclass(frozen=True)
class PromptFeatures:
    """The encoder's input features.

    Attributes:
      kind: one of `KINDS`.
      seconds: with 'w2v_bert_fbank' in `prepare`, the audio whose fbank is stored (the prompt window;
        the paper's 3 s). DEFAULT 3.0; a Task with a longer prompt than the shards hold is an error.
    """

    kind: str = "log_mel"
    seconds: float = 3.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"prompt features must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.seconds > 0:
            raise ValueError(f"prompt feature seconds must be > 0, got {self.seconds}")


def check_kind(kind: str) -> str:
    """`kind` if it is one of `KINDS`, else ValueError naming the choices."""
    return PromptFeatures(kind).kind


def input_dim(kind: str, spec: features.FeatureSpec = features.SPECTRON_FEATURES) -> int:
    """Values per encoder input frame: 128 for log-mel, 160 for stacked fbank."""
    return spec.num_mel if check_kind(kind) == "log_mel" else FBANK.stacked_dim


def prompt_samples(seconds: float, sample_rate: int = FBANK.sample_rate) -> int:
    """Samples of a prompt of `seconds` (48000 for 3 s)."""
    return int(round(seconds * sample_rate))


def fbank_frames(seconds: float) -> int:
    """Unstacked fbank frames of a prompt of `seconds` (298 for 3 s; 0 below one 25 ms window)."""
    n = prompt_samples(seconds)
    return 0 if n < FBANK.window else 1 + (n - FBANK.window) // FBANK.hop


def input_frames(kind: str, seconds: float, spec: features.FeatureSpec = features.SPECTRON_FEATURES) -> int:
    """Encoder input frames of a full prompt of `seconds`: 240 log-mel or 149 stacked fbank for 3 s."""
    if check_kind(kind) == "log_mel":
        return features.frames_for_seconds(seconds, spec)
    return fbank_frames(seconds) // FBANK.stride


def shard_features(wave: np.ndarray, prompt: PromptFeatures | None) -> dict[str, np.ndarray]:
    """Extra shard features of one utterance for `prepare`: {} or {FBANK_KEY: [frames, 80] float32}.

    Args:
      wave: [samples] float32 mono 16 kHz, the whole utterance.
      prompt: what to store (None or 'log_mel': nothing beyond the log-mel every shard holds).
    """
    if prompt is None or prompt.kind == "log_mel":
        return {}
    return {FBANK_KEY: features.kaldi_fbank(np.asarray(wave)[:prompt_samples(prompt.seconds)], FBANK)}


def encoder_input(wave: np.ndarray, kind: str, seconds: float,
                  spec: features.FeatureSpec = features.SPECTRON_FEATURES) -> np.ndarray:
    """The encoder input of the first `seconds` of `wave` [samples] (16 kHz mono float32).

    Returns:
      'log_mel': [<= 240, 128] log-mel frames; 'w2v_bert_fbank': [<= 149, 160] normalised stacked fbank
      (the same values the Task computes from `prepare`'s stored fbank).
    """
    wave = np.asarray(wave, np.float32)
    if check_kind(kind) == "log_mel":
        return features.log_mel(wave, spec)[:features.frames_for_seconds(seconds, spec)]
    return features.w2v_bert_features(wave[:prompt_samples(seconds)], FBANK)
