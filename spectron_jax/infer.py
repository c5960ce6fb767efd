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
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
import zlib
from typing import Iterator, Optional, Sequence

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
        results: list[InferenceResult] = []
        for start in range(0, len(waveforms), self.batch_size):
            stop = start + self.batch_size
            results += self._run_batch(waveforms[start:stop], row_ids[start:stop])
        return results

    def _run_batch(self, waveforms: Sequence[np.ndarray], row_ids: Sequence[int]) -> list[InferenceResult]:
        t0 = time.perf_counter()
        prompts = [self.prompt_frames(w) for w in waveforms]
        log_mel_encoder = self.bundle.model.config.prompt_features == "log_mel"
        frames, mask, valid = self._pad(prompts if log_mel_encoder else [self.encoder_input(w) for w in waveforms],
                                        self.batch_size)
        ids = np.zeros((self.batch_size,), np.int32)
        ids[:len(row_ids)] = row_ids
        t1 = time.perf_counter()
        with compile_time.CompileTimer() as compiling:
            out = decoding.generate(self.bundle.model, self.bundle.params, frames, mask, self.config,
                                    row_ids=ids, row_valid=valid)
            out = decoding.to_host(jax.block_until_ready(out))
        t2 = time.perf_counter()
        # The whole padded batch (dummy rows have 0 frames), so a batched vocoder keeps one shape too.
        with compile_time.CompileTimer() as compiling_vocoder:
            waves = vocoder_lib.synthesize_batch(self.vocoder, out["frames"], out["num_frames"])
        t3 = time.perf_counter()
        n_rows = len(prompts)
        out, waves = {k: v[:n_rows] for k, v in out.items()}, waves[:n_rows]
        compile_generate = min(compiling.seconds, t2 - t1)
        compile_vocoder = min(compiling_vocoder.seconds, t3 - t2)
        timings = {"features": (t1 - t0) / n_rows, "compile": (compile_generate + compile_vocoder) / n_rows,
                   "generate": (t2 - t1 - compile_generate) / n_rows,
                   "vocoder": (t3 - t2 - compile_vocoder) / n_rows}
        results = []
        for i, (prompt, wave) in enumerate(zip(prompts, waves)):
            n = int(out["text_lengths"][i])
            text, transcript, continuation, boundary = split_text(out["text_tokens"][i, :n], self.bundle.tokenizer,
                                                                  self.sep_id)
            gen = out["frames"][i, :int(out["num_frames"][i])]
            results.append(InferenceResult(
                text=text, prompt_transcript=transcript, continuation=continuation, text_boundary=boundary,
                prompt_frames=prompt, frames=gen,
                waveform=np.asarray(wave, np.float32),
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

    def teacher_forced_frames(self, waveforms: Sequence[np.ndarray], transcripts: Sequence[str]) -> list[np.ndarray]:
        """Post-net frames [frames, mel] predicted under teacher forcing on the true continuation (the
        audio after the prompt) and `transcripts` (its text, with the separator at phi: `text_ids`)."""
        import jax.numpy as jnp

        model, params, cfg = self.bundle.model, self.bundle.params, self.bundle.model.config
        r = cfg.reduction_factor
        out_rows = []
        for wave, text in zip(waveforms, transcripts):
            full = features.log_mel(np.asarray(wave, np.float32), self.spec)
            p = features.frames_for_seconds(self.config.prompt_seconds, self.spec)
            cont = full[p:]
            cont_len = max(r, -(-len(cont) // r) * r)
            prompt_frames, prompt_mask, _ = self._pad([self.encoder_input(wave)])
            ids = [cfg.sos_id] + self.text_ids(text, p / max(len(full), 1))
            cont_frames = np.zeros((1, cont_len, self.spec.num_mel), np.float32)
            cont_frames[0, :len(cont)] = cont
            cont_mask = np.zeros((1, cont_len), np.int32)
            cont_mask[0, :len(cont)] = 1
            batch = {"prompt_frames": prompt_frames, "prompt_mask": prompt_mask,
                     "text_inputs": np.asarray([ids], np.int32), "text_weights": np.ones((1, len(ids)), np.float32),
                     "cont_frames": cont_frames, "cont_mask": cont_mask}
            module = model.merge(params)
            pred = module({k: jnp.asarray(v) for k, v in batch.items()}, deterministic=True).frames
            out_rows.append(np.asarray(pred, np.float32).reshape(-1, self.spec.num_mel)[:len(cont)])
        return out_rows


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
        for batch in _batches(rows, args.batch_size, load, on_skip):
            ids = [row_id(i, rows[i][1]) for i, _, _ in batch]
            results = inferencer.run([wave for _, _, wave in batch], ids)
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
