"""`infer`: speech in -> prompt transcript + text continuation + spoken continuation.

    python -m spectron_jax.infer --export_dir=DIR --audio=PROMPT.wav --output_dir=OUT
    python -m spectron_jax.infer --export_dir=DIR --manifest=LIST.tsv --output_dir=OUT   # one folder per row

The first `--prompt_seconds` (3 s) of the audio are the prompt. Any file libsndfile reads (wav, flac,
ogg, ...) at any rate and channel count is resampled to 16 kHz mono. Each output folder gets
`result.json` (the text, split at the model's separator into `prompt_transcript` and `continuation`;
`text_boundary` says whether it was: see `split_text`; frame count, stop reason, timings), `continuation.wav`,
`prompt_plus_continuation.wav` and `spectrogram.png` (prompt | generated log-mel, boundary marked). The
default vocoder is Griffin-Lim on the device (`device_vocoder.DeviceGriffinLimVocoder`, one call per batch).
A manifest is a TSV whose first column is an audio path (an optional second column names the row's
folder); bad rows are counted and skipped. The manifest is streamed: one batch of waves is held at a time,
and only the prompt window of each file is read.

Reproducibility: a row's randomness (sampling, pre-net dropout) is keyed by `--seed` and the row's id,
its name when the manifest gives one (so reordering a manifest changes no output) and otherwise its
line index among the manifest's rows (0 for `--audio`). Prompts pad to the prompt window and the last
batch pads with dummy rows, so a whole run compiles `generate` once; `timings.compile` in result.json is
that compile's share, apart from the run time in `timings.generate`.

Overlap: the device runs its work in the order it is queued, so batches are pipelined (`Inferencer.stream`):
once batch k has generated, its vocoder call and batch k+1's generation are queued back to back, and batch
k's outputs are written while batch k+1 generates. Outputs are those of each batch run alone.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
import weakref
import zlib
from typing import Iterable, Iterator, Optional, Sequence

import jax
import numpy as np
from etils import epath

from spectron_jax import cli
from spectron_jax import compile_time
from spectron_jax import decoding
from spectron_jax import device_vocoder
from spectron_jax import filesystem
from spectron_jax import vocoder as vocoder_lib
from spectron_jax.data import features, phi, prompt_features

MIN_PROMPT_SECONDS = 0.1  # shorter prompts are rejected (DEFAULT).
SILENCE_PEAK = 1e-4  # a file whose largest |sample| is below this is silent (DEFAULT).


def load_audio(path: str, spec: features.FeatureSpec = features.SPECTRON_FEATURES,
               min_seconds: float = MIN_PROMPT_SECONDS, max_samples: Optional[int] = None) -> np.ndarray:
    """[samples] float32 mono at the spec's rate (only the first `max_samples` when given: see
    `Inferencer.prompt_samples`); `features.AudioError` (message names the file) for a missing, empty,
    corrupt, non-finite, silent or too-short file."""
    wave = features.load_audio(path, spec, max_samples)
    if wave.size < min_seconds * spec.sample_rate:
        raise features.AudioError("too_short", str(path), f"audio is {wave.size / spec.sample_rate:.3f} s, "
                                  f"shorter than {min_seconds} s")
    if float(np.max(np.abs(wave))) < SILENCE_PEAK:
        raise features.AudioError("silent", str(path), "audio is silent")
    return wave


# `InferenceResult.text_boundary`: how the text was split.
SEPARATED = "separator"   # at the model's separator: prompt_transcript | continuation
MISSING = "missing"       # the model has a separator (SpectronConfig.sep_id) but wrote none
UNMARKED = "unmarked"     # the model writes no separator (the paper's text): nothing to split at


@dataclasses.dataclass
class InferenceResult:
    """One row's output. Frames are log-mel [frames, mel]; waves float32 at the feature rate.

    `text` is everything the model wrote before eos (the separator left out); `prompt_transcript` and
    `continuation` are its two sides of the separator, both None unless `text_boundary` is SEPARATED.
    """

    text: str
    prompt_transcript: Optional[str]
    continuation: Optional[str]
    text_boundary: str
    prompt_frames: np.ndarray
    frames: np.ndarray
    waveform: np.ndarray
    stop_reason: str
    timings: dict


def split_text(tokens: Sequence[int], tokenizer,
               sep_id: Optional[int]) -> tuple[str, Optional[str], Optional[str], str]:
    """Decodes the generated ids [tokens] (eos excluded) into (text, prompt transcript, continuation,
    text_boundary): split at the first separator when the model writes one; else the text is whole and
    the two parts None (MISSING when the model has a separator, UNMARKED when it has none)."""
    tokens = [int(t) for t in tokens]

    def decode(ids):
        return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

    if sep_id is not None and sep_id in tokens:
        i = tokens.index(sep_id)
        head, tail = decode(tokens[:i]), decode([t for t in tokens[i + 1:] if t != sep_id])
        return " ".join(p for p in (head, tail) if p), head, tail, SEPARATED
    return decode(tokens), None, None, MISSING if sep_id is not None else UNMARKED


def row_id(index: int, name: Optional[str] = None) -> int:
    """A row's id for its PRNG key: a 31-bit hash of its name when it has one, else its index."""
    name = (name or "").strip()
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF if name else int(index)


class Inferencer:
    """Runs a bundle on batches of waveforms (16 kHz mono float32).

    Every batch is `batch_size` rows of `window` prompt frames (short prompts masked, a short batch filled
    with dummy rows), so all batches share one compiled program; row i of a request is keyed by its id
    (`row_ids[i]`, default i), so its output does not depend on the batch it lands in.
    """

    def __init__(self, bundle, decode_config: decoding.DecodeConfig = decoding.DecodeConfig(), vocoder=None,
                 batch_size: int = 8):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.config = decode_config
        self.vocoder = vocoder if vocoder is not None else device_vocoder.DeviceGriffinLimVocoder(bundle.feature_spec)
        self.batch_size = int(batch_size)
        self.sep_id = getattr(bundle.model.config, "sep_id", None)  # where the text is split (None: not at all)
        self.spec = bundle.feature_spec
        kind = bundle.model.config.prompt_features
        self.window = prompt_features.input_frames(kind, decode_config.prompt_seconds, self.spec)

    @property
    def prompt_samples(self) -> int:
        """Leading samples of a wave that the prompt reads: the log-mel frames of the prompt window with
        their analysis window (and the fbank prompt's samples for a w2v-BERT encoder)."""
        p = features.frames_for_seconds(self.config.prompt_seconds, self.spec)
        needed = features.samples_for_frames(p, self.spec)
        if self.bundle.model.config.prompt_features != "log_mel":
            needed = max(needed, prompt_features.prompt_samples(self.config.prompt_seconds))
        return needed

    def prompt_frames(self, wave: np.ndarray) -> np.ndarray:
        """[frames, mel] log-mel of the first `prompt_seconds` of `wave` (only `prompt_samples` are
        featurised: the same frames as featurising the whole wave and cutting)."""
        wave = np.asarray(wave, np.float32)[:self.prompt_samples]
        frames = features.log_mel(wave, self.spec)
        return frames[: features.frames_for_seconds(self.config.prompt_seconds, self.spec)]

    def encoder_input(self, wave: np.ndarray) -> np.ndarray:
        """[frames, encoder.input_dim]: what the model's encoder reads of the first `prompt_seconds` (the
        log-mel frames, or stacked w2v-BERT fbank for `SpectronConfig.prompt_features='w2v_bert_fbank'`)."""
        kind = self.bundle.model.config.prompt_features
        if kind == "log_mel":
            return self.prompt_frames(wave)
        return prompt_features.encoder_input(wave, kind, self.config.prompt_seconds, self.spec)

    def _pad(self, rows: Sequence[np.ndarray], batch: Optional[int] = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompts [frames_i, dim] -> frames float32 [batch, window, dim], mask int32 [batch, window] and
        row_valid bool [batch]: rows past len(rows) are dummies (copies of row 0, marked invalid)."""
        batch = len(rows) if batch is None else batch
        length = max([self.window] + [len(r) for r in rows])
        frames = np.zeros((batch, length, rows[0].shape[-1]), np.float32)
        mask = np.zeros((batch, length), np.int32)
        for i in range(batch):
            r = rows[i] if i < len(rows) else rows[0]
            frames[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return frames, mask, np.arange(batch) < len(rows)

    def run(self, waveforms: Sequence[np.ndarray], row_ids: Optional[Sequence[int]] = None) -> list[InferenceResult]:
        """One result per wave; `row_ids` key each row's randomness (default: its index in `waveforms`)."""
        row_ids = list(range(len(waveforms))) if row_ids is None else [int(i) for i in row_ids]
        if len(row_ids) != len(waveforms):
            raise ValueError(f"Inferencer.run: {len(row_ids)} row ids for {len(waveforms)} waveforms")
        starts = range(0, len(waveforms), self.batch_size)
        batches = ((waveforms[i:i + self.batch_size], row_ids[i:i + self.batch_size]) for i in starts)
        return [result for results in self.stream(batches) for result in results]

    def stream(self, batches: Iterable[tuple[Sequence[np.ndarray], Sequence[int]]]
               ) -> Iterator[list[InferenceResult]]:
        """The results of each (waves, row ids) batch of at most `batch_size` rows, in order, overlapped.

        The device runs its work in the order it is queued, so the host keeps it queued: once batch k's
        generation is done, its vocoder call and then batch k+1's generation are dispatched (reading and
        featurising batch k+1 overlap batch k's vocoder), and batch k's results are handed out while batch
        k+1 generates (the caller's writes overlap it). Each batch's output is the same as alone: only
        when the host waits changes. A vocoder without `dispatch` (see `device_vocoder`) runs at once.
        """
        iterator = iter(batches)
        current = self._dispatch(*next(iterator, (None, None)))
        while current is not None:
            collect = self._vocode(current)
            upcoming = self._dispatch(*next(iterator, (None, None)))
            yield self._finish(current, collect)
            current = upcoming

    def _dispatch(self, waveforms: Optional[Sequence[np.ndarray]], row_ids: Optional[Sequence[int]]
                  ) -> Optional[dict]:
        """Featurises a batch and dispatches its generation (not waited for); None for no batch."""
        if waveforms is None:
            return None
        if len(waveforms) > self.batch_size:
            raise ValueError(f"Inferencer.stream: a batch of {len(waveforms)} rows, more than {self.batch_size}")
        t0 = time.perf_counter()
        prompts = [self.prompt_frames(w) for w in waveforms]
        log_mel_encoder = self.bundle.model.config.prompt_features == "log_mel"
        frames, mask, valid = self._pad(prompts if log_mel_encoder else [self.encoder_input(w) for w in waveforms],
                                        self.batch_size)
        ids = np.zeros((self.batch_size,), np.int32)
        ids[:len(row_ids)] = [int(i) for i in row_ids]
        t1 = time.perf_counter()
        with compile_time.CompileTimer() as compiling:
            out = decoding.generate(self.bundle.model, self.bundle.params, frames, mask, self.config,
                                    row_ids=ids, row_valid=valid)
        return {"prompts": prompts, "out": out, "features": t1 - t0, "compile": compiling.seconds,
                "dispatch": time.perf_counter() - t1}

    def _vocode(self, pending: dict):
        """Waits for a batch's generation and dispatches its vocoder; returns the wait for the waves."""
        t0 = time.perf_counter()
        out = decoding.to_host(jax.block_until_ready(pending["out"]))
        t1 = time.perf_counter()
        # The padded batch (dummy rows have 0 frames), its frame axis cut to the longest row rounded up
        # to VOCODER_FRAME_BUCKET: a batched vocoder compiles a few shapes at most and skips the padding.
        used = min(out["frames"].shape[1], _round_up(max(int(np.max(out["num_frames"])), 2), VOCODER_FRAME_BUCKET))
        frames = out["frames"][:, :used]
        with compile_time.CompileTimer() as compiling:
            dispatch = getattr(self.vocoder, "dispatch", None)
            if callable(dispatch):
                collect = dispatch(frames, out["num_frames"])
            else:
                waves = vocoder_lib.synthesize_batch(self.vocoder, frames, out["num_frames"])
                collect = lambda: waves  # noqa: E731
        pending.update(host=out, wait=t1 - t0, vocoder_compile=compiling.seconds,
                       vocoder_dispatch=time.perf_counter() - t1)
        return collect

    def _finish(self, pending: dict, collect) -> list[InferenceResult]:
        """Waits for a batch's waves and builds its results."""
        t0 = time.perf_counter()
        waves = [np.asarray(w, np.float32) for w in collect()]
        vocoder_seconds = pending["vocoder_dispatch"] + time.perf_counter() - t0
        prompts, out = pending["prompts"], pending["host"]
        n_rows = len(prompts)
        out, waves = {k: v[:n_rows] for k, v in out.items()}, waves[:n_rows]
        generate_seconds = pending["dispatch"] + pending["wait"]
        compile_generate = min(pending["compile"], generate_seconds)
        compile_vocoder = min(pending["vocoder_compile"], vocoder_seconds)
        # Per row: host-visible seconds (work hidden behind other work, e.g. a generation running while
        # the previous batch was written, is not counted twice).
        timings = {"features": pending["features"] / n_rows,
                   "compile": (compile_generate + compile_vocoder) / n_rows,
                   "generate": (generate_seconds - compile_generate) / n_rows,
                   "vocoder": (vocoder_seconds - compile_vocoder) / n_rows}
        results = []
        for i, (prompt, wave) in enumerate(zip(prompts, waves)):
            n = int(out["text_lengths"][i])
            text, transcript, continuation, boundary = split_text(out["text_tokens"][i, :n], self.bundle.tokenizer,
                                                                  self.sep_id)
            gen = out["frames"][i, :int(out["num_frames"][i])]
            results.append(InferenceResult(
                text=text, prompt_transcript=transcript, continuation=continuation, text_boundary=boundary,
                prompt_frames=prompt, frames=gen, waveform=wave,
                stop_reason="stop_head" if bool(out["stopped"][i]) else "budget", timings=dict(timings)))
        return results

    def text_ids(self, transcript: str, prompt_share: float) -> list[int]:
        """The ids of `transcript` as the model was trained to write it: with the separator at phi (the
        Tasks' letter rule, `data.phi`, for a prompt of `prompt_share` of the utterance) when it has one."""
        encode = self.bundle.tokenizer.encode
        if self.sep_id is None:
            return [int(t) for t in encode(transcript)]
        head, tail = phi.split_transcript(transcript, prompt_share)
        tail = f" {tail}" if head and tail else tail  # as the Tasks tokenise it (tokenizers without a dummy prefix)
        return [int(t) for t in encode(head)] + [int(self.sep_id)] + [int(t) for t in encode(tail)]

    def teacher_forced_frames(self, waveforms: Sequence[np.ndarray], transcripts: Sequence[str],
                              row_ids: Optional[Sequence[int]] = None,
                              log_mels: Optional[Sequence[np.ndarray]] = None) -> list[np.ndarray]:
        """Post-net frames [frames, mel] predicted under teacher forcing on the true continuation (the
        audio after the prompt) and `transcripts` (its text, with the separator at phi: `text_ids`).

        One jitted call per `batch_size` rows, padded to buckets (`TEACHER_FORCED_FRAME_BUCKET` frames,
        `TEACHER_FORCED_TEXT_BUCKET` text slots, dummy rows), so a whole suite compiles it once. With the
        pre-net's dropout on at inference, row i's masks come from its own key (`row_ids[i]`, default i,
        with `seed`, stream 2), so a row's frames do not depend on the batch it runs in. `log_mels`:
        the waves' `features.log_mel`, when the caller has them already.
        """
        row_ids = list(range(len(waveforms))) if row_ids is None else [int(i) for i in row_ids]
        if len(row_ids) != len(waveforms) or len(transcripts) != len(waveforms):
            raise ValueError(f"teacher_forced_frames: {len(waveforms)} waves, {len(transcripts)} transcripts, "
                             f"{len(row_ids)} row ids")
        out: list[np.ndarray] = []
        for start in range(0, len(waveforms), self.batch_size):
            stop = start + self.batch_size
            out += self._teacher_forced_batch(waveforms[start:stop], transcripts[start:stop], row_ids[start:stop],
                                              None if log_mels is None else log_mels[start:stop])
        return out

    def teacher_forced_inputs(self, waveforms: Sequence[np.ndarray], transcripts: Sequence[str],
                              log_mels: Optional[Sequence[np.ndarray]] = None) -> tuple[dict, list[int]]:
        """The model batch of `batch_size` rows (dummies after len(waveforms)) and each row's number of
        true continuation frames: prompt_frames [batch, window, dim], prompt_mask, text_inputs / text_weights
        [batch, text bucket], cont_frames [batch, frame bucket, mel], cont_mask."""
        cfg, spec = self.bundle.model.config, self.spec
        r, p = cfg.reduction_factor, features.frames_for_seconds(self.config.prompt_seconds, spec)
        conts, texts = [], []
        for i, (wave, text) in enumerate(zip(waveforms, transcripts)):
            full = features.log_mel(np.asarray(wave, np.float32), spec) if log_mels is None else log_mels[i]
            conts.append(np.asarray(full[p:], np.float32))
            texts.append([cfg.sos_id] + self.text_ids(text, p / max(len(full), 1)))
        cont_len = _round_up(max([len(c) for c in conts] + [1]), TEACHER_FORCED_FRAME_BUCKET)
        cont_len = _round_up(cont_len, r)
        text_len = _round_up(max(len(t) for t in texts), TEACHER_FORCED_TEXT_BUCKET)
        prompt_frames, prompt_mask, _ = self._pad([self.encoder_input(w) for w in waveforms], self.batch_size)
        batch = self.batch_size
        text_inputs = np.zeros((batch, text_len), np.int32)
        text_weights = np.zeros((batch, text_len), np.float32)
        cont_frames = np.zeros((batch, cont_len, spec.num_mel), np.float32)
        cont_mask = np.zeros((batch, cont_len), np.int32)
        for i in range(batch):
            j = i if i < len(conts) else 0  # dummy rows copy row 0
            text_inputs[i, :len(texts[j])] = texts[j]
            text_weights[i, :len(texts[j])] = 1
            cont_frames[i, :len(conts[j])] = conts[j]
            cont_mask[i, :len(conts[j])] = 1
        return ({"prompt_frames": prompt_frames, "prompt_mask": prompt_mask, "text_inputs": text_inputs,
                 "text_weights": text_weights, "cont_frames": cont_frames, "cont_mask": cont_mask},
                [len(c) for c in conts])

    def _teacher_forced_batch(self, waveforms, transcripts, row_ids, log_mels) -> list[np.ndarray]:
        batch, lengths = self.teacher_forced_inputs(waveforms, transcripts, log_mels)
        ids = np.zeros((self.batch_size,), np.int32)
        ids[:len(row_ids)] = row_ids
        seed = np.asarray(int(self.config.seed) % 2**32, np.uint32)
        frames = np.asarray(_teacher_forced_program(self.bundle.model)(self.bundle.params, batch, seed, ids))
        return [frames[i, :n] for i, n in enumerate(lengths)]


VOCODER_FRAME_BUCKET = 160  # DEFAULT: the vocoder's frame axis is the longest row rounded up to this (2 s)
TEACHER_FORCED_FRAME_BUCKET = 800  # DEFAULT: continuation frames pad to a multiple of this (10 s)
TEACHER_FORCED_TEXT_BUCKET = 64  # DEFAULT: text slots (sos + ids) pad to a multiple of this
TEACHER_FORCED_STREAM = 2  # the row keys' stream of the teacher-forced pre-net masks (0, 1: decoding's)


def _round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


_TEACHER_FORCED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _teacher_forced_program(model):
    """The jitted teacher-forced pass of a model: (params, batch, seed uint32 [], row ids int32 [batch])
    -> post-net frames float32 [batch, cont_len, mel]."""
    if model not in _TEACHER_FORCED:
        import jax.numpy as jnp

        def run(params, batch, seed, ids):
            keys = decoding.step_keys(decoding.row_keys(seed, ids), TEACHER_FORCED_STREAM, jnp.zeros((), jnp.int32))
            module = model.merge(params)
            pred = module(batch, deterministic=True, row_keys=keys).frames  # [batch, steps, r, mel]
            return pred.reshape(pred.shape[0], -1, pred.shape[-1]).astype(jnp.float32)

        _TEACHER_FORCED[model] = jax.jit(run)
    return _TEACHER_FORCED[model]


def teacher_forced_compiles() -> int:
    """Programs the teacher-forced pass has compiled in this process (one per model and bucket shape)."""
    return sum(fn._cache_size() for fn in list(_TEACHER_FORCED.values()))


# ---- outputs -------------------------------------------------------------------------------------------
def write_outputs(result: InferenceResult, prompt_wave: np.ndarray, output_dir: str, sample_rate: int) -> dict:
    """Writes result.json, continuation.wav, prompt_plus_continuation.wav and spectrogram.png (into a local
    or gs:// folder, through `spectron_jax.filesystem`)."""
    out = epath.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompt_len = min(len(prompt_wave), int(round(len(result.prompt_frames) * sample_rate /
                                                 features.SPECTRON_FEATURES.frames_per_second)))
    vocoder_lib.write_wav(str(out / "continuation.wav"), result.waveform, sample_rate)
    vocoder_lib.write_wav(str(out / "prompt_plus_continuation.wav"),
                          np.concatenate([prompt_wave[:prompt_len], result.waveform]), sample_rate)
    _plot(result, str(out / "spectrogram.png"))
    info = {"text": result.text, "prompt_transcript": result.prompt_transcript, "continuation": result.continuation,
            "text_boundary": result.text_boundary,
            "prompt_frames": int(len(result.prompt_frames)), "generated_frames": int(len(result.frames)),
            "stop_reason": result.stop_reason, "timings": result.timings}
    filesystem.write_text(out / "result.json", json.dumps(info, indent=2))
    return info


def _plot(result: InferenceResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = np.concatenate([result.prompt_frames, result.frames], axis=0)
    fig, ax = plt.subplots(figsize=(10, 3))
    ax.imshow(both.T, origin="lower", aspect="auto", cmap="magma")
    ax.axvline(len(result.prompt_frames) - 0.5, color="cyan", linewidth=1.5)
    ax.set_xlabel("frame (80 / s): prompt | generated")
    ax.set_ylabel("mel bin")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    filesystem.write_bytes(path, buffer.getvalue())


# ---- CLI -----------------------------------------------------------------------------------------------
def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="spectron_jax.infer", description="Speech in, transcript + continuation out.")
    parser.add_argument("--export_dir", required=True, help="an export folder (spectron_jax.export)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", help="one prompt audio file")
    source.add_argument("--manifest", help="TSV: audio path [TAB folder name] per row")
    parser.add_argument("--output_dir", required=True)
    d = decoding.DecodeConfig()
    parser.add_argument("--prompt_seconds", type=float, default=d.prompt_seconds)
    parser.add_argument("--max_text_tokens", type=int, default=d.max_text_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top_k", type=int, default=d.top_k)
    parser.add_argument("--top_p", type=float, default=d.top_p)
    parser.add_argument("--max_frames", type=int, default=d.max_frames)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--batch_size", type=int, default=8)
    return parser


def _manifest_rows(path: epath.Path) -> list[tuple[str, Optional[str]]]:
    """(audio path, name or None) per manifest row (blank lines and '#' comments skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cells = line.split("\t")
        name = cells[1].strip() if len(cells) > 1 and cells[1].strip() else None
        rows.append((cells[0].strip(), name))
    return rows


def _batches(rows: Sequence[tuple[str, Optional[str]]], batch_size: int, load, on_skip
             ) -> Iterator[list[tuple[int, str, np.ndarray]]]:
    """Streams (row index, folder name, wave) in batches of `batch_size` loadable rows; `load(path)` reads
    a wave, `on_skip(error)` is told of each row that cannot be read. Only one batch of waves is held."""
    batch: list[tuple[int, str, np.ndarray]] = []
    for i, (audio, name) in enumerate(rows):
        try:
            batch.append((i, name or f"{i:05d}", load(audio)))
        except features.AudioError as e:
            on_skip(e)
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise cli.UsageError(f"--batch_size={args.batch_size}: must be a positive number of rows")
    try:
        config = decoding.DecodeConfig(prompt_seconds=args.prompt_seconds, max_text_tokens=args.max_text_tokens,
                                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                       max_frames=args.max_frames, min_frames=min(80, args.max_frames),
                                       seed=args.seed)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    if args.audio:
        rows = [(args.audio, None)]
    else:
        path = epath.Path(args.manifest)
        if not path.exists():
            raise cli.InputError(f"--manifest={args.manifest}: no such file")
        rows = _manifest_rows(path)
        if not rows:
            raise cli.InputError(f"--manifest={args.manifest}: no rows")
    from spectron_jax import bundle as bundle_lib

    try:
        bundle = bundle_lib.load_bundle(args.export_dir)
    except (FileNotFoundError, ValueError) as e:
        raise cli.InputError(f"--export_dir={args.export_dir}: {' '.join(str(e).split())}") from None
    except cli.CLIError as e:  # a bad config.gin: the message names the file and the line
        raise cli.InputError(str(e)) from None
    inferencer = Inferencer(bundle, config, batch_size=args.batch_size)
    skipped = 0

    def load(audio: str) -> np.ndarray:
        return load_audio(audio, bundle.feature_spec, max_samples=inferencer.prompt_samples)

    def on_skip(error: features.AudioError) -> None:
        nonlocal skipped
        if args.audio:
            raise cli.InputError(f"--audio={error}") from None
        print(f"skipped: {error}")
        skipped += 1

    from tqdm import tqdm

    done = 0
    with tqdm(total=len(rows), disable=bool(args.audio), desc="infer") as bar:
        loaded: list = []  # the batches read so far and not yet written (two at most: see Inferencer.stream)

        def requests():
            for batch in _batches(rows, args.batch_size, load, on_skip):
                loaded.append(batch)
                yield [wave for _, _, wave in batch], [row_id(i, rows[i][1]) for i, _, _ in batch]

        for results in inferencer.stream(requests()):
            batch = loaded.pop(0)
            for (_, name, wave), result in zip(batch, results):
                folder = epath.Path(args.output_dir) if args.audio else epath.Path(args.output_dir) / name
                info = write_outputs(result, wave, str(folder), bundle.feature_spec.sample_rate)
                done += 1
                if args.audio and info["text_boundary"] == SEPARATED:
                    print(f"transcript: {info['prompt_transcript']}")
                    print(f"continuation: {info['continuation']}")
                elif args.audio:
                    why = "no separator written" if info["text_boundary"] == MISSING else "the model has no separator"
                    print(f"text ({why}: transcript and continuation not told apart): {info['text']}")
                    print(f"frames: {info['generated_frames']} ({info['stop_reason']})")
            bar.n = min(len(rows), batch[-1][0] + 1)
            bar.refresh()
    if not args.audio:
        print(f"done: {done} written, {skipped} skipped")
    return 0 if done else 1


if __name__ == "__main__":
    cli.run(main)
