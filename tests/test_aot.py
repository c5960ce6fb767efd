"""`aot`: topology names, TPU compilation of the real train step on a CPU host, out-of-memory reports, CLI errors.

The compile tests need libtpu (`pip install -e ".[tpu]"`) and are skipped without it. The model is the tiny
config cut to one layer per stack and short sequences, so each TPU compile takes seconds.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectron_jax import aot, cli

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install -e ".[tpu]"); '
                                                         "TPU AOT compilation needs it")

TINY = ["gin/models/tiny.gin"]
SMALL_SHAPES = [
    "ConformerConfig.num_layers = 1",
    "DecoderConfig.num_layers = 1",
    "SpectronFeatureConverter.prompt_len = 32",
    "SpectronFeatureConverter.text_len = 16",
    "SpectronFeatureConverter.cont_len = 32",
]


# ---- topology names (no libtpu needed) -------------------------------------------------------------
@pytest.mark.parametrize("name, topology, chips, chip_config, wrap, hbm_gib", [
    ("v5e-4", "v5e:2x2", 4, "default", (False, False, False), 16),
    ("v5e-16", "v5e:4x4", 16, "default", (False, False, False), 16),
    ("v5e-64", "v5e:8x8", 64, "default", (False, False, False), 16),
    ("v5e-256", "v5e:16x16", 256, "default", (True, True, False), 16),
    ("v6e-8", "v6e:2x4", 8, "default", (False, False, False), 32),
    ("v4-64", "v4:2x4x4", 32, "megacore", (False, False, False), 32),  # v4 names count TensorCores
    ("v5p-128", "v5:4x4x4", 64, "megacore", (True, True, True), 95),
    ("v5e:2x2", "v5e:2x2", 4, "default", (False, False, False), 16),
])
def test_topology_names_follow_cloud_tpu_naming(name, topology, chips, chip_config, wrap, hbm_gib):
    spec = aot.topology_spec(name)
    assert (spec.topology, spec.chips, spec.chip_config, spec.wrap) == (topology, chips, chip_config, wrap)
    assert spec.hbm_bytes == hbm_gib * 2**30
    assert math.prod(int(d) for d in spec.topology.split(":")[1].split("x")) == spec.chips


@pytest.mark.parametrize("bad", ["v9-8", "v5e-12", "v4-7", "v5e:2x2x2", "tpu"])
def test_unknown_topologies_are_rejected(bad):
    with pytest.raises(ValueError, match="topology"):
        aot.topology_spec(bad)


def test_oom_message_sizes_are_parsed():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(40.00G) exceeds available HBM (15.75G).")
    assert aot.parse_oom(message) == (40 * 2**30, int(15.75 * 2**30))
    assert aot.parse_oom("RESOURCE_EXHAUSTED: something else") == (None, None)


# ---- CLI errors (no libtpu needed) ----------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["--topology=v5e-16"], "--gin_file"),
    (["--gin_file=gin/models/tiny.gin", "--topology=v9-3"], "--topology"),
    (["--gin_file=gin/models/tiny.gin", "--topology=v5e-16,v5e-64"], "--table"),
    (["--gin_file=gin/models/tiny.gin", "--topology=v5e-16", "--num_slices=0"], "--num_slices"),
    (["--gin_file=gin/models/tiny.gin", "--topology=v5e-16", "--batch_size=-4"], "--batch_size"),
    (["--gin_file=gin/models/tiny.gin", "--topology=v5e-16", "--compute_dtype=int8"], "--compute_dtype"),
    (["--gin_file=gin/models/tiny.gin"], "--topology"),
])
def test_bad_flags_raise_usage_errors_naming_the_flag(argv, flag):
    with pytest.raises(cli.UsageError, match=flag):
        aot.main(argv)


def test_missing_libtpu_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    with pytest.raises(cli.InputError, match=r'pip install -e "\.\[tpu\]"'):
        aot.main(["--gin_file=gin/models/tiny.gin", "--topology=v5e-4"])


def test_cli_bad_topology_exits_2_with_one_line(repo_root):
    proc = subprocess.run([sys.executable, "-m", "spectron_jax.aot", "--gin_file=gin/models/tiny.gin",
                           "--topology=v5e-3"], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--topology" in lines[0] and "Traceback" not in proc.stderr


def test_table_formats_one_row_per_report():
    base = {"gin_files": ["gin/models/a.gin"], "topology": "v5e-16", "num_devices": 16,
            "mesh": {"data": 1, "fsdp": 16, "model": 1}, "batch_size": 64, "hbm_bytes": 16 * 2**30}
    fits = dict(base, fits=True, total_bytes=3 * 2**30, argument_bytes=1, flops_total=2.5e15, remat="full",
                analytic_flops_total=1.6e14, compile_seconds=61.4, host_peak_rss_bytes=3.5 * 2**30)
    oom = dict(base, topology="v5e-4", fits=False, total_bytes=40 * 2**30, error="RESOURCE_EXHAUSTED")
    failed = {"gin_files": ["b.gin"], "topology": "v4-64", "fits": None, "error": "exit 1: error: boom"}
    table = aot.format_table([fits, oom, failed]).splitlines()
    assert len(table) == 5 and all(line.count("|") == table[0].count("|") for line in table)
    assert ("| a.gin | v5e-16 | 16 | 1 x 16 x 1 | 64 | full | 3.00 | 16 | yes | 2500.0 | 160.0 | 39.06 | 2.50 | 61 "
            "| 3.5 |") == table[2]
    assert "40.00 (OOM)" in table[3] and "| no |" in table[3]
    assert "error: exit 1: error: boom" in table[4]


# ---- TPU compilation (libtpu) ------------------------------------------------------------------------
def _shard_bytes(abstract) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (computed from the shardings)."""
    total = 0
    for x in jax.tree.leaves(abstract):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


@needs_libtpu
def test_v5e_4_compile_reports_memory_and_flops_matching_the_cpu_cost_model():
    from spectron_jax import partitioning

    spec = aot.topology_spec("v5e-4")
    configs = aot.configs_from_gin(TINY, SMALL_SHAPES, batch_size=8, compute_dtype="bfloat16")
    program = aot.program_for_devices(configs, aot.topology_devices(spec))
    assert program.mesh.devices.size == 4 and program.mesh.devices.flat[0].platform == "tpu"
    report = aot.aot_report(program, spec, 1, TINY, 8)

    # memory: every input is an argument; the donated state comes back aliased
    state_bytes, batch_bytes = _shard_bytes(program.abstract_state), _shard_bytes(program.abstract_batch)
    assert report["fits"] is True and report["device_kind"] == "TPU v5 lite"
    assert report["argument_bytes"] >= state_bytes + batch_bytes
    assert state_bytes * 0.5 <= report["alias_bytes"] <= report["argument_bytes"]
    assert report["temp_bytes"] > 0 and report["output_bytes"] >= report["alias_bytes"]
    assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                                     + report["temp_bytes"] + report["code_bytes"])

    # FLOPs: per device x devices ~ XLA's CPU cost model of the whole (unpartitioned) step
    cpu_program = aot.program_for_devices(configs, jax.devices("cpu")[:1])
    with partitioning.sharding_context(cpu_program.mesh, cpu_program.rules):
        lowered = cpu_program.step.lower(cpu_program.abstract_state, cpu_program.abstract_batch)
    cpu_flops = float(lowered.cost_analysis()["flops"])
    assert report["flops_total"] == pytest.approx(report["flops_per_device"] * 4)
    assert 0.5 < report["flops_total"] / cpu_flops < 2.0
    assert "fits" in aot.format_report(report)

    # The evaluation step the run compiles at start-up: the whole train state and a batch stay
    # resident beside its own temporaries.
    assert report["eval_fits"] is True
    assert report["eval_total_bytes"] >= state_bytes + batch_bytes and report["eval_temp_bytes"] > 0
    assert "evaluation step" in aot.format_report(report)


@needs_libtpu
def test_oversized_model_is_reported_as_not_fitting_with_exit_0(repo_root, tmp_path):
    # A 40M-entry vocabulary: 5.1B embedding parameters, 20 GiB in float32 alone, on 16 GiB chips.
    # (A gigantic batch fails as well, but only after minutes of compilation.)
    bindings = [f"--gin.{b.replace(' = ', '=')}" for b in SMALL_SHAPES] + ["--gin.DecoderConfig.vocab_size=40000000"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    output = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "spectron_jax.aot", *[f"--gin_file={f}" for f in TINY],
                           "--topology=v5e-4", "--batch_size=8", f"--json_output={output}", *bindings],
                          cwd=repo_root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["fits"] is False
    assert report["total_bytes"] > report["hbm_bytes"] >= report["oom_available_bytes"] > 0
    assert "RESOURCE_EXHAUSTED" in report["error"]
    assert "does not fit" in aot.format_report(report)
    # The analytic count needs no compile: it is there (and dominated by the huge logits) even when XLA fails.
    assert report["remat"] == "none" and report["host_peak_rss_bytes"] > 2**27 and report["compile_seconds"] > 0
    logits = 2 * 8 * 16 * 128 * 40_000_000 * 3  # batch x text slots x the decoder width x vocabulary, x3
    assert report["analytic_flops_breakdown"]["logits"] == logits


@needs_libtpu
@pytest.mark.slow  # a child process importing TensorFlow: ~12 s of CPU, over 30 s on a loaded host
def test_a_table_row_in_its_own_process_reports_the_childs_error(tmp_path, repo_root, monkeypatch):
    # The child fails at gin time (an unknown binding), before any compile: its one-line error becomes the row.
    import argparse

    monkeypatch.chdir(repo_root)
    args = argparse.Namespace(num_slices=1, compute_dtype="bfloat16", gin_search_paths="",
                              gin_bindings=["DecoderConfig.no_such_knob = 3"])
    report = aot._row_in_subprocess(TINY, args, aot.topology_spec("v5e-4"), 8, str(tmp_path))
    assert report["topology"] == "v5e-4" and report["fits"] is None
    assert "exit 2" in report["error"] and "no_such_knob" in report["error"]


def test_serialized_executable_round_trips_through_gcs(gcs_emulator, monkeypatch):
    """`--serialize=gs://...` goes through the file-system layer: written to a GCS server, loaded back, run."""
    for key, value in gcs_emulator.items():
        if key != "bucket":
            monkeypatch.setenv(key, value)
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                                          jax.sharding.PartitionSpec("data"))
    x = jax.device_put(x, sharding)
    compiled = jax.jit(lambda a: jnp.tanh(a) @ a.T).lower(x).compile()
    url = f"gs://{gcs_emulator['bucket']}/aot/step.pkl"
    aot.write_executable(compiled, url)
    from spectron_jax import filesystem
    assert filesystem.size(url) > 0 and not os.path.exists(url)
    loaded = aot.read_executable(url)
    host = np.asarray(x)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.tanh(host) @ host.T, rtol=1e-6)
