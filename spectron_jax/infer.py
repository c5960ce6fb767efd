"""`infer`: speech in -> prompt transcript + text continuation + spoken continuation.

    python -m spectron_jax.infer --export_dir=DIR --audio=PROMPT.wav --output_dir=OUT
    python -m spectron_jax.infer --export_dir=DIR --manifest=LIST.tsv --output_dir=OUT   # one folder per row

The first `--prompt_seconds` (3 s) of the audio are the prompt. Any file libsndfile reads (wav, flac,
ogg, ...) at any rate and channel count is resampled to 16 kHz mono. Each output folder gets
`result.json` (the text, split at the model's separator into `prompt_transcript` and `continuation`;
`text_boundary` says whether it was: see `split_text`; frame count, stop reason, timings), `continuation.wav`,
`prompt_plus_continuation.wav` and `spectrogram.png` (prompt | generated log-mel, boundary marked).
A manifest is a TSV whose first column is an audio path (an optional second column names the row's
folder); bad rows are counted and skipped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional, Sequence

import jax
import numpy as np
from etils import epath

from spectron_jax import cli
from spectron_jax import decoding
from spectron_jax import vocoder as vocoder_lib
from spectron_jax.data import features, phi, prompt_features

MIN_PROMPT_SECONDS = 0.1  # shorter prompts are rejected (DEFAULT).
SILENCE_PEAK = 1e-4  # a file whose largest |sample| is below this is silent (DEFAULT).


def load_audio(path: str, spec: features.FeatureSpec = features.SPECTRON_FEATURES,
               min_seconds: float = MIN_PROMPT_SECONDS) -> np.ndarray:
    """[samples] float32 mono at the spec's rate; `features.AudioError` (message names the file) for a
    missing, empty, corrupt, non-finite, silent or too-short file."""
    wave = features.load_audio(path, spec)
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


class Inferencer:
    """Runs a bundle on batches of waveforms (16 kHz mono float32)."""

    def __init__(self, bundle, decode_config: decoding.DecodeConfig = decoding.DecodeConfig(), vocoder=None,
                 batch_size: int = 8):
        self.bundle = bundle
        self.config = decode_config
        self.vocoder = vocoder if vocoder is not None else vocoder_lib.GriffinLimVocoder(bundle.feature_spec)
        self.batch_size = batch_size
        self.sep_id = getattr(bundle.model.config, "sep_id", None)  # where the text is split (None: not at all)
        self.spec = bundle.feature_spec

    def prompt_frames(self, wave: np.ndarray) -> np.ndarray:
        """[frames, mel] log-mel of the first `prompt_seconds` of `wave`."""
        frames = features.log_mel(np.asarray(wave, np.float32), self.spec)
        return frames[: features.frames_for_seconds(self.config.prompt_seconds, self.spec)]

    def encoder_input(self, wave: np.ndarray) -> np.ndarray:
        """[frames, encoder.input_dim]: what the model's encoder reads of the first `prompt_seconds` (the
        log-mel frames, or stacked w2v-BERT fbank for `SpectronConfig.prompt_features='w2v_bert_fbank'`)."""
        kind = self.bundle.model.config.prompt_features
        if kind == "log_mel":
            return self.prompt_frames(wave)
        return prompt_features.encoder_input(wave, kind, self.config.prompt_seconds, self.spec)

    def _pad(self, rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        length = max(len(r) for r in rows)
        length = max(4, -(-length // 4) * 4)
        frames = np.zeros((len(rows), length, rows[0].shape[-1]), np.float32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            frames[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return frames, mask

    def run(self, waveforms: Sequence[np.ndarray]) -> list[InferenceResult]:
        results: list[InferenceResult] = []
        for start in range(0, len(waveforms), self.batch_size):
            results += self._run_batch(waveforms[start:start + self.batch_size])
        return results

    def _run_batch(self, waveforms: Sequence[np.ndarray]) -> list[InferenceResult]:
        t0 = time.perf_counter()
        prompts = [self.prompt_frames(w) for w in waveforms]
        log_mel_encoder = self.bundle.model.config.prompt_features == "log_mel"
        frames, mask = self._pad(prompts if log_mel_encoder else [self.encoder_input(w) for w in waveforms])
        t1 = time.perf_counter()
        out = decoding.generate(self.bundle.model, self.bundle.params, frames, mask, self.config,
                                jax.random.key(self.config.seed))
        out = decoding.to_host(jax.block_until_ready(out))
        t2 = time.perf_counter()
        waves = vocoder_lib.synthesize_batch(self.vocoder, out["frames"], out["num_frames"])
        t3 = time.perf_counter()
        results = []
        for i, (prompt, wave) in enumerate(zip(prompts, waves)):
            n = int(out["text_lengths"][i])
            text, transcript, continuation, boundary = split_text(out["text_tokens"][i, :n], self.bundle.tokenizer,
                                                                  self.sep_id)
            gen = out["frames"][i, :int(out["num_frames"][i])]
            timings = {"features": (t1 - t0) / len(prompts), "generate": (t2 - t1) / len(prompts),
                       "vocoder": (t3 - t2) / len(prompts)}
            results.append(InferenceResult(
                text=text, prompt_transcript=transcript, continuation=continuation, text_boundary=boundary,
                prompt_frames=prompt, frames=gen,
                waveform=np.asarray(wave, np.float32),
                stop_reason="stop_head" if bool(out["stopped"][i]) else "budget", timings=timings))
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
            prompt_frames, prompt_mask = self._pad([self.encoder_input(wave)])
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
    """Writes result.json, continuation.wav, prompt_plus_continuation.wav and spectrogram.png."""
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
    (out / "result.json").write_text(json.dumps(info, indent=2))
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
    fig.savefig(path, dpi=80)
    plt.close(fig)


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
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
        rows = [(line.split("\t")[0].strip(), (line.split("\t") + [None])[1])
                for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if not rows:
            raise cli.InputError(f"--manifest={args.manifest}: no rows")
    from spectron_jax import bundle as bundle_lib

    try:
        bundle = bundle_lib.load_bundle(args.export_dir)
    except (FileNotFoundError, ValueError) as e:
        raise cli.InputError(f"--export_dir={args.export_dir}: {' '.join(str(e).split())}") from None
    inferencer = Inferencer(bundle, config, batch_size=args.batch_size)
    waves, names, skipped = [], [], 0
    for i, (audio, name) in enumerate(rows):
        try:
            waves.append(load_audio(audio, bundle.feature_spec))
            names.append((name or "").strip() or f"{i:05d}")
        except features.AudioError as e:
            if args.audio:
                raise cli.InputError(f"--audio={e}") from None
            print(f"skipped: {e}")
            skipped += 1
    from tqdm import tqdm

    done = 0
    with tqdm(total=len(waves), disable=bool(args.audio), desc="infer") as bar:
        for start in range(0, len(waves), args.batch_size):
            chunk = waves[start:start + args.batch_size]
            for j, result in enumerate(inferencer.run(chunk)):
                folder = epath.Path(args.output_dir) if args.audio else epath.Path(args.output_dir) / names[start + j]
                info = write_outputs(result, chunk[j], str(folder), bundle.feature_spec.sample_rate)
                done += 1
                if args.audio and info["text_boundary"] == SEPARATED:
                    print(f"transcript: {info['prompt_transcript']}")
                    print(f"continuation: {info['continuation']}")
                elif args.audio:
                    why = "no separator written" if info["text_boundary"] == MISSING else "the model has no separator"
                    print(f"text ({why}: transcript and continuation not told apart): {info['text']}")
                    print(f"frames: {info['generated_frames']} ({info['stop_reason']})")
            bar.update(len(chunk))
    if not args.audio:
        print(f"done: {done} written, {skipped} skipped")
    return 0 if done else 1


if __name__ == "__main__":
    cli.run(main)
