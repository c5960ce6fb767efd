"""Speech recognition of audio the evaluation needs transcribed (generated speech, spoken answers).

    asr = make_asr("pocketsphinx")                  # the default: offline, its model ships in the wheel
    asr = make_asr("whisper:/path/to/whisper-small") # a local transformers Whisper checkpoint
    texts = asr.transcribe([wave, ...])             # [samples] float32 16 kHz each -> list[str]

`PocketSphinxASR` uses the en-US acoustic model, dictionary and 3-gram LM that the `pocketsphinx` wheel
ships, so nothing downloads. It is a weak recogniser (about 0.9 WER on the embedded espeak voices; much
better on read human speech), so figures derived from it say so in the report. `WhisperASR` loads a
`transformers` Whisper model from a name or folder the user already has (the paper used an external
ASR system that is not public). Both take 16 kHz mono float32 audio.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

SAMPLE_RATE = 16000
WHISPER_PREFIX = "whisper:"


class Transcriber(Protocol):
    """Audio -> text. `name` says which system produced a figure (the report prints it)."""

    name: str

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[str]:
        """Each [samples] float32 16 kHz wave -> its transcript ('' for silence or empty audio)."""
        ...


def _int16_bytes(wave: np.ndarray) -> bytes:
    wave = np.clip(np.nan_to_num(np.asarray(wave, np.float32)), -1.0, 1.0)
    return (wave * 32767.0).astype("<i2").tobytes()


class PocketSphinxASR:
    """CMU PocketSphinx with the en-US models shipped in its wheel (offline).

    Each utterance is decoded from the same recogniser state: PocketSphinx carries its live cepstral
    mean (CMN) estimate over from one utterance to the next, so without a reset a transcript depended
    on what was transcribed before it (example order, batch contents, the resume point).
    `Decoder.reinit_feat` before each utterance restores the initial feature state; the result equals
    a freshly built decoder's (tests/test_eval_scorers.py checks both).
    """

    name = "pocketsphinx (en-US wheel model)"

    def __init__(self):
        import pocketsphinx

        self._decoder = pocketsphinx.Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[str]:
        texts = []
        for wave in waves:
            if np.asarray(wave).size == 0:
                texts.append("")
                continue
            self._decoder.reinit_feat()  # the initial CMN estimate: no state from the previous utterance
            self._decoder.start_utt()
            self._decoder.process_raw(_int16_bytes(wave), full_utt=True)
            self._decoder.end_utt()
            hyp = self._decoder.hyp()
            texts.append(hyp.hypstr.strip() if hyp is not None else "")
        return texts


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """Decoding knobs of `WhisperASR` (DEFAULT values, not the paper's: it did not name its ASR).

    Attributes:
      max_new_tokens: longest transcript, in tokens.
      num_beams: 1 = greedy.
      language: forced language token ('en'), or None to let the model detect it.
    """

    max_new_tokens: int = 128
    num_beams: int = 1
    language: str | None = "en"


class WhisperASR:
    """A `transformers` Whisper model loaded from a local folder or a name already in the local cache."""

    def __init__(self, name_or_path: str, config: WhisperConfig = WhisperConfig()):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.name = f"whisper ({name_or_path})"
        self._config = config
        self._torch = torch
        self._processor = WhisperProcessor.from_pretrained(name_or_path)
        self._model = WhisperForConditionalGeneration.from_pretrained(name_or_path).eval()

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[str]:
        if not waves:
            return []
        inputs = self._processor.feature_extractor(
            [np.asarray(w, np.float32) for w in waves], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        kwargs = {"max_new_tokens": self._config.max_new_tokens, "num_beams": self._config.num_beams}
        if self._config.language and getattr(self._model.generation_config, "lang_to_id", None):
            kwargs.update(language=self._config.language, task="transcribe")
        with self._torch.no_grad():
            ids = self._model.generate(inputs.input_features, **kwargs)
        return [t.strip() for t in self._processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def make_asr(spec: str) -> Transcriber:
    """`pocketsphinx` or `whisper:<name-or-path>` -> a Transcriber. ValueError on anything else."""
    if spec == "pocketsphinx":
        return PocketSphinxASR()
    if spec.startswith(WHISPER_PREFIX) and spec[len(WHISPER_PREFIX):]:
        return WhisperASR(spec[len(WHISPER_PREFIX):])
    raise ValueError(f"unknown ASR {spec!r} (use pocketsphinx or whisper:<name-or-path>)")
