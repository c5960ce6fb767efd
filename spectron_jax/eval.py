"""`eval`: score an exported model on speech continuation or spoken question answering.

    python -m spectron_jax.eval --export_dir=DIR --suite=continuation --data_dir=data --output_dir=OUT
    python -m spectron_jax.eval --export_dir=DIR --suite=llama_questions --data_dir=LLAMA1-Test-Set --output_dir=OUT
    python -m spectron_jax.eval --export_dir=DIR --suite=web_questions --data_dir=webq/manifest.jsonl --output_dir=OUT

Suites (data layouts in `spectron_jax.evaluation.datasets`, figures in `evaluation.continuation` and
`evaluation.spoken_qa`): `continuation` (the embedded corpus's test split for `--data_dir=data`, a
LibriSpeech tree such as `LibriSpeech/test-clean`, or a manifest), `llama_questions`, `web_questions`.

Scorers (all offline by default): `--asr=pocketsphinx|whisper:<name-or-path>|none`,
`--text_lm=bundle|hf:<name-or-path>|none` (`bundle`: the model's own decoder, a proxy LM),
`--speaker=resemblyzer|none`, `--naturalness=dnsmos|none`.

Writes OUT/metrics.json, report.md, report.html, examples.jsonl, wavs/, plots/ (see `evaluation.report`;
OUT may be a `gs://` folder, and `--data_dir` too). Every
pooled figure has a 95 % bootstrap interval over utterances (`--bootstrap_resamples`, DEFAULT 1000;
`--bootstrap_seed`) and, where one exists, its floors and ceilings (`evaluation.floors`: the same
scorers on noise, silence, another speaker and the truth); metrics.json records its provenance
(`evaluation.provenance`) and the rows each figure leaves out. A bad
example (missing or corrupt audio, too short, an inference error) is counted and skipped with its
reason; a rerun into the same OUT resumes, reusing the rows already written, when they were made by the
same run: every row records its fingerprint (export folder and step, decode settings, scorers, suite,
data and prompt settings), and rows of another one make the rerun refuse (`--overwrite` starts afresh).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

from spectron_jax import cli

SUITES = ("continuation", "llama_questions", "web_questions")


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="spectron_jax.eval", description="Evaluate an exported Spectron model.")
    p.add_argument("--export_dir", required=True, help="a folder written by spectron_jax.export")
    p.add_argument("--suite", required=True, choices=SUITES)
    p.add_argument("--data_dir", required=True, help="the suite's data (see spectron_jax.evaluation.datasets)")
    p.add_argument("--output_dir", required=True, help="where the report is written")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--batch_size", type=int, default=4, help="examples per inference call")
    p.add_argument("--split", default=None, help="continuation: rows of this split (default: test / all)")
    p.add_argument("--asr", default="pocketsphinx", help="pocketsphinx | whisper:<name-or-path> | none")
    p.add_argument("--text_lm", default="bundle", help="bundle | hf:<name-or-path> | none")
    p.add_argument("--speaker", default="resemblyzer", choices=("resemblyzer", "none"))
    p.add_argument("--naturalness", default="dnsmos", choices=("dnsmos", "none"))
    p.add_argument("--long_questions", default="full", choices=("full", "truncate"),
                   help="QA: feed a question longer than the prompt window whole, or cut it")
    p.add_argument("--max_frames", type=int, default=None, help="frame budget of the spoken continuation")
    p.add_argument("--temperature", type=float, default=None, help="text sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--nowavs", dest="wavs", action="store_false", help="do not write the generated wavs")
    p.add_argument("--nofloors", dest="floors", action="store_false",
                   help="do not score the floors and ceilings (noise, silence, another speaker, the truth)")
    p.add_argument("--bootstrap_resamples", type=int, default=1000,
                   help="bootstrap resamples of the 95%% intervals (over utterances; 0: no intervals)")
    p.add_argument("--bootstrap_seed", type=int, default=0, help="seed of the bootstrap resamples")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the rows of an earlier run in --output_dir instead of resuming it")
    return p


def make_scorers(args: Any, bundle: Any):
    """The scorers the flags ask for (each loads its model once here)."""
    from spectron_jax.evaluation import runner

    scorers = runner.Scorers(floors=bool(getattr(args, "floors", True)))
    try:
        if args.asr != "none":
            from spectron_jax.evaluation.asr import make_asr

            scorers.asr = make_asr(args.asr)
        if args.text_lm != "none" and args.suite == "continuation":
            from spectron_jax.evaluation.text_lm import make_text_lm

            scorers.text_lm = make_text_lm(args.text_lm, bundle)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    except OSError as e:  # a transformers name or path that is not there
        raise cli.InputError(f"cannot load a scorer: {' '.join(str(e).split())[:300]}") from None
    if args.speaker == "resemblyzer" and args.suite == "continuation":
        from spectron_jax.evaluation.speaker import SpeakerEncoder

        scorers.speaker = SpeakerEncoder()
    if args.naturalness == "dnsmos" and args.suite == "continuation":
        from spectron_jax.evaluation.naturalness import DNSMOS

        scorers.dnsmos = DNSMOS()
    return scorers


def _where(path: str) -> str:
    """A path as the fingerprint records it: absolute for a local one, as given for gs://."""
    return path if "://" in path else os.path.abspath(path)


def fingerprint(args: Any, bundle: Any, scorers: Any) -> dict:
    """What makes a row (recorded in each, compared on resume): the export folder and its step
    (bundle.json), the decode settings (`args.decode`: `DecodeConfig` as a dict), the scorers and the
    suite's data and settings, and the version of the rows' floors. Not the batch size, `--limit` or
    the bootstrap: they do not change a row."""
    meta = getattr(bundle, "meta", None) or {}
    suite = {"suite": args.suite, "data_dir": _where(args.data_dir), "split": args.split,
             "prompt_seconds": float(getattr(args, "prompt_seconds", 3.0))}
    if args.suite != "continuation":
        suite["long_questions"] = args.long_questions
    from spectron_jax.evaluation import floors

    return {"export_dir": _where(args.export_dir), "step": meta.get("step"),
            "decode": dict(getattr(args, "decode", None) or {}), "scorers": scorers.names(), "suite": suite,
            "floors": floors.VERSION if getattr(scorers, "floors", True) else None}


def evaluate(args: Any, bundle: Any, make_inferencer: Callable[[float], Any], scorers: Any) -> dict:
    """Runs `args.suite` and writes its report; returns the metrics.json payload's `metrics`.

    `make_inferencer(prompt_seconds)` returns an object with `run(waves, row_ids)` and
    `teacher_forced_frames` (`spectron_jax.infer.Inferencer`). Raises `cli.InputError` when `--data_dir`
    cannot be read, or when `--output_dir` holds rows of another run (`fingerprint`) and not `--overwrite`.
    """
    from etils import epath

    from spectron_jax.evaluation import continuation, datasets, evidence, intervals, provenance, report, runner
    from spectron_jax.evaluation import spectrograms, spoken_qa, text_lm

    out = epath.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.suite == "continuation":
            examples, skips = datasets.continuation_examples(args.data_dir, args.split)
        elif args.suite == "llama_questions":
            examples, skips = datasets.llama_questions_examples(args.data_dir)
        else:
            examples, skips = datasets.web_questions_examples(args.data_dir)
    except datasets.DatasetError as e:
        raise cli.InputError(str(e)) from None
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        raise cli.InputError(f"--data_dir={args.data_dir}: no examples for --suite={args.suite}")
    prompt_seconds = float(getattr(args, "prompt_seconds", 3.0))
    settings = {"export_dir": args.export_dir, "data_dir": args.data_dir, "suite": args.suite,
                "limit": args.limit, "batch_size": args.batch_size, "prompt_seconds": prompt_seconds}
    notes = []
    overwrite = bool(getattr(args, "overwrite", False))
    stamp = fingerprint(args, bundle, scorers)
    settings.update(step=stamp["step"], decode=stamp["decode"])
    try:
        if args.suite == "continuation":
            config = continuation.ContinuationConfig(prompt_seconds=prompt_seconds, batch_size=args.batch_size,
                                                     write_wavs=args.wavs, overwrite=overwrite)
            rows, panels = continuation.run(make_inferencer(prompt_seconds), examples, skips, scorers, out, config,
                                            stamp)
        else:
            config = spoken_qa.QAConfig(prompt_seconds=prompt_seconds, long_questions=args.long_questions,
                                        batch_size=args.batch_size, write_wavs=args.wavs, overwrite=overwrite)
            rows, facts = spoken_qa.run(make_inferencer, args.suite, examples, skips, scorers, out, config, stamp)
    except runner.ResumeError as e:
        raise cli.InputError(f"--output_dir={args.output_dir}: {e}") from None
    if args.suite == "continuation":
        values = continuation.metrics(rows)
        if any(row.get("wavs") for row in rows):  # the grid from the folder's wavs: resumed rows too
            panels = spectrograms.row_panels(out, rows[: continuation.PLOT_EXAMPLES], ("prompt", "generated", "true"))
        notes.append(f"Prompt: the first {prompt_seconds:g} s of each utterance; the rest is the true continuation.")
        if continuation.teacher_forced_note(rows):
            notes.append(continuation.teacher_forced_note(rows))
    else:
        values, panels = spoken_qa.metrics(rows), []
        settings.update(facts)
        how = ("fed whole: the prompt window was widened to {w:g} s" if facts["long_questions"] == "full"
               else "cut to the first {w:g} s").format(w=facts["prompt_window_seconds"])
        notes.append(f"{facts['questions_longer_than_prompt']} questions are longer than the "
                     f"{prompt_seconds:g} s training prompt window; they were {how}.")
    if runner.boundary_note(rows):
        notes.append(runner.boundary_note(rows))
    if runner.non_finite_note(rows):
        notes.append(runner.non_finite_note(rows))
    if "asr" in scorers.names() and scorers.names()["asr"].startswith("pocketsphinx"):
        notes.append("ASR figures come from PocketSphinx, a weak recogniser (about 0.9 WER on synthetic "
                     "voices); a stronger ASR (--asr=whisper:...) gives more meaningful transcripts.")
    if scorers.text_lm is not None and getattr(scorers.text_lm, "name", "").endswith("(proxy LM)"):
        notes.append("Perplexities are under the model's own decoder (a proxy); the paper used GPT-2 Medium "
                     "(--text_lm=hf:<path to gpt2-medium>).")
    if any("asr_lm" in r for r in rows):
        notes.append(text_lm.empty_note([text_lm.TextScore(**r["asr_lm"]) for r in rows if "asr_lm" in r],
                                        "asr_log_ppl", "ASR transcripts of the generated speech"))
    try:
        boot = intervals.BootstrapConfig(resamples=int(getattr(args, "bootstrap_resamples", 1000)),
                                         seed=int(getattr(args, "bootstrap_seed", 0)))
    except ValueError as e:
        raise cli.UsageError(f"--bootstrap_resamples: {e}") from None
    found = evidence.collect(args.suite, rows, boot)
    values.update(found["figures"])
    made = provenance.provenance(getattr(bundle, "meta", None), stamp["decode"], scorers.names(), args.export_dir)
    made["scorer_flags"] = {k: getattr(args, k, None) for k in ("asr", "text_lm", "speaker", "naturalness")}
    made["floors"] = scorers.floors
    report.write(out, args.suite, values, rows, skips, scorers.names(), settings, panels,
                 [n for n in notes if n], evidence=found, provenance=made)
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise cli.UsageError(f"--batch_size={args.batch_size}: must be at least 1")
    if args.bootstrap_resamples < 0:
        raise cli.UsageError(f"--bootstrap_resamples={args.bootstrap_resamples}: must be at least 0")
    if args.limit is not None and args.limit < 1:
        raise cli.UsageError(f"--limit={args.limit}: must be at least 1")
    if not os.path.exists(args.data_dir) and not args.data_dir.startswith("gs://"):
        raise cli.InputError(f"--data_dir={args.data_dir}: no such file or folder")
    from spectron_jax import bundle as bundle_lib
    from spectron_jax import decoding, infer

    try:
        bundle = bundle_lib.load_bundle(args.export_dir)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise cli.InputError(f"--export_dir={args.export_dir}: {' '.join(str(e).split())}") from None
    overrides = {k: getattr(args, k) for k in ("max_frames", "temperature", "seed") if getattr(args, k) is not None}
    fields = {f.name for f in dataclasses.fields(decoding.DecodeConfig)}
    base = decoding.DecodeConfig(**{k: v for k, v in overrides.items() if k in fields})
    args.prompt_seconds = base.prompt_seconds
    args.decode = dataclasses.asdict(base)

    def make_inferencer(prompt_seconds: float):
        return infer.Inferencer(bundle, dataclasses.replace(base, prompt_seconds=prompt_seconds),
                                batch_size=args.batch_size)

    scorers = make_scorers(args, bundle)
    values = evaluate(args, bundle, make_inferencer, scorers)
    shown = {k: v for k, v in values.items() if k in ("num_examples", "asr_log_ppl", "speaker_sim_generated",
                                                      "text_wer", "text_accuracy", "speech_accuracy")}
    print(f"{args.suite}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in shown.items()) + f"; report in {args.output_dir}")
    return 0


if __name__ == "__main__":
    cli.run(main)
