"""`prepare`: featurises a speech corpus into TFRecord shards of log-mel spectrograms.

    python -m spectron_jax.data.prepare --format=librispeech|librilight|manifest|embedded \\
        --input=PATH --output_dir=DIR [--num_shards=N] [--num_workers=N] [--splits=train,validation] \\
        [--split=NAME] [--stats] [--min_seconds=S] [--frame_dtype=float16|float32] \\
        [--prompt_features=w2v_bert_fbank --prompt_feature_seconds=3] \\
        [--max_utterance_seconds=13 --min_pause_seconds=0.2 --pause_db=35] \\
        [--transcripts=TSV --segmentation=vad|fixed --max_segment_seconds=13 --write_segments=TSV]
    python -m spectron_jax.data.prepare --format=tfds --input=NAME[/CONFIG][:VERSION] --tfds_data_dir=DIR \\
        [--tfds_splits=train_clean100,dev_clean] [--tfds_split_map=train=train,dev=validation,test=test] \\
        [--tfds_audio_key=speech --tfds_text_key=text --tfds_speaker_key=speaker_id --tfds_id_key=id] --output_dir=DIR
    ... [--runner=local|beam] [--beam_pipeline_options="--runner=DataflowRunner ..."] [--dry_run]

The file formats are described in `spectron_jax.data.sources`, the TFDS one in `spectron_jax.data.tfds_source`.
Inputs and outputs may be local or `gs://` (`spectron_jax.filesystem`).

Output (a contract: the seqio tasks read it):

- `DIR/<split>.tfrecord-<i:05d>-of-<n:05d>`: TFRecord files of `tf.train.Example`s in the schema of
  `spectron_jax.data.tfrecords` (id, transcript, speaker, duration, num_frames, log-mel [T, 128] stored
  as float16 by default, `--frame_dtype=float32` to keep float32; readers accept both); with
  `--prompt_features=w2v_bert_fbank` also prompt_fbank, the w2v-BERT encoder's raw fbank of the first
  `--prompt_feature_seconds` of each (split) utterance, see `spectron_jax.data.prompt_features`.
- `DIR/report.json`: the options, and per split the examples written, hours, frames, storage dtype,
  long utterances split / dropped, skipped utterances by reason (with up to 20 examples each) and the
  shards with their example counts; see `build_report`. A run of some splits (`--splits=...`) keeps
  the entries earlier runs wrote for the others.
- `DIR/stats.json` (with `--stats`): per-bin mean/std of the train split's stored frames
  (`features.FeatureStats`), including train shards of earlier runs; of all splits when there is no
  train split.
- `DIR/shard_index/<shard>.json`: one record per finished shard (its job's fingerprint, example and
  byte counts, skips, statistics sums), what makes re-runs resumable.

Sharding: a split's audio files are sorted by path and dealt round-robin to its shards (default
ceil(utterances / 256) shards; pass --num_shards to make the count divide the number of hosts). Each
shard is one job (`spectron_jax.data.shard_jobs`: plan, resume check, featurise, write) run by a
worker process. A shard is written under a temporary hidden name and renamed when complete, then its
index record is written; a re-run skips every shard whose file, index record, fingerprint (inputs,
their sizes and mtimes, feature numbers) and TFRecord count all agree, so nothing finished is
rewritten and a crash never leaves a truncated file under a shard name. After a successful run, shards
of the same split with another shard count and stale temporary files are removed.

Runners: `--runner=local` (DEFAULT) runs the shard jobs in a process pool (`run_local`);
`--runner=beam` runs them as an Apache Beam pipeline with `--beam_pipeline_options` (DirectRunner on
this machine, Dataflow, ...; needs the `beam` extra), same bytes, see `spectron_jax.data.prepare_beam`.
`--dry_run` prints the runner, its options and the shard plan as JSON and writes nothing.

Utterances longer than the training window (`--max_utterance_seconds`, DEFAULT 13 s) are split at
pauses into pieces with their share of the transcript, and what cannot be split is dropped and counted
(`too_long`), never cropped: `spectron_jax.data.splitting`.

Bad utterances (missing, empty, corrupt, truncated, zero-sample or NaN audio, empty transcript,
duplicate id, malformed or non-UTF-8 manifest row or transcript line, too short, too long without a
pause) are skipped and counted by reason, never fatal. An input with nothing usable is a one-line error.
Records are serialised deterministically, so a killed run resumed gives the same shard bytes.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Callable, Sequence

from spectron_jax import cli, filesystem
from spectron_jax.data import features, prompt_features, sources, splitting, tfds_source
from spectron_jax.data.prepare_report import (
    INDEX_DIR,
    build_report,
    earlier_splits,
    skip_dict,
    summarise_skips,
    totals,
)
from spectron_jax.data.shard_jobs import (
    PrepareOptions,
    ShardJob,
    finished_shard,
    index_path,
    plan_shards,
    write_shard,
)
from spectron_jax.data.tfrecords import FRAME_DTYPES

FORMATS = ("librispeech", "librilight", "manifest", "embedded", "tfds")
RUNNERS = ("local", "beam")


_worker_progress = None  # a shared counter of segments done, set in each worker process


def _init_worker(counter) -> None:
    global _worker_progress
    _worker_progress = counter
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _count_progress(n: int) -> None:
    with _worker_progress.get_lock():
        _worker_progress.value += n


def _run_job(job: ShardJob, output_dir: str, options: PrepareOptions) -> dict:
    return write_shard(job, output_dir, options, _count_progress)


def run_jobs(jobs: Sequence[ShardJob], output_dir: str, options: PrepareOptions, num_workers: int) -> list[dict]:
    """Writes the shards of `jobs` (in worker processes when num_workers > 1), with a progress bar."""
    import tqdm

    total = sum(j.num_segments for j in jobs)
    bar = tqdm.tqdm(total=total, unit="utt", desc="prepare", disable=None, file=sys.stderr)
    try:
        if num_workers <= 1 or len(jobs) <= 1:
            return [write_shard(job, output_dir, options, bar.update) for job in jobs]
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # TF and fork do not mix.
        counter = context.Value("q", 0)
        # A worker that dies (e.g. killed for memory) fails the run with BrokenProcessPool, never hangs it.
        with concurrent.futures.ProcessPoolExecutor(
            min(num_workers, len(jobs)), mp_context=context, initializer=_init_worker, initargs=(counter,)
        ) as pool:
            futures = [pool.submit(_run_job, job, output_dir, options) for job in jobs]
            try:
                pending = set(futures)
                while pending:
                    done, pending = concurrent.futures.wait(pending, timeout=0.2, return_when="FIRST_EXCEPTION")
                    bar.update(counter.value - bar.n)
                    for future in done:
                        future.result()  # re-raises a worker's error at once
                return [f.result() for f in futures]
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()


Executor = Callable[[Sequence[ShardJob], str, PrepareOptions, int], tuple[list[dict], int]]


def run_local(jobs: Sequence[ShardJob], output_dir: str, options: PrepareOptions, num_workers: int):
    """The default executor: skips finished shards, writes the others in a process pool (`run_jobs`).

    Returns:
      (the index record of every job, in `jobs` order; how many shards were written).
    """
    done = {job.name: finished_shard(output_dir, job) for job in jobs}
    pending = [job for job in jobs if done[job.name] is None]
    for record in run_jobs(pending, output_dir, options, num_workers):
        done[record["shard"]] = record
    return [done[job.name] for job in jobs], len(pending)


def _remove_stale(output_dir: str, jobs: Sequence[ShardJob]) -> list[str]:
    """Deletes shards of the prepared splits that this run did not plan, and leftover temp files."""
    current = {j.name for j in jobs}
    removed = []
    for split in {j.split for j in jobs}:
        for path in filesystem.glob(filesystem.join(output_dir, glob.escape(split) + ".tfrecord-*")):
            name = filesystem.path(path).name
            if name not in current:
                removed.append(name)
                filesystem.remove_tree(path)
                filesystem.remove_tree(index_path(output_dir, name))
    for folder in (output_dir, filesystem.join(output_dir, INDEX_DIR)):
        for path in filesystem.glob(filesystem.join(folder, ".tmp-*")):
            filesystem.remove_tree(path)
    return removed


def prepare(
    listing: sources.Listing,
    output_dir: str,
    options: PrepareOptions = PrepareOptions(),
    num_shards: int | None = None,
    num_workers: int = 1,
    stats: bool = False,
    meta: dict | None = None,
    execute: Executor | None = None,
) -> dict:
    """Writes the shards of `listing` (resuming finished ones), report.json and maybe stats.json.

    Splits that an earlier run wrote into the same folder and this run does not prepare keep their
    report.json entries, and their shards count towards stats.json (train's, or every split's when
    there is no train split), as long as the features are the same.

    `execute` writes the planned shards and returns their records (`run_local`, the default, or
    `prepare_beam.BeamExecutor`); everything before (the plan) and after (report, stats) is the same.

    Returns:
      The report (also written to `output_dir/report.json`); its `run` entry says how many shards
      were written, how many were already complete and which earlier splits were kept.
    """
    filesystem.makedirs(filesystem.join(output_dir, INDEX_DIR))
    jobs = plan_shards(listing, options, num_shards)
    records, written = (execute or run_local)(jobs, output_dir, options, num_workers)
    removed = _remove_stale(output_dir, jobs)
    report = build_report(records, listing.skips, {**options.to_dict(), **(meta or {})})
    prepared = set(report["splits"]) | {j.split for j in jobs}
    kept, kept_records = earlier_splits(output_dir, options.spec.to_dict(), prepared)
    report["splits"] = dict(sorted({**report["splits"], **kept}.items()))
    report["totals"] = totals(report)
    report["run"] = {
        "shards_written": written,
        "shards_resumed": len(jobs) - written,
        "stale_removed": removed,
        "splits_kept": sorted(kept),
    }
    if stats:
        every = records + kept_records
        chosen = [r for r in every if r["split"] == "train"] or every
        acc = features.StatsAccumulator(options.spec)
        for record in chosen:
            acc.merge(features.StatsAccumulator.from_dict(record["stats"], options.spec))
        if acc.count:
            acc.finalize().to_json(filesystem.join(output_dir, "stats.json"))
            report["stats"] = {
                "file": "stats.json",
                "splits": sorted({r["split"] for r in chosen}),
                "frames": acc.count,
            }
    filesystem.write_text(filesystem.join(output_dir, "report.json"), json.dumps(report, indent=1))
    return report


def read_listing(args) -> sources.Listing:
    """Runs the reader of `--format` on `--input`."""
    if args.format == "librispeech":
        return sources.read_librispeech(args.input, args.split)
    if args.format == "manifest":
        return sources.read_manifest(args.input, args.split)
    if args.format == "embedded":
        return sources.read_embedded(args.input, args.split)
    if args.format == "tfds":
        return tfds_source.read_tfds(tfds_source.options_from_flags(args))
    return sources.read_librilight(
        args.input, args.transcripts, args.split, args.segmentation, args.max_segment_seconds
    )


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="spectron_jax.data.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--input", required=True, help="corpus folder or manifest file")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_shards", type=int, default=None, help="shards per split (default: ceil(utterances / 256))")
    p.add_argument("--num_workers", type=int, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--splits", default=None, help="comma-separated splits to prepare (default: all)")
    p.add_argument(
        "--split", default=None, help="split of every utterance (librispeech/librilight) or default split (manifest)"
    )
    p.add_argument("--stats", action="store_true", help="also write stats.json (per-bin mean/std)")
    p.add_argument("--min_seconds", type=float, default=0.0, help="skip shorter utterances")
    p.add_argument("--frame_dtype", default="float16", choices=FRAME_DTYPES, help="storage of the frames")
    p.add_argument(
        "--max_utterance_seconds",
        type=float,
        default=splitting.SplitConfig.max_seconds,
        help="split longer utterances at pauses (0: keep them whole); see spectron_jax.data.splitting",
    )
    p.add_argument("--min_pause_seconds", type=float, default=splitting.SplitConfig.min_pause_seconds)
    p.add_argument("--pause_db", type=float, default=splitting.SplitConfig.pause_db)
    p.add_argument("--prompt_features", default="log_mel", choices=prompt_features.KINDS,
                   help="encoder input stored besides log-mel: w2v_bert_fbank adds the w2v-BERT fbank of the prompt")
    p.add_argument("--prompt_feature_seconds", type=float, default=3.0,
                   help="seconds of audio whose prompt features are stored (the prompt window)")
    p.add_argument("--transcripts", default=None, help="librilight: transcript TSV (see sources.read_librilight)")
    p.add_argument("--segmentation", default="vad", choices=("vad", "fixed"), help="librilight: how files are cut")
    p.add_argument("--max_segment_seconds", type=float, default=13.0, help="librilight: longest merged segment")
    p.add_argument("--write_segments", default=None, help="librilight: write the planned segments TSV and stop")
    p.add_argument("--runner", default="local", choices=RUNNERS,
                   help="local: a process pool on this machine; beam: an Apache Beam pipeline "
                   "(spectron_jax.data.prepare_beam)")
    p.add_argument("--beam_pipeline_options", default=None,
                   help='--runner=beam: Beam pipeline options as one string, e.g. "--runner=DataflowRunner '
                   '--project=P ..." (default: DirectRunner with --num_workers workers)')
    p.add_argument("--dry_run", action="store_true",
                   help="print the runner, its options and the shard plan, write nothing (no network for Beam)")
    tfds_source.add_flags(p)
    return p


def _check_args(args) -> None:
    for flag in ("num_shards", "num_workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise cli.UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not args.min_seconds >= 0:
        raise cli.UsageError(f"--min_seconds must be >= 0, got {args.min_seconds}")
    if not args.max_utterance_seconds >= 0:
        raise cli.UsageError(f"--max_utterance_seconds must be >= 0, got {args.max_utterance_seconds}")
    if not args.min_pause_seconds > 0 or not args.pause_db > 0:
        raise cli.UsageError(
            f"--min_pause_seconds and --pause_db must be > 0, got {args.min_pause_seconds} and {args.pause_db}"
        )
    if not args.prompt_feature_seconds > 0:
        raise cli.UsageError(f"--prompt_feature_seconds must be > 0, got {args.prompt_feature_seconds}")
    if not args.max_segment_seconds > 0:
        raise cli.UsageError(f"--max_segment_seconds must be > 0, got {args.max_segment_seconds}")
    if args.split is not None and not sources.is_valid_split(args.split):
        raise cli.UsageError(f"--split must be letters, digits or '_', got '{args.split}'")
    if args.format == "librilight" and not args.transcripts and not args.write_segments:
        raise cli.UsageError("--format=librilight needs --transcripts=TSV (or --write_segments=TSV to list segments)")
    if args.format != "tfds" and not filesystem.exists(args.input):  # tfds: --input is a dataset name
        raise cli.InputError(f"--input {args.input}: no such file or folder")
    if args.transcripts and not filesystem.is_file(args.transcripts):
        raise cli.InputError(f"--transcripts {args.transcripts}: no such file")
    if args.beam_pipeline_options and args.runner != "beam":
        raise cli.UsageError("--beam_pipeline_options needs --runner=beam")


def _prompt_option(args) -> prompt_features.PromptFeatures | None:
    if args.prompt_features == "log_mel":
        return None
    return prompt_features.PromptFeatures(args.prompt_features, args.prompt_feature_seconds)


def _write_segments(args) -> int:
    planned, skips = sources.plan_librilight_segments(args.input, args.segmentation, args.max_segment_seconds)
    with open(args.write_segments, "w", encoding="utf-8") as f:
        f.write("id\tfile\tstart\tend\n")
        for seg_id, rel, start, end in planned:
            f.write(f"{seg_id}\t{rel}\t{start:.3f}\t{end:.3f}\n")
    print(f"wrote {len(planned)} segments to {args.write_segments} ({len(skips)} files without usable voice activity)")
    return 0


def _beam_executor(args, workers: int, listing: sources.Listing):
    try:
        from spectron_jax.data import prepare_beam

        beam_args = prepare_beam.pipeline_args(args.beam_pipeline_options, workers)
        prepare_beam.describe_options(beam_args)  # Beam's parsing: a bad value is a usage error
    except ImportError as e:
        raise cli.UsageError(f"--runner=beam needs Apache Beam: pip install -e '.[beam]' ({e})") from e
    except (ValueError, SystemExit) as e:  # shlex's unbalanced quotes; argparse inside Beam exits
        raise cli.UsageError(f"--beam_pipeline_options {args.beam_pipeline_options!r}: cannot be parsed ({e})") from e
    problem = prepare_beam.check_remote_runner(beam_args, args.input, args.output_dir)
    if problem:
        raise cli.UsageError(problem)
    import logging

    logging.getLogger("apache_beam").setLevel(logging.ERROR)  # Beam's INFO and its workers' notices
    return prepare_beam.BeamExecutor(beam_args, listing.skips)


def _print_plan(args, listing: sources.Listing, options: PrepareOptions, workers: int, execute) -> None:
    """`--dry_run`: the runner and its options, then the shard plan, as JSON on stdout."""
    jobs = plan_shards(listing, options, args.num_shards)
    if execute is None:
        runner = {"runner": "local", "num_workers": workers}
    else:
        from spectron_jax.data import prepare_beam

        runner = {"runner": "beam", "pipeline_options": prepare_beam.describe_options(execute.args)}
    splits: dict[str, dict] = {}
    for job in jobs:
        entry = splits.setdefault(job.split, {"num_shards": job.num_shards, "files": 0, "utterances": 0, "shards": []})
        entry["files"] += len(job.files)
        entry["utterances"] += job.num_segments
        entry["shards"].append({"file": job.name, "files": len(job.files), "utterances": job.num_segments})
    reasons = summarise_skips([skip_dict(s) for s in listing.skips])["by_reason"]
    plan = {**runner, "output_dir": args.output_dir, "options": options.to_dict(), "splits": splits,
            "skipped_while_listing": reasons}
    print(json.dumps(plan, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = _parser().parse_args(argv)
    _check_args(args)
    try:
        if args.write_segments:
            return _write_segments(args)
        listing = read_listing(args)
    except sources.SourceError as e:
        raise cli.InputError(str(e)) from e
    if args.splits:
        wanted = {s.strip() for s in args.splits.split(",") if s.strip()}
        listing.sources = [s for s in listing.sources if s.split in wanted]
        listing.skips = [s for s in listing.skips if s.split in wanted or s.split is None]
    if not listing.sources:
        reasons = summarise_skips([skip_dict(s) for s in listing.skips])["by_reason"]
        detail = ", ".join(f"{k}: {v}" for k, v in reasons.items()) or "no utterances"
        where = f" in splits {args.splits}" if args.splits else ""
        raise cli.InputError(f"{args.input}: nothing usable{where} ({detail})")
    if filesystem.exists(args.output_dir) and not filesystem.is_dir(args.output_dir):
        raise cli.InputError(f"--output_dir {args.output_dir}: exists and is not a folder")
    workers = (
        args.num_workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    )
    meta = {"format": args.format, "input": args.input}
    options = PrepareOptions(
        min_seconds=args.min_seconds,
        frame_dtype=args.frame_dtype,
        split=splitting.SplitConfig(args.max_utterance_seconds or None, args.min_pause_seconds, args.pause_db),
        prompt=_prompt_option(args),
    )
    execute = None
    if args.runner == "beam":
        execute = _beam_executor(args, workers, listing)
    if args.dry_run:
        _print_plan(args, listing, options, workers, execute)
        return 0
    try:
        report = prepare(listing, args.output_dir, options, args.num_shards, workers, args.stats, meta, execute)
    except OSError as e:
        raise cli.InputError(f"--output_dir {args.output_dir}: cannot write ({e})") from e
    totals = report["totals"]
    print(
        f"prepared {totals['utterances']} utterances ({totals['hours']:.3f} h) in {len(report['splits'])} split(s), "
        f"skipped {totals['skipped']}; shards written {report['run']['shards_written']}, "
        f"resumed {report['run']['shards_resumed']}; report: {filesystem.join(args.output_dir, 'report.json')}"
    )
    if execute is not None:
        print("beam metrics: " + ", ".join(f"{k}={v}" for k, v in sorted(execute.metrics.items())))
    if totals["utterances"] == 0:
        raise cli.InputError(
            f"{args.input}: no utterance could be prepared; see {filesystem.join(args.output_dir, 'report.json')}"
        )
    return 0


if __name__ == "__main__":
    cli.run(main)
