"""`prepare --runner=beam`: the same bytes as `--runner=local` (shards, index records, report.json,
stats.json), resume, a retried shard, Beam metrics against report.json, the dry run, option checks."""

import json
import os
import pathlib

import numpy as np
import pytest
import soundfile

from spectron_jax import cli
from spectron_jax.data import prepare, shard_jobs, sources, synthetic_librilight

if os.environ.get("CI"):
    import apache_beam  # noqa: F401  (CI installs the `beam` extra: a missing Beam fails, never skips)
else:
    pytest.importorskip("apache_beam")

from spectron_jax.data import prepare_beam  # noqa: E402


def tree(folder) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    root = pathlib.Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(got, want):
    got, want = tree(got), tree(want)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []


def report(folder) -> dict:
    return json.loads((pathlib.Path(folder) / "report.json").read_text())


def build_librilight(root: pathlib.Path) -> pathlib.Path:
    """A small Libri-Light layout: 4 synthetic files of two speakers, a transcript TSV by segment id,
    and bad input: a corrupt .flac, a file without VAD json, a planned segment without transcript, a
    transcript naming no segment, an empty transcript. Returns the transcript TSV."""
    rng = np.random.default_rng(3)
    audio = root / "audio"
    for k, (speaker, book) in enumerate([(11, 1), (11, 1), (12, 5), (12, 6)]):
        folder = audio / str(speaker) / str(book)
        folder.mkdir(parents=True, exist_ok=True)
        wave, intervals = synthetic_librilight.synthesise_file(rng, 7.0 + 3.0 * k)
        soundfile.write(folder / f"part_{k}.flac", wave, 16000)
        (folder / f"part_{k}.json").write_text(json.dumps({"voice_activity": intervals}))
    (audio / "12" / "5" / "broken.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    (audio / "12" / "5" / "broken.json").write_text(json.dumps({"voice_activity": [[0.0, 2.0]]}))
    soundfile.write(audio / "12" / "6" / "no_vad.flac", synthetic_librilight.synthesise_file(rng, 3.0)[0], 16000)
    planned, _ = sources.plan_librilight_segments(str(audio), "vad", 6.0)
    lines = ["id\ttranscript"]
    for n, (seg_id, _, _, _) in enumerate(planned):
        if n == 1:
            continue  # no_transcript
        lines.append(f"{seg_id}\t{'' if n == 2 else f'words of segment {n}'}")  # n == 2: empty_transcript
    lines.append("11-1-part_0-00000000-00000100\tnames no segment")  # unknown_segment
    transcripts = root / "transcripts.tsv"
    transcripts.write_text("\n".join(lines) + "\n")
    return transcripts


@pytest.fixture(scope="module")
def librilight(tmp_path_factory):
    """The layout, and its shards written by --runner=local (the reference)."""
    root = tmp_path_factory.mktemp("ll")
    transcripts = build_librilight(root)
    args = [
        "--format=librilight",
        f"--input={root / 'audio'}",
        f"--transcripts={transcripts}",
        "--max_segment_seconds=6",
        "--num_shards=3",
        "--stats",
    ]
    local = root / "local"
    assert prepare.main([*args, f"--output_dir={local}", "--num_workers=1"]) == 0
    return root, args, local


def test_plan_lines_round_trip(librilight):
    root, args, _ = librilight
    listing = sources.read_librilight(str(root / "audio"), str(root / "transcripts.tsv"), max_seconds=6.0)
    jobs = shard_jobs.plan_shards(listing, shard_jobs.PrepareOptions(), 3)
    assert len(jobs) == 3 and sum(j.num_segments for j in jobs) > 3
    for job in jobs:
        line = prepare_beam.job_to_json(job)
        assert "\n" not in line and prepare_beam.job_from_json(line) == job
    words = sources.Segment("a", "two words", "s", 0.5, 1.25, (0.0, 0.4))
    job = shard_jobs.ShardJob("train", 0, 1, (sources.SourceFile("x.flac", "x", "train", (words,)),), "f")
    assert prepare_beam.job_from_json(prepare_beam.job_to_json(job)) == job


def beam_metrics(stdout: str) -> dict:
    """The `beam metrics: k=v, ...` line that `prepare --runner=beam` prints."""
    (line,) = [x for x in stdout.splitlines() if x.startswith("beam metrics: ")]
    return {k: int(v) for k, v in (kv.split("=") for kv in line[len("beam metrics: "):].split(", "))}


@pytest.mark.slow
def test_librilight_same_bytes_metrics_and_resume(librilight, tmp_path, capsys):
    _, args, local = librilight
    out = tmp_path / "beam"
    beam = [*args, f"--output_dir={out}", "--num_workers=2", "--runner=beam"]  # DirectRunner, 2 workers
    assert prepare.main(beam) == 0
    assert_same_tree(out, local)
    want = report(local)["splits"]["train"]
    assert {"unreadable", "no_voice_activity", "no_transcript", "unknown_segment", "empty_transcript"} <= set(
        want["skipped"]["by_reason"])
    first = beam_metrics(capsys.readouterr().out)
    assert first["shards_written"] == 3 and first["examples"] == want["utterances"]
    # a re-run resumes every shard and rewrites nothing; Beam's counters add up to report.json's
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord-*")}
    assert prepare.main(beam) == 0
    again = beam_metrics(capsys.readouterr().out)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord-*")} == mtimes
    assert report(out)["run"] == {**report(local)["run"], "shards_written": 0, "shards_resumed": 3}
    assert {k: v for k, v in report(out).items() if k != "run"} == {k: v for k, v in report(local).items() if k != "run"}
    for metrics in (first, again):
        skipped = {k[len("skipped_"):]: v for k, v in metrics.items() if k.startswith("skipped_")}
        assert skipped == want["skipped"]["by_reason"]
    assert again["shards_resumed"] == 3 and "shards_written" not in again


def test_retried_shard_is_complete_and_identical(librilight, tmp_path, monkeypatch):
    """Beam's BundleBasedDirectRunner retries a failed bundle: the shard whose first attempt fails after
    writing part of it ends up complete, once, with the same bytes, and the report counts it written."""
    _, args, local = librilight
    marker = tmp_path / "failed-once"
    victim = "train.tfrecord-00001-of-00003"
    monkeypatch.setenv(prepare_beam.FAIL_ONCE_ENV, f"{victim}={marker}")
    out = tmp_path / "beam"
    options = '--runner=BundleBasedDirectRunner'
    assert prepare.main([*args, f"--output_dir={out}", "--runner=beam", f"--beam_pipeline_options={options}"]) == 0
    assert marker.exists()  # the first attempt did fail
    assert_same_tree(out, local)
    assert report(out)["run"]["shards_written"] == 3


@pytest.mark.parametrize("kind", ["librispeech", "manifest", "tfds"])
def test_every_format_same_bytes(kind, tmp_path, embedded_dir):
    """Each source format: Beam (its BundleBasedDirectRunner, in this process) writes the local bytes."""
    from test_prepare import build_librispeech, write_manifest_inputs

    if kind == "librispeech":  # with bad files of every kind the workers find
        build_librispeech(tmp_path / "in")
        args = ["--format=librispeech", f"--input={tmp_path / 'in'}", "--num_shards=2"]
    elif kind == "manifest":
        (tmp_path / "in").mkdir()
        rows = write_manifest_inputs(tmp_path / "in")
        columns = ["id", "path", "transcript", "speaker", "split", "start", "end"]
        body = ["\t".join(columns)] + ["\t".join(r.get(c, "") for c in columns) for r in rows]
        (tmp_path / "in" / "m.tsv").write_text("\n".join(body + ["bad\trow"]) + "\n")
        args = ["--format=manifest", f"--input={tmp_path / 'in' / 'm.tsv'}"]
    else:
        from test_tfds_source import make_tree

        from spectron_jax.data import local_librispeech

        make_tree(tmp_path / "LibriSpeech", embedded_dir)
        local_librispeech.build(str(tmp_path / "LibriSpeech"), str(tmp_path / "tfds_data"))
        args = ["--format=tfds", "--input=local_librispeech", f"--tfds_data_dir={tmp_path / 'tfds_data'}"]
    args += ["--stats", "--num_workers=1"]
    assert prepare.main([*args, f"--output_dir={tmp_path / 'local'}"]) == 0
    assert prepare.main([*args, f"--output_dir={tmp_path / 'beam'}", "--runner=beam",
                         "--beam_pipeline_options=--runner=BundleBasedDirectRunner"]) == 0
    assert_same_tree(tmp_path / "beam", tmp_path / "local")
    assert report(tmp_path / "local")["totals"]["utterances"] >= 3
    if kind != "tfds":
        assert report(tmp_path / "local")["totals"]["skipped"] >= 1


@pytest.mark.slow
def test_embedded_corpus_same_bytes(embedded_dir, tmp_path):
    if not (embedded_dir / "manifest.tsv").exists():
        pytest.skip("embedded corpus not built")
    args = ["--format=embedded", f"--input={embedded_dir}", "--splits=validation,test", "--num_shards=2", "--stats",
            "--num_workers=2"]
    assert prepare.main([*args, f"--output_dir={tmp_path / 'local'}"]) == 0
    assert prepare.main([*args, f"--output_dir={tmp_path / 'beam'}", "--runner=beam"]) == 0
    assert_same_tree(tmp_path / "beam", tmp_path / "local")
    assert sorted(p.name for p in (tmp_path / "beam").glob("*.tfrecord-*")) == [
        "test.tfrecord-00000-of-00002", "test.tfrecord-00001-of-00002",
        "validation.tfrecord-00000-of-00002", "validation.tfrecord-00001-of-00002"]


def test_synthetic_librilight_corpus_lists_whole(tmp_path):
    made = synthetic_librilight.write_corpus(str(tmp_path / "c"), hours=40 / 3600, file_seconds=20)
    assert made["files"] == 2 and made["audio_seconds"] == pytest.approx(40.0)
    listing = sources.read_librilight(str(tmp_path / "c" / "audio"), made["transcripts"])
    assert listing.skips == [] and sum(len(s.segments) for s in listing.sources) == made["segments"] >= 4
    for source in listing.sources:
        intervals = json.loads(pathlib.Path(source.path).with_suffix(".json").read_text())["voice_activity"]
        assert all(0 < a < b <= 20 for a, b in intervals)
        assert all(s.end - s.start <= 13 for s in source.segments)


def test_dry_run_prints_options_and_plan_and_writes_nothing(librilight, tmp_path, capsys):
    _, args, local = librilight
    out = tmp_path / "never"
    options = "--runner=DirectRunner --direct_num_workers=3 --job_name=ll"
    assert prepare.main([*args, f"--output_dir={out}", "--runner=beam", "--dry_run",
                         f"--beam_pipeline_options={options}"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["runner"] == "beam" and not out.exists()
    assert plan["pipeline_options"]["direct_num_workers"] == 3 and plan["pipeline_options"]["job_name"] == "ll"
    want = report(local)["splits"]["train"]
    shards = plan["splits"]["train"]["shards"]
    assert [s["file"] for s in shards] == [s["file"] for s in want["shards"]]
    assert plan["skipped_while_listing"]["no_transcript"] == want["skipped"]["by_reason"]["no_transcript"]


def test_pipeline_args_defaults():
    assert prepare_beam.pipeline_args(None, 2) == [
        "--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    assert prepare_beam.pipeline_args("--direct_num_workers=4", 2) == ["--runner=DirectRunner", "--direct_num_workers=4"]
    flink = prepare_beam.pipeline_args("--runner FlinkRunner --flink_master=h:8081", 2)
    assert flink == ["--runner", "FlinkRunner", "--flink_master=h:8081"]


def test_remote_runner_and_option_errors_are_one_line(librilight, tmp_path):
    _, args, _ = librilight
    dataflow = "--runner=DataflowRunner --project=p --region=r --temp_location=gs://b/tmp --setup_file=./setup.py"
    cases = [
        (["--runner=beam", f"--beam_pipeline_options={dataflow}"], "must be on an object store"),
        (["--beam_pipeline_options=--direct_num_workers=2"], "needs --runner=beam"),
        (["--runner=beam", "--beam_pipeline_options=--runner='DirectRunner"], "cannot be parsed"),
    ]
    for extra, message in cases:
        with pytest.raises(cli.CLIError, match=message):
            prepare.main([*args, f"--output_dir={tmp_path / 'x'}", *extra])
    gs_in = "gs://b/audio"
    assert prepare_beam.check_remote_runner(prepare_beam.pipeline_args(dataflow, 1), gs_in, "gs://b/out") is None
    no_setup = "--runner=DataflowRunner --project=p --region=r --temp_location=gs://b/tmp"
    assert "--setup_file" in prepare_beam.check_remote_runner(prepare_beam.pipeline_args(no_setup, 1), gs_in, "gs://b/o")
    no_project = "--runner=DataflowRunner --region=r --temp_location=gs://b/tmp --setup_file=./setup.py"
    assert "--project" in prepare_beam.check_remote_runner(prepare_beam.pipeline_args(no_project, 1), gs_in, "gs://b/o")


def test_gcs_input_and_output_same_bytes(librilight, gcs_emulator, monkeypatch, tmp_path):
    """Shards written to an object store by the pipeline's workers (uploaded whole) are the local bytes,
    and so are those of the layout listed from the object store."""
    from spectron_jax import filesystem

    for key, value in gcs_emulator.items():
        if key != "bucket":
            monkeypatch.setenv(key, value)
    root, args, local = librilight
    out = f"gs://{gcs_emulator['bucket']}/beam-out"
    assert prepare.main([*args, f"--output_dir={out}", "--num_workers=1", "--runner=beam"]) == 0
    want = tree(local)
    got = {name: filesystem.read_bytes(filesystem.join(out, name)) for name in want}
    assert [k for k in want if got[k] != want[k]] == []
    assert filesystem.glob(filesystem.join(out, ".tmp-*")) == []
    remote = f"gs://{gcs_emulator['bucket']}/ll"
    for path in sorted((root / "audio").rglob("*")):
        if path.is_file():
            filesystem.copy(str(path), filesystem.join(remote, str(path.relative_to(root / "audio"))))
    from_gcs = [a if not a.startswith("--input=") else f"--input={remote}" for a in args]
    assert prepare.main([*from_gcs, f"--output_dir={tmp_path / 'o'}", "--num_workers=1", "--runner=beam"]) == 0
    shards = {k: v for k, v in tree(tmp_path / "o").items() if k.startswith("train.tfrecord-")}
    assert len(shards) == 3 and shards == {k: v for k, v in want.items() if k.startswith("train.tfrecord-")}
    assert report(tmp_path / "o")["splits"]["train"]["skipped"]["by_reason"] == report(local)["splits"]["train"][
        "skipped"]["by_reason"]
