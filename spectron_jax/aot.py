"""`aot`: compile the real train step for a Cloud TPU topology on a CPU host (no TPU needed).

    python -m spectron_jax.aot --gin_file=gin/models/spectron_1b.gin --topology=v5e-16 \\
        [--num_slices=N] [--batch_size=B | --per_chip_batch=B] [--compute_dtype=bfloat16|float32|config] \\
        [--gin.NAME=VALUE ...] [--json] [--serialize=PATH]
    python -m spectron_jax.aot --table --gin_file=A.gin --gin_file=B.gin+C.gin --topology=v5e-16,v4-64 [...]

What it does (the pattern of MaxText's train_compile): libtpu describes the topology's devices
(`jax.experimental.topologies`), the mesh is the run's gin `MeshConfig` over them (a -1 entry is filled),
the train state and the batch are `jax.ShapeDtypeStruct`s carrying their `NamedSharding`s (nothing is
allocated), and the very step `train` runs (`trainer.make_train_step`: loss, gradients, clipping,
optimizer update, donated state) is lowered and compiled by XLA's TPU compiler. The report gives, per
device: argument, output, aliased (donated) and temporary bytes, their total against the chip's HBM
(fits: yes / no), and the FLOPs of one step (per device and over all devices, from XLA's cost model).
The evaluation step the run compiles at start-up (`validation.make_eval_step`, microbatched like the
train step) is compiled too: its memory with the optimizer state still resident is `eval_total_bytes`,
and `fits` means that both steps fit, so a config that trains cannot run out of memory at its first
evaluation.

Compute dtype: `--compute_dtype=bfloat16` (the default, the production setting) casts the parameters
to bfloat16 inside the step AND sets the encoder's, decoder's and heads' computation dtype to
bfloat16 (parameters and optimizer state stay float32 master copies); `config` keeps what the gin files
say (StepConfig resolved for TPU); `float32` computes everything in float32.

A program that does not fit in HBM makes XLA fail with RESOURCE_EXHAUSTED; that is reported as
"does not fit" with the sizes XLA names, and the tool exits 0 (the question was answered). Exit 1: libtpu
is missing (`pip install -e ".[tpu]"`) or the compile failed for another reason; exit 2: bad flags.

`--table`: every `--gin_file` is one row (join files with '+' to compose a row), `--topology` takes a
comma-separated list; the output is a markdown table (the README's "Scaling out" section). With more
than one row each row is compiled by a fresh `python -m spectron_jax.aot` process, so its host peak RSS
(`getrusage`, the whole process: imports, tracing, XLA) is that row's own and no compilation cache of
one row inflates the next. Every report also carries the remat policy, the analytic FLOPs of the step
(`flops.step_flops`: the useful work, beside XLA's count of what it compiled) and the compile seconds.
`--json_output=PATH` writes the JSON report(s) to a file.
`--serialize=PATH` writes the compiled executable (`jax.experimental.serialize_executable`; PATH may be
a `gs://` URL, written through `spectron_jax.filesystem`) for reuse
on the real topology with the same jax / libtpu versions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import sys
import time
from typing import Any, Optional, Sequence

from spectron_jax import cli, filesystem

# libtpu looks for a real TPU host unless told where it is; these keep it quiet (AOT needs none). It also
# holds a machine-wide lock file unless several processes are allowed: AOT compiles never touch a chip.
LIBTPU_QUIET_ENV = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "TPU_SKIP_MDS_QUERY": "1",
}
INSTALL_HINT = 'libtpu is not installed: pip install -e ".[tpu]" (TPU AOT compilation needs it)'

# ---- Topologies ---------------------------------------------------------------------------------
# HBM per chip (GiB) from the Cloud TPU documentation; v4 and v5p chips are one "megacore" device.
HBM_GIB_PER_CHIP = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# libtpu's generation prefix of topology strings ('v5e:4x4', 'v5:4x4x4' for v5p).
_TOPOLOGY_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}
# Chips of a 2-D (v5e, v6e) slice -> its shape; of a 3-D (v4, v5p) slice -> its shape.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 768: (8, 8, 12), 1024: (8, 8, 16), 2048: (8, 16, 16)}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    """One TPU slice type, as `get_topology_desc` wants it.

    Attributes:
      name: Cloud TPU name ('v5e-16': 16 chips; 'v4-64' / 'v5p-128' count TensorCores, two per chip).
      generation: 'v4', 'v5e', 'v5p' or 'v6e'.
      topology: libtpu topology string ('v5e:4x4', 'v4:2x4x4').
      chip_config: 'default' (one core per chip) or 'megacore' (v4 / v5p: two cores as one device).
      chips_per_host_bounds: chips per host along each axis.
      wrap: torus wrap-around per axis (full cubes of 4x4x4 and more; the 16-wide v5e / v6e axes).
      chips: chips in one slice (= JAX devices).
      hbm_bytes: HBM of one chip.
    """

    name: str
    generation: str
    topology: str
    chip_config: str
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]
    chips: int
    hbm_bytes: int


def topology_spec(name: str) -> TopologySpec:
    """'v5e-16' / 'v4-64' / 'v5p-128' / 'v6e-8' (Cloud TPU names) or a libtpu string 'v5e:2x2' -> spec."""
    text = name.strip().lower()
    match = re.fullmatch(r"(v4|v5e|v5p|v6e|v5)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", text)
    if not match:
        raise ValueError(f"unknown TPU topology {name!r}: use e.g. v5e-16, v6e-8, v4-64, v5p-128 or v5e:4x4")
    generation = {"v5": "v5p"}.get(match.group(1), match.group(1))
    megacore = generation in ("v4", "v5p")
    if match.group(2):
        count = int(match.group(2))
        chips = count // 2 if megacore else count
        shapes = _SHAPES_3D if megacore else _SHAPES_2D
        if (megacore and count % 2) or chips not in shapes:
            sizes = sorted(k * (2 if megacore else 1) for k in shapes)
            raise ValueError(f"TPU topology {name!r}: no {generation} slice of that size (sizes: "
                             f"{', '.join(f'{generation}-{s}' for s in sizes)})")
        dims = shapes[chips]
    else:
        dims = tuple(int(d) for d in match.group(3).split("x"))
        if len(dims) != (3 if megacore else 2) or min(dims) < 1:
            raise ValueError(f"TPU topology {name!r}: {generation} needs {3 if megacore else 2} positive sizes")
        chips = math.prod(dims)
    if megacore:
        wrap = (True, True, True) if min(dims) >= 4 else (False, False, False)
        bounds = tuple(min(2, d) if i < 2 else 1 for i, d in enumerate(dims))
    else:
        wrap = tuple(d >= 16 for d in dims) + (False,)
        bounds = (min(2, dims[0]), min(2, dims[1]), 1)
    topology = f"{_TOPOLOGY_PREFIX[generation]}:{'x'.join(map(str, dims))}"
    return TopologySpec(name=name.strip(), generation=generation, topology=topology,
                        chip_config="megacore" if megacore else "default", chips_per_host_bounds=bounds,
                        wrap=wrap, chips=chips, hbm_bytes=HBM_GIB_PER_CHIP[generation] * 2**30)


def quiet_libtpu() -> None:
    """Sets the env that keeps libtpu from probing for TPU hardware (call before importing jax)."""
    for key, value in LIBTPU_QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def topology_devices(spec: TopologySpec, num_slices: int = 1) -> list:
    """The abstract TPU devices of `num_slices` slices of `spec` (they carry `slice_index` when > 1)."""
    quiet_libtpu()  # in case the caller did not (takes effect if libtpu is not loaded yet)
    from jax.experimental.topologies import get_topology_desc

    description = get_topology_desc(platform="tpu", topology_name=spec.topology, chip_config_name=spec.chip_config,
                                    chips_per_host_bounds=spec.chips_per_host_bounds, num_slices=num_slices,
                                    wrap=spec.wrap)
    return list(description.devices)


# ---- The train program (what `train` compiles), built abstractly -------------------------------------
@dataclasses.dataclass
class TrainProgram:
    """The jitted train step with its abstract, sharded inputs.

    Attributes:
      step: `jax.jit(train_step, donate_argnums=0)`; lower it with `(abstract_state, abstract_batch)`.
      abstract_state: the train state (step, rng, params, opt_state) as `ShapeDtypeStruct`s with shardings.
      abstract_batch: {key: ShapeDtypeStruct [global_batch, ...]} sharded along the batch rule.
      state_shardings: the state's `NamedSharding`s (for `jax.jit(init_state, out_shardings=...)`).
      init_state: `() -> state` (parameters from TrainConfig.seed); jit it with `state_shardings`.
      mesh, rules: the mesh and logical-axis rules the step is traced under.
      compute_dtype: the step's computation dtype.
      num_params: parameters of the model.
      eval_step: the training run's evaluation step (`validation.make_eval_step`, microbatched like the
        train step); lower it with `eval_args`: (params, batch, normalizers, totals), abstract.
    """

    step: Any
    abstract_state: Any
    abstract_batch: dict
    state_shardings: Any
    init_state: Any
    mesh: Any
    rules: tuple
    compute_dtype: Any
    num_params: int
    eval_step: Any = None
    eval_args: tuple = ()


def with_compute_dtype(model_config: Any, dtype: str) -> Any:
    """`model_config` (a SpectronConfig) with the encoder's, decoder's and heads' computation dtype
    set to `dtype` (parameter storage dtypes unchanged)."""
    return dataclasses.replace(
        model_config, encoder=dataclasses.replace(model_config.encoder, dtype=dtype),
        decoder=dataclasses.replace(model_config.decoder, dtype=dtype),
        acoustic=dataclasses.replace(model_config.acoustic, dtype=dtype))


def build_train_program(model_config: Any, train_config: Any, batch_spec: dict, mesh: Any, compute_dtype: Any,
                        train_steps: int) -> TrainProgram:
    """Composes `train`'s public pieces into the jitted step and its abstract sharded inputs.

    Args:
      model_config: SpectronConfig.
      train_config: train.TrainConfig (optimizer, step, rules, seed, batch_size are read).
      batch_spec: {key: (global shape, dtype)} of one global batch (`converter.batch_spec(batch_size)`).
      mesh: the device mesh (real or abstract TPU devices).
      compute_dtype: the step's computation dtype (a jnp dtype).
      train_steps: length of the learning-rate schedule.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from spectron_jax import partitioning, trainer

    rules = tuple(train_config.rules)
    model = trainer.FunctionalSpectron(model_config)
    layout = trainer.train_state_layout(model, train_config, train_steps, mesh)
    abstract, state_shardings = layout.abstract, layout.shardings
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract, state_shardings)
    axes = partitioning.batch_mesh_axes(mesh, rules)
    batch_entry = None if not axes else (axes[0] if len(axes) == 1 else axes)
    abstract_batch = {
        key: jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(
            mesh, PartitionSpec(batch_entry, *([None] * (len(shape) - 1)))))
        for key, (shape, dtype) in batch_spec.items()}
    optimizer = train_config.optimizer
    frozen = trainer.frozen_mask(abstract["params"], optimizer.freeze) if optimizer.freeze else None
    step_fn = trainer.make_train_step(model.loss_fn, layout.tx, layout.schedule, train_config.step, compute_dtype,
                                      frozen, normalizers_fn=model.loss_normalizers)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
                     donate_argnums=(0,))
    num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"])))
    # The evaluation step exactly as train's Evaluator compiles it (replicated counts and totals).
    from spectron_jax import validation
    eval_fn = validation.make_eval_step(model.eval_fn, compute_dtype, train_config.step.microbatches)
    replicated = NamedSharding(mesh, PartitionSpec())
    with partitioning.sharding_context(mesh, rules):
        norms = jax.eval_shape(model.loss_normalizers, abstract_batch)
        terms = jax.eval_shape(eval_fn, abstract_state["params"], abstract_batch, norms)
    on_every_device = lambda tree: jax.tree.map(  # noqa: E731
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), tree)
    eval_step = jax.jit(eval_fn, out_shardings=jax.tree.map(lambda _: replicated, terms))
    return TrainProgram(step=jitted, abstract_state=abstract_state, abstract_batch=abstract_batch,
                        state_shardings=state_shardings, init_state=layout.init_state, mesh=mesh, rules=rules,
                        compute_dtype=compute_dtype, num_params=num_params, eval_step=eval_step,
                        eval_args=(abstract_state["params"], abstract_batch, on_every_device(norms),
                                   on_every_device(terms)))


def compile_program(program: TrainProgram):
    """Lowers and compiles the step (traced inside the mesh / rules context)."""
    from spectron_jax import partitioning

    with partitioning.sharding_context(program.mesh, program.rules):
        return program.step.lower(program.abstract_state, program.abstract_batch).compile()


def compile_eval_program(program: TrainProgram):
    """Lowers and compiles the evaluation step (traced inside the mesh / rules context)."""
    from spectron_jax import partitioning

    with partitioning.sharding_context(program.mesh, program.rules):
        return program.eval_step.lower(*program.eval_args).compile()


# ---- Reports ------------------------------------------------------------------------------------
# "... the total memory required for HLO temporaries (40.00G) exceeds available HBM (15.75G)."
_OOM_SIZES = re.compile(r"(?:required for [^(]*|used)\(?\s*([\d.]+)\s*([KMGT]?)i?B?\)?"
                        r".*?available HBM \(?\s*([\d.]+)\s*([KMGT]?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> tuple[Optional[int], Optional[int]]:
    """(required bytes, available bytes) from XLA's RESOURCE_EXHAUSTED message, None where absent."""
    match = _OOM_SIZES.search(" ".join(message.split()))
    if not match:
        return None, None
    required = float(match.group(1)) * _UNITS[match.group(2).upper()]
    available = float(match.group(3)) * _UNITS[match.group(4).upper()]
    return int(required), int(available)


def memory_fields(compiled: Any) -> dict:
    """Per-device bytes of a compiled program: arguments, outputs, aliased, temporaries, code, total.

    total = arguments + outputs − aliased (donated buffers counted once) + temporaries + generated code.
    """
    stats = compiled.memory_analysis()
    fields = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "code_bytes": int(getattr(stats, "generated_code_size_in_bytes", 0) or 0),
    }
    fields["total_bytes"] = (fields["argument_bytes"] + fields["output_bytes"] - fields["alias_bytes"]
                             + fields["temp_bytes"] + fields["code_bytes"])
    return fields


def aot_report(program: TrainProgram, spec: TopologySpec, num_slices: int, gin_files: Sequence[str],
               batch_size: int, serialize_path: Optional[str] = None) -> dict:
    """Compiles `program` and returns the report dict (see `format_report`); OOM gives fits=False."""
    from spectron_jax import metrics

    num_devices = int(program.mesh.devices.size)
    report = {
        "gin_files": list(gin_files), "topology": spec.name, "topology_string": spec.topology,
        "num_slices": num_slices, "num_devices": num_devices,
        "device_kind": str(program.mesh.devices.flat[0].device_kind),
        "mesh": {name: int(size) for name, size in program.mesh.shape.items()},
        "batch_size": batch_size, "compute_dtype": str(program.compute_dtype), "num_params": program.num_params,
        "hbm_bytes": spec.hbm_bytes,
    }
    start = time.perf_counter()
    compiled, oom = _compile_unless_oom(compile_program, program)
    if oom is not None:
        required, available, message = oom
        report.update(fits=False, compile_seconds=round(time.perf_counter() - start, 2), total_bytes=required,
                      oom_available_bytes=available, error=message[:500])
        return report
    report["compile_seconds"] = round(time.perf_counter() - start, 2)
    report.update(memory_fields(compiled))
    report["fits"] = report["total_bytes"] <= spec.hbm_bytes
    if program.eval_step is not None:
        report.update(_eval_memory(program, report))
        report["fits"] = report["fits"] and report["eval_fits"]
    flops = metrics.compiled_flops(compiled)
    report["flops_per_device"] = flops
    report["flops_total"] = None if flops is None else flops * num_devices
    if serialize_path:
        write_executable(compiled, serialize_path)
        report["serialized"] = serialize_path
    return report


def _compile_unless_oom(compile_fn, program: TrainProgram):
    """(compiled, None), or (None, (required bytes, available bytes, message)) when XLA runs out of HBM;
    any other compile error is raised."""
    try:
        return compile_fn(program), None
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError (a RuntimeError subclass)
        message = " ".join(str(e).split())
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        return None, (*parse_oom(message), message)


def _eval_memory(program: TrainProgram, train_report: dict) -> dict:
    """eval_* fields: the evaluation step's per-device memory while the train state stays resident.

    eval_total_bytes = the eval step's own total (parameters, batch, temporaries, outputs, code) + the
    part of the train step's arguments it does not take (the optimizer state, kept on the device during
    evaluation). An evaluation that XLA cannot fit gives eval_fits False with the size XLA names.
    """
    compiled, oom = _compile_unless_oom(compile_eval_program, program)
    if oom is not None:
        required, _, message = oom
        return {"eval_fits": False, "eval_total_bytes": required, "eval_error": message[:500]}
    fields = memory_fields(compiled)
    resident = max(0, train_report["argument_bytes"] - fields["argument_bytes"])
    total = fields["total_bytes"] + resident
    return {"eval_temp_bytes": fields["temp_bytes"], "eval_argument_bytes": fields["argument_bytes"],
            "eval_total_bytes": total, "eval_fits": total <= train_report["hbm_bytes"]}


def write_executable(compiled, path: str) -> None:
    """Writes a compiled executable (`jax.experimental.serialize_executable`: payload and the in / out
    trees, pickled) to `path`, a local path or an object-store URL (`gs://...`), through the file-system
    layer. `read_executable` loads it back."""
    from jax.experimental import serialize_executable

    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    filesystem.write_bytes(path, pickle.dumps({"executable": payload, "in_tree": in_tree, "out_tree": out_tree}))


def read_executable(path: str):
    """The executable `write_executable` wrote, loaded onto this process's devices (same topology)."""
    from jax.experimental import serialize_executable

    saved = pickle.loads(filesystem.read_bytes(path))
    return serialize_executable.deserialize_and_load(saved["executable"], saved["in_tree"], saved["out_tree"])


def _gib(n: Optional[float]) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _tflops(n: Optional[float]) -> str:
    if n is None:
        return "?"
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e12 else f"{n / 1e9:.2f} GFLOP"


def format_report(report: dict) -> str:
    """Human-readable lines of one `aot_report`."""
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    lines = [
        f"config:   {' + '.join(report['gin_files'])}  ({report['num_params'] / 1e6:.1f}M parameters)",
        f"topology: {report['topology']} ({report['topology_string']}, {report['num_slices']} slice(s), "
        f"{report['num_devices']} x {report['device_kind']}); mesh {mesh}",
        f"batch:    {report['batch_size']} (global); compute dtype {report['compute_dtype']}",
    ]
    if report["fits"] is False and "argument_bytes" not in report:
        lines.append(f"memory:   does not fit: XLA needs {_gib(report.get('total_bytes'))} per device, "
                     f"{_gib(report.get('oom_available_bytes') or report['hbm_bytes'])} available (RESOURCE_EXHAUSTED)")
        return "\n".join(lines)
    lines += [
        f"memory per device: arguments {_gib(report['argument_bytes'])}, outputs {_gib(report['output_bytes'])}, "
        f"aliased {_gib(report['alias_bytes'])}, temporaries {_gib(report['temp_bytes'])}, "
        f"code {_gib(report['code_bytes'])}",
        f"total {_gib(report['total_bytes'])} of {_gib(report['hbm_bytes'])} HBM: "
        + ("fits" if report["total_bytes"] <= report["hbm_bytes"] else "does not fit"),
        f"flops per step: {_tflops(report['flops_per_device'])} per device, {_tflops(report['flops_total'])} total "
        f"(XLA's cost model; compiled in {report['compile_seconds']} s)",
    ]
    if "eval_fits" in report:
        lines.append(f"evaluation step: total {_gib(report.get('eval_total_bytes'))} per device with the optimizer "
                     f"state resident (temporaries {_gib(report.get('eval_temp_bytes'))}): "
                     + ("fits" if report["eval_fits"] else "does not fit"))
    if report.get("analytic_flops_total") is not None:
        lines.append(f"analytic flops per step: {_tflops(report['analytic_flops_total'])} total, "
                     f"{_tflops(report['analytic_flops_total'] / report['batch_size'])} per sample "
                     f"(remat {report.get('remat', '?')})")
    if report.get("host_peak_rss_bytes") is not None:
        lines.append(f"host peak RSS: {_gib(report['host_peak_rss_bytes'])}")
    return "\n".join(lines)


TABLE_HEADER = ("| config | topology | devices | mesh (data x fsdp x model) | global batch | remat | per-device memory "
                "(GiB) | HBM (GiB) | fits | TFLOP / step XLA (total) | TFLOP / step analytic | TFLOP / sample XLA "
                "| TFLOP / sample analytic | compile (s) | host peak RSS (GiB) |")
_TABLE_ALIGN = "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"


def _number(value: Optional[float], scale: float, digits: int) -> str:
    return "" if value is None else f"{value / scale:.{digits}f}"


def format_table(reports: Sequence[dict]) -> str:
    """A markdown table with one row per report (errors shown in the memory column)."""
    lines = [TABLE_HEADER, _TABLE_ALIGN]
    columns = TABLE_HEADER.count("|") - 1
    for r in reports:
        config = " + ".join(os.path.basename(f) for f in r["gin_files"])
        if "error" in r and r.get("fits") is None:
            cells = [config, r["topology"], "", "", "", "", f"error: {r['error'][:80]}"]
            lines.append("| " + " | ".join(cells + [""] * (columns - len(cells))) + " |")
            continue
        mesh = " x ".join(str(v) for v in r["mesh"].values())
        memory = "?" if r.get("total_bytes") is None else f"{r['total_bytes'] / 2**30:.2f}"
        if r["fits"] is False and "argument_bytes" not in r:
            memory = f"{memory} (OOM)"
        batch = r["batch_size"]
        xla, analytic = r.get("flops_total"), r.get("analytic_flops_total")
        cells = [config, r["topology"], str(r["num_devices"]), mesh, str(batch), r.get("remat", ""), memory,
                 f"{r['hbm_bytes'] / 2**30:.0f}", "yes" if r["fits"] else "no", _number(xla, 1e12, 1),
                 _number(analytic, 1e12, 1), _number(None if xla is None else xla / batch, 1e12, 2),
                 _number(None if analytic is None else analytic / batch, 1e12, 2),
                 _number(r.get("compile_seconds"), 1, 0), _number(r.get("host_peak_rss_bytes"), 2**30, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- Configs from gin ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunConfigs:
    """What one compile needs, read from the gin files (see `configs_from_gin`)."""

    model: Any  # SpectronConfig (compute dtype already applied)
    train: Any  # train.TrainConfig
    mesh: Any  # partitioning.MeshConfig
    converter: Any  # SpectronFeatureConverter
    compute_dtype: Any  # jnp dtype of the step
    train_steps: int


# Macros a run gin may leave %gin.REQUIRED; compiling needs none of them, so placeholders are bound.
_PLACEHOLDER_MACROS = {"MODEL_DIR": "'unused-by-aot'", "TRAIN_STEPS": "100000", "TASK": "'spectron_embedded'"}


def _parse_run_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths: str) -> None:
    import gin

    from spectron_jax import gin_config, train

    train.register_train_configurables()
    gin_config.parse_gin(gin_files=gin_files, bindings=bindings, gin_search_paths=search_paths, finalize=False)
    for name, value in _PLACEHOLDER_MACROS.items():
        try:
            bound = gin.query_parameter(f"{name}/gin.macro.value")
        except ValueError:
            bound = gin.REQUIRED
        if bound is gin.REQUIRED:
            gin.parse_config(f"{name} = {value}")
    try:
        gin.finalize()
    except Exception as e:  # noqa: BLE001
        raise cli.UsageError(f"gin config ({', '.join(gin_files)}): {' '.join(str(e).split())[:300]}") from None


def configs_from_gin(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: str = "",
                     batch_size: Optional[int] = None, compute_dtype: str = "bfloat16", num_slices: int = 1,
                     platform: str = "tpu") -> RunConfigs:
    """Parses the gin files (+ bindings) and builds the model, train, mesh and converter configs.

    Args:
      batch_size: overrides TrainConfig.batch_size (the global batch) when given.
      compute_dtype: 'bfloat16' / 'float32' (step and modules), or 'config' (as the gin files say,
        StepConfig resolved for `platform`).
      num_slices: with more than one slice and no MeshConfig.dcn, the slices are data parallel
        (dcn = (-1, 1, 1, 1)).
    """
    import jax.numpy as jnp

    from spectron_jax import gin_config, partitioning, train

    _parse_run_gin(gin_files, bindings, search_paths)
    try:
        train_config = train.register_train_configurables()["TrainConfig"]()
    except Exception as e:  # noqa: BLE001 - a config's __post_init__ rejecting a value
        raise cli.UsageError(f"gin config: cannot build TrainConfig: {' '.join(str(e).split())}") from None
    if batch_size is not None:
        train_config = dataclasses.replace(train_config, batch_size=batch_size)
    model_config = gin_config.build("SpectronConfig")
    if compute_dtype == "config":
        dtype = train_config.step.resolved_dtype(platform)
    else:
        dtype = jnp.dtype(compute_dtype)
        model_config = with_compute_dtype(model_config, compute_dtype)
        train_config = dataclasses.replace(train_config, step=dataclasses.replace(train_config.step,
                                                                                  compute_dtype=compute_dtype))
    mesh_config = train_config.mesh
    if mesh_config == partitioning.MeshConfig():  # TrainConfig.mesh not bound: read MeshConfig's own bindings
        mesh_config = gin_config.build("MeshConfig")
    if num_slices > 1 and mesh_config.dcn is None:
        mesh_config = dataclasses.replace(mesh_config, dcn=(-1, 1, 1, 1))
    task_config = gin_config.build("TaskConfig")
    converter = gin_config.build("SpectronFeatureConverter", with_segments=task_config.phi_split,
                                 reduction_factor=model_config.reduction_factor, prompt_dim=model_config.prompt_dim)
    steps = gin_config.query_macro("TRAIN_STEPS", 100000)
    return RunConfigs(model=model_config, train=train_config, mesh=mesh_config, converter=converter,
                      compute_dtype=dtype, train_steps=steps if isinstance(steps, int) and steps > 0 else 100000)


def program_for_devices(configs: RunConfigs, devices: Sequence[Any]) -> TrainProgram:
    """The train program of `configs` on a mesh over `devices` (checks that the batch splits evenly)."""
    from spectron_jax import partitioning

    try:
        mesh = partitioning.make_mesh(configs.mesh, devices)
    except ValueError as e:
        raise cli.UsageError(f"MeshConfig ici={configs.mesh.ici} dcn={configs.mesh.dcn} on {len(devices)} devices: "
                             f"{e}") from None
    axes = partitioning.batch_mesh_axes(mesh, configs.train.rules)
    shards = math.prod(mesh.shape[a] for a in axes)
    batch = configs.train.batch_size
    if batch % shards:
        raise cli.UsageError(f"--batch_size / TrainConfig.batch_size {batch} does not split over the {shards} "
                             f"batch shards of mesh axes {axes} (use a multiple of {shards})")
    return build_train_program(configs.model, configs.train, configs.converter.batch_spec(batch), mesh,
                               configs.compute_dtype, configs.train_steps)


# ---- CLI ---------------------------------------------------------------------------------------------
COMPUTE_DTYPES = ("bfloat16", "float32", "config")


def _parser() -> cli.ArgumentParser:
    from spectron_jax import gin_config

    parser = cli.ArgumentParser(prog="spectron_jax.aot",
                                description="Compile the train step for a TPU topology on a CPU host and report "
                                            "per-device memory and FLOPs.")
    gin_config.add_gin_flags(parser)
    parser.add_argument("--topology", required=True, metavar="NAME[,NAME...]",
                        help="Cloud TPU slice (v5e-16, v5e-64, v6e-8, v4-64, v5p-128, ...) or a libtpu topology "
                             "string (v5e:2x2); comma-separated list with --table")
    parser.add_argument("--num_slices", type=int, default=1, help="slices joined over the data-center network")
    parser.add_argument("--batch_size", type=int, default=None, help="global batch (default: TrainConfig.batch_size)")
    parser.add_argument("--per_chip_batch", type=int, default=None,
                        help="global batch = this x the topology's devices (instead of --batch_size)")
    parser.add_argument("--compute_dtype", default="bfloat16", choices=COMPUTE_DTYPES,
                        help="computation dtype of the step and the modules (default: bfloat16, production)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (a list with --table)")
    parser.add_argument("--table", action="store_true",
                        help="each --gin_file (files joined with '+') x each topology -> one markdown table row")
    parser.add_argument("--serialize", default=None, metavar="PATH", help="write the compiled executable here")
    parser.add_argument("--json_output", default=None, metavar="PATH",
                        help="also write the JSON report (a list with --table) to this file")
    return parser


def _validate(args) -> list[TopologySpec]:
    if not args.gin_file:
        raise cli.UsageError("--gin_file is required (e.g. --gin_file=gin/models/spectron_1b.gin)")
    if args.num_slices < 1:
        raise cli.UsageError(f"--num_slices must be >= 1, got {args.num_slices}")
    for name in ("batch_size", "per_chip_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise cli.UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size is not None and args.per_chip_batch is not None:
        raise cli.UsageError("--batch_size and --per_chip_batch exclude each other")
    names = [n for n in args.topology.split(",") if n.strip()]
    if not names:
        raise cli.UsageError("--topology: give a TPU topology such as v5e-16")
    if len(names) > 1 and not args.table:
        raise cli.UsageError("--topology: a list of topologies needs --table")
    if args.table and args.serialize:
        raise cli.UsageError("--serialize works on one compile, not with --table")
    specs = []
    for name in names:
        try:
            specs.append(topology_spec(name))
        except ValueError as e:
            raise cli.UsageError(f"--topology: {e}") from None
    for flag in ("serialize", "json_output"):
        path = getattr(args, flag)
        if path and not filesystem.is_remote(path):  # an object store has no folders to check
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise cli.UsageError(f"--{flag}={path}: folder {folder} does not exist")
    return specs


def run_one(gin_files: Sequence[str], bindings: Sequence[str], search_paths: str, spec: TopologySpec,
            num_slices: int = 1, batch_size: Optional[int] = None, compute_dtype: str = "bfloat16",
            serialize_path: Optional[str] = None) -> dict:
    """Parses the gin files, builds the topology's devices and compiles: the `aot_report` dict."""
    from spectron_jax import flops
    from spectron_jax.models import scanning

    configs = configs_from_gin(gin_files, bindings, search_paths, batch_size, compute_dtype, num_slices)
    devices = topology_devices(spec, num_slices)
    program = program_for_devices(configs, devices)
    report = aot_report(program, spec, num_slices, gin_files, configs.train.batch_size, serialize_path)
    analytic = flops.step_flops_for_converter(configs.model, configs.converter, configs.train.batch_size,
                                              configs.train.optimizer.freeze)
    report.update(remat=scanning.remat_label(configs.model), analytic_flops_total=analytic.total,
                  analytic_flops_breakdown=analytic.training, host_peak_rss_bytes=peak_rss_bytes())
    return report


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident set size in bytes (`getrusage`; None where unavailable)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


def _row_in_subprocess(files: Sequence[str], args, spec: TopologySpec, batch_size: Optional[int],
                       folder: str) -> dict:
    """One table row compiled by a fresh `python -m spectron_jax.aot` (its own peak RSS, no shared caches)."""
    import subprocess

    output = os.path.join(folder, "report.json")
    command = [sys.executable, "-m", "spectron_jax.aot", *[f"--gin_file={f}" for f in files],
               f"--topology={spec.name}", f"--num_slices={args.num_slices}", f"--compute_dtype={args.compute_dtype}",
               f"--json_output={output}"]
    if args.gin_search_paths:
        command.append(f"--gin_search_paths={args.gin_search_paths}")
    if batch_size is not None:
        command.append(f"--batch_size={batch_size}")
    for binding in args.gin_bindings:
        name, value = binding.split(" = ", 1)
        command.append(f"--gin.{name}={value}")
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode == 0 and os.path.exists(output):
        with open(output, encoding="utf-8") as f:
            return json.load(f)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "no output")
    return {"gin_files": list(files), "topology": spec.name, "fits": None,
            "error": " ".join(f"exit {proc.returncode}: {message}".split())[:400]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_libtpu()  # before anything imports jax
    from spectron_jax import gin_config

    args = gin_config.parse_args(_parser(), argv)
    specs = _validate(args)
    if not libtpu_available():
        raise cli.InputError(INSTALL_HINT)
    rows = [f.split("+") for f in args.gin_file] if args.table else [list(args.gin_file)]
    isolate = len(rows) * len(specs) > 1  # a fresh process per row: its own peak RSS, caches freed between rows
    reports = []
    for files in rows:
        for spec in specs:
            batch_size = args.batch_size
            if args.per_chip_batch is not None:
                batch_size = args.per_chip_batch * spec.chips * args.num_slices
            try:
                if isolate:
                    import tempfile

                    with tempfile.TemporaryDirectory(prefix="aot_row_") as folder:
                        report = _row_in_subprocess(files, args, spec, batch_size, folder)
                else:
                    report = run_one(files, args.gin_bindings, args.gin_search_paths, spec, args.num_slices,
                                     batch_size, args.compute_dtype, args.serialize)
            except cli.CLIError as e:
                if not args.table:
                    raise
                report = {"gin_files": files, "topology": spec.name, "fits": None, "error": " ".join(str(e).split())}
            except Exception as e:  # noqa: BLE001 - a compile failure other than running out of memory
                message = " ".join(f"{type(e).__name__}: {e}".split())[:400]
                if not args.table:
                    raise cli.InputError(f"compiling {'+'.join(files)} for {spec.name} failed: {message}") from None
                report = {"gin_files": files, "topology": spec.name, "fits": None, "error": message}
            reports.append(report)
            if args.table:  # progress: each row as soon as it is known
                print(format_table([report]).splitlines()[-1], file=sys.stderr, flush=True)
    if args.json_output:
        filesystem.write_text(args.json_output, json.dumps(reports if args.table else reports[0], sort_keys=True))
    if args.json:
        print(json.dumps(reports if args.table else reports[0], sort_keys=True))
    elif args.table:
        print(format_table(reports))
    else:
        print(format_report(reports[0]))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    cli.run(main)
