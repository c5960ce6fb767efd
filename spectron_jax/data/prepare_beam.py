"""`prepare --runner=beam`: the shard jobs of `prepare` as an Apache Beam pipeline.

    python -m spectron_jax.data.prepare ... --runner=beam \\
        [--beam_pipeline_options="--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp ..."]

Nothing about the data is implemented twice: the driver lists the input and plans the shards
(`shard_jobs.plan_shards`), the pipeline runs one element per shard job through
`shard_jobs.finished_shard` (a finished shard is skipped) and `shard_jobs.write_shard` (featurising,
splitting, the shard format, the index record), and the driver then builds report.json and
stats.json from the index records exactly as `--runner=local` does. Shards, report.json and stats.json are the same bytes for either runner.

The pipeline, for N shard jobs:

    Create(plan files) -> read jobs -> Reshuffle -> write shard (or skip a finished one)
    Create(listing skip counts) -> count

The plan (one JSON line per job: split, index, shard count, fingerprint, files and their segments,
and whether an earlier run's index record names the job) goes to `DIR/.tmp-beam-plan-<hash>/<k>.jsonl`,
`JOBS_PER_PLAN_FILE` jobs a file, so that the pipeline's own description stays small for any corpus;
it is deleted with the other temporary files after a successful run.

Retries: a runner may run a bundle again after a failure (Dataflow does, up to 4 times in batch;
Beam's BundleBasedDirectRunner too). A retried shard is rewritten to the same bytes: `write_shard`
writes a temporary name and renames it (on an object store the shard is uploaded whole, and a failed
upload is cancelled, `filesystem.copy`), and writes the index record last, atomically. A shard is never
seen partial or twice.

Beam metrics (namespace `spectron_prepare`, committed values: each element counted once, however
often it was retried): `shards_written`, `shards_resumed`, `examples`, and
`skipped_<reason>` for every skip, those found while listing included, so the counters add up to
report.json's `skipped.by_reason`; `BeamExecutor.metrics` holds them after a run.

Default pipeline options (`pipeline_args`): Beam's DirectRunner (which in Beam 2.77 first tries its
Prism runner, downloaded on first use, and falls back to the in-process FnApiRunner when it cannot be
had) with `--direct_num_workers=<--num_workers>` and `--direct_running_mode=multi_processing`.

TEST ONLY: the environment variable `SPECTRON_PREPARE_FAIL_ONCE=<shard name>=<marker file>` makes the
first attempt of that shard fail after its first source file has been written to the temporary file
(the attempt that finds no marker file creates it, then raises `InjectedFailure`), to test retries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
from typing import Sequence

from spectron_jax import filesystem
from spectron_jax.data import shard_jobs, sources

JOBS_PER_PLAN_FILE = 64
METRICS_NAMESPACE = "spectron_prepare"
FAIL_ONCE_ENV = "SPECTRON_PREPARE_FAIL_ONCE"  # TEST ONLY, see the module docstring
_DIRECT = ("DirectRunner", "SwitchingDirectRunner")


class InjectedFailure(RuntimeError):
    """The failure `SPECTRON_PREPARE_FAIL_ONCE` asks for (TEST ONLY)."""


# ------------------------------------------------------------------------------------------ the plan


def job_to_json(job: shard_jobs.ShardJob) -> str:
    """One shard job as one line of JSON (floats round-trip exactly): `job_from_json` reads it back."""
    files = [
        {"path": f.path, "source": f.source, "split": f.split, "segments": [dataclasses.asdict(s) for s in f.segments]}
        for f in job.files
    ]
    payload = {
        "split": job.split,
        "index": job.index,
        "num_shards": job.num_shards,
        "fingerprint": job.fingerprint,
        "files": files,
    }
    return json.dumps(payload, sort_keys=True)


def job_from_json(line: str) -> shard_jobs.ShardJob:
    """The inverse of `job_to_json`: an equal `ShardJob`."""
    payload = json.loads(line)
    files = []
    for f in payload["files"]:
        segments = []
        for s in f["segments"]:
            if s["word_starts"] is not None:
                s["word_starts"] = tuple(s["word_starts"])
            segments.append(sources.Segment(**s))
        files.append(sources.SourceFile(f["path"], f["source"], f["split"], tuple(segments)))
    return shard_jobs.ShardJob(
        payload["split"], payload["index"], payload["num_shards"], tuple(files), payload["fingerprint"]
    )


def write_plan(jobs: Sequence[shard_jobs.ShardJob], output_dir: str, resumable: set[str]) -> list[str]:
    """Writes the jobs, `JOBS_PER_PLAN_FILE` to a file, under a temporary folder of `output_dir`, one
    line each: `<R|W>\t<job_to_json>` (R: an index record of this job existed before the run, see
    `_resumable`); returns the files' paths."""
    digest = hashlib.sha256("".join(j.fingerprint for j in jobs).encode()).hexdigest()[:16]
    folder = filesystem.join(output_dir, f".tmp-beam-plan-{digest}")
    chunks = [jobs[k : k + JOBS_PER_PLAN_FILE] for k in range(0, len(jobs), JOBS_PER_PLAN_FILE)]
    paths = [filesystem.join(folder, f"{k:05d}.jsonl") for k in range(len(chunks))]

    def write(path_and_chunk):
        path, chunk = path_and_chunk
        lines = "".join(f"{'R' if j.name in resumable else 'W'}\t{job_to_json(j)}\n" for j in chunk)
        filesystem.write_text(path, lines)

    _parallel(write, list(zip(paths, chunks)), filesystem.is_remote(output_dir))
    return paths


def _parallel(fn, items: list, remote: bool) -> list:
    """`[fn(x) for x in items]`, in 32 threads for object-store round trips."""
    if not remote or len(items) < 2:
        return [fn(x) for x in items]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        return list(pool.map(fn, items))


def _index_record(output_dir: str, job: shard_jobs.ShardJob) -> dict | None:
    try:
        return json.loads(filesystem.read_text(shard_jobs.index_path(output_dir, job.name)))
    except (OSError, ValueError):
        return None


def _resumable(output_dir: str, jobs: Sequence[shard_jobs.ShardJob]) -> set[str]:
    """Names of the jobs whose index record (from an earlier run) names the job's fingerprint: only
    these may count as resumed. The pipeline still checks the shard itself (`shard_jobs.finished_shard`),
    and a shard finished by a failed attempt of this run counts as written, as with `--runner=local`."""
    records = _parallel(lambda j: _index_record(output_dir, j), list(jobs), filesystem.is_remote(output_dir))
    return {j.name for j, r in zip(jobs, records) if r and r.get("fingerprint") == j.fingerprint}


def _read_plan_file(path: str):
    for line in filesystem.read_text(path).splitlines():
        if line.strip():
            yield line


# ------------------------------------------------------------------------------------------ options


def pipeline_args(beam_pipeline_options: str | None, num_workers: int) -> list[str]:
    """`--beam_pipeline_options` split like a shell line, plus the DirectRunner defaults (see the module
    docstring) when it names no runner or a DirectRunner and leaves the worker count open."""
    args = shlex.split(beam_pipeline_options or "")
    runner = None
    for k, arg in enumerate(args):
        if arg.startswith("--runner="):
            runner = arg.split("=", 1)[1]
        elif arg == "--runner" and k + 1 < len(args):
            runner = args[k + 1]
    if runner is None:
        args = ["--runner=DirectRunner", *args]
        runner = "DirectRunner"
    if runner in _DIRECT and not any(a.startswith("--direct_num_workers") for a in args):
        args.append(f"--direct_num_workers={max(1, num_workers)}")
        if not any(a.startswith("--direct_running_mode") for a in args):
            args.append(f"--direct_running_mode={'multi_processing' if num_workers > 1 else 'in_memory'}")
    return args


def runner_name(args: Sequence[str]) -> str:
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    return PipelineOptions(list(args)).view_as(StandardOptions).runner or "DirectRunner"


def describe_options(args: Sequence[str]) -> dict:
    """The pipeline options `args` set (Beam's own parsing, defaults left out): what `--dry_run` prints."""
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(list(args)).get_all_options(drop_default=True, retain_unknown_options=True)


def check_remote_runner(args: Sequence[str], input_path: str, output_dir: str) -> str | None:
    """A one-line problem when a runner on other machines (anything but a DirectRunner) is given local
    input or output paths, or Dataflow misses what it needs; None when fine."""
    options = describe_options(args)
    runner = runner_name(args)
    if runner in _DIRECT or runner in ("BundleBasedDirectRunner", "FnApiRunner", "PrismRunner"):
        return None
    paths = (("--output_dir", output_dir), ("--input", input_path))
    local = [flag for flag, p in paths if p and not filesystem.is_remote(p)]
    if local:
        return f"{' and '.join(local)} must be on an object store (gs://...) for --runner={runner}'s workers"
    if runner.endswith("DataflowRunner"):
        missing = [k for k in ("project", "region", "temp_location") if not options.get(k)]
        if missing:
            return "--beam_pipeline_options for DataflowRunner needs " + ", ".join(f"--{k}" for k in missing)
        if not options.get("setup_file") and not options.get("sdk_container_image"):
            return (
                "--beam_pipeline_options for DataflowRunner needs --setup_file=./setup.py (or "
                "--sdk_container_image with spectron_jax installed) so that workers can import spectron_jax"
            )
        if options.get("setup_file") and not os.path.isfile(options["setup_file"]):
            return f"--setup_file {options['setup_file']}: no such file"
    return None


# ------------------------------------------------------------------------------------------ the pipeline


def _fail_once_hook(shard: str):
    """TEST ONLY (`SPECTRON_PREPARE_FAIL_ONCE`): a progress callback that fails `shard`'s first attempt."""
    spec = os.environ.get(FAIL_ONCE_ENV, "")
    name, _, marker = spec.partition("=")
    if not spec or name != shard or not marker:
        return None

    def progress(_: int) -> None:
        try:
            with open(marker, "x"):
                pass
        except FileExistsError:
            return  # a later attempt: go on
        raise InjectedFailure(f"{FAIL_ONCE_ENV}: first attempt of {shard} fails")

    return progress


def _count(name: str, value: int = 1) -> None:
    from apache_beam.metrics import Metrics

    Metrics.counter(METRICS_NAMESPACE, name).inc(value)


def _count_skips(item: tuple[str, int]) -> None:
    reason, count = item
    _count(f"skipped_{reason}", count)


def _make_write_fn(output_dir: str, options: shard_jobs.PrepareOptions):
    import apache_beam as beam

    class WriteShard(beam.DoFn):
        """One shard job (a JSON line): skipped when finished, else written by `shard_jobs.write_shard`."""

        def setup(self):
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

        def process(self, line: str):
            mark, _, payload = line.partition("\t")
            job = job_from_json(payload)
            record = shard_jobs.finished_shard(output_dir, job)  # also after a failed attempt of this run
            wrote = record is None
            if wrote:
                record = shard_jobs.write_shard(job, output_dir, options, _fail_once_hook(job.name))
            _count("shards_written" if mark == "W" or wrote else "shards_resumed")
            _count("examples", record["examples"])
            for skip in record["skipped"]:
                _count(f"skipped_{skip['reason']}")
            yield job.name

    return WriteShard()


def _read_records(output_dir: str, jobs: Sequence[shard_jobs.ShardJob]) -> list[dict]:
    """The index record of every job, in `jobs` order (object-store reads in parallel)."""
    records = _parallel(lambda j: _index_record(output_dir, j), list(jobs), filesystem.is_remote(output_dir))
    for job, record in zip(jobs, records):
        if record is None or record.get("fingerprint") != job.fingerprint:
            raise RuntimeError(f"the pipeline finished without a current index record of shard {job.name}")
    return records


class BeamExecutor:
    """A `prepare.Executor` that runs the shard jobs as a Beam pipeline with `args` (`pipeline_args`).

    Attributes (after a call):
      metrics: {counter name: committed value (attempted where the runner commits none)}.
    """

    def __init__(self, args: Sequence[str], listing_skips: Sequence[sources.Skip] = ()):
        self.args = list(args)
        self.listing_skips = list(listing_skips)
        self.metrics: dict[str, int] = {}

    def __call__(self, jobs, output_dir, options, num_workers) -> tuple[list[dict], int]:
        import apache_beam as beam
        from apache_beam.metrics.metric import MetricsFilter
        from apache_beam.options.pipeline_options import PipelineOptions

        jobs = list(jobs)
        resumable = _resumable(output_dir, jobs)
        plan = write_plan(jobs, output_dir, resumable)
        listing_counts: dict[str, int] = {}
        for skip in self.listing_skips:
            listing_counts[skip.reason] = listing_counts.get(skip.reason, 0) + 1
        pipeline = beam.Pipeline(options=PipelineOptions(self.args))
        _ = (
            pipeline
            | "PlanFiles" >> beam.Create(plan)
            | "ReadJobs" >> beam.FlatMap(_read_plan_file)
            | "Spread" >> beam.Reshuffle()
            | "WriteShards" >> beam.ParDo(_make_write_fn(output_dir, options))
        )
        if listing_counts:
            _ = (
                pipeline
                | "ListingSkips" >> beam.Create(sorted(listing_counts.items()))
                | "CountListingSkips" >> beam.Map(_count_skips)
            )
        result = pipeline.run()
        result.wait_until_finish()
        self.metrics = {}
        for counter in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]:
            value = counter.committed if counter.committed is not None else counter.attempted
            self.metrics[counter.key.metric.name] = self.metrics.get(counter.key.metric.name, 0) + int(value or 0)
        records = _read_records(output_dir, jobs)
        return records, len(jobs) - int(self.metrics.get("shards_resumed", 0))
