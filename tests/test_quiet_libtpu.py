"""The platform decision that keeps JAX from loading libtpu on hosts that cannot have a TPU.

The subprocess checks (JAX's own search prints libtpu's errors here; `train --help` and a training step
print none) are in tests/test_train.py, beside the training runs whose data they share.
"""

import os
import subprocess
import sys

import pytest

from spectron_jax import quiet_libtpu

CPU_HOST = dict(libtpu_installed=True, tpu_attached=False, nvidia_gpu=False, cuda_plugin=False)


def test_a_cpu_host_with_libtpu_gets_the_cpu_platform():
    assert quiet_libtpu.choose_platforms({}, **CPU_HOST) == "cpu"
    assert quiet_libtpu.choose_platforms({"TPU_SKIP_MDS_QUERY": "1"}, **CPU_HOST) == "cpu"  # jax sets it itself


@pytest.mark.parametrize("environ, host, expected", [
    ({"JAX_PLATFORMS": "tpu"}, {}, None),                      # the user's choice
    ({"JAX_PLATFORMS": ""}, {}, None),                         # the user asks for JAX's own search
    ({}, {"libtpu_installed": False}, None),                   # nothing would print
    ({}, {"tpu_attached": True}, None),                        # a TPU VM: libtpu starts, errors and all
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, {}, None),       # told to be a TPU host
    ({"JAX_FORCE_TPU_INIT": "1"}, {}, None),
    ({"TPU_WORKER_HOSTNAMES": ""}, {}, "cpu"),                 # set but empty says nothing
    ({}, {"nvidia_gpu": True, "cuda_plugin": True}, "cuda,cpu"),
    ({}, {"nvidia_gpu": True, "cuda_plugin": False}, None),    # JAX's hint about the missing CUDA jaxlib stays
])
def test_what_leaves_jax_platform_search_alone(environ, host, expected):
    assert quiet_libtpu.choose_platforms(environ, **{**CPU_HOST, **host}) == expected


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_tpu_attached_reads_device_files_and_google_pci_devices(tmp_path):
    dev, pci = tmp_path / "dev", tmp_path / "pci"
    dev.mkdir()
    pci.mkdir()
    _write(pci / "0000:00:03.0" / "vendor", "0x8086")            # an Intel bridge
    _write(pci / "0000:00:03.0" / "class", "0x060000")
    _write(pci / "0000:00:04.0" / "vendor", "0x1ae0")            # a Google gVNIC network card
    _write(pci / "0000:00:04.0" / "class", "0x020000")
    _write(pci / "0000:00:05.0" / "vendor", "0x1AE0")            # Google NVMe storage
    _write(pci / "0000:00:05.0" / "class", "0x010802")
    (dev / "vfio").mkdir()
    (dev / "vfio" / "vfio").touch()                              # the vfio control file alone is no TPU
    assert not quiet_libtpu.tpu_attached(str(dev), str(pci))
    (dev / "vfio" / "0").touch()                                 # v5e and later: one vfio group per chip
    assert quiet_libtpu.tpu_attached(str(dev), str(pci))
    (dev / "vfio" / "0").unlink()
    (dev / "accel0").touch()                                     # up to v4
    assert quiet_libtpu.tpu_attached(str(dev), str(pci))
    (dev / "accel0").unlink()
    _write(pci / "0000:00:06.0" / "vendor", "0x1ae0")            # a Google accelerator, whatever its id
    _write(pci / "0000:00:06.0" / "class", "0x120000")
    assert quiet_libtpu.tpu_attached(str(dev), str(pci))


def test_importing_the_package_sets_the_platform_before_jax_and_keeps_a_users_choice():
    """In a fresh interpreter: the package decides before jax is imported; JAX_PLATFORMS given is kept."""
    code = ("import os, spectron_jax, jax; from spectron_jax import quiet_libtpu as q; "
            "print(os.environ.get('JAX_PLATFORMS'), jax.config.jax_platforms, q.install())")
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", *quiet_libtpu.TPU_ENV)}
    own = subprocess.run([sys.executable, "-c", code], env={**base, "JAX_PLATFORMS": "cpu,tpu"},
                         capture_output=True, text=True, timeout=300)
    assert own.returncode == 0, own.stderr[-2000:]
    assert own.stdout.split() == ["cpu,tpu", "cpu,tpu", "None"]
    if quiet_libtpu.tpu_attached() or quiet_libtpu.nvidia_gpu_visible():
        return
    fresh = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    import importlib.util

    expected = "cpu" if importlib.util.find_spec("libtpu") is not None else "None"
    assert fresh.stdout.split() == [expected, expected, "None"]
