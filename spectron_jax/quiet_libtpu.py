"""Quiet libtpu on hosts without a TPU: JAX is told not to probe for one that is not there.

With the `tpu` extra installed (CI and every `aot` user install it), JAX's default platform search
loads libtpu on any host, and libtpu's start-up on a machine without TPU chips prints a screenful to
stderr before the first line of the program: "could not determine TPU accelerator type",
"TPU_WORKER_HOSTNAMES", "Failed to find host bounds", "Logging before InitGoogle()" and a source-location
trace, then JAX falls back to the CPU. libtpu also takes the machine-wide `/tmp/libtpu_lockfile` while
the process lives, so a second JAX process on the same CPU host finds the lock held.

`install()` (called when the package is imported, so before any entry point imports jax) decides
from what the host shows whether a TPU can be there, and when none can, sets `JAX_PLATFORMS` so that
JAX never loads libtpu:

  - `JAX_PLATFORMS` already in the environment (even empty: `JAX_PLATFORMS=''` asks for JAX's own
    search): left alone;
  - libtpu not installed: nothing to quiet, left alone;
  - a TPU attached (`/dev/accel*`, `/dev/vfio/<n>`, or a Google PCI device that is neither a network
    nor a storage controller) or a TPU set-up variable in the environment (`TPU_ACCELERATOR_TYPE`,
    `TPU_WORKER_HOSTNAMES`, `JAX_FORCE_TPU_INIT`, ...): left alone, so a TPU VM sees every libtpu
    message, errors included;
  - no TPU and no NVIDIA GPU: `JAX_PLATFORMS=cpu`;
  - no TPU, an NVIDIA GPU and a JAX CUDA plugin installed (the `cuda` extra): `JAX_PLATFORMS=cuda,cpu`
    (JAX then reports a CUDA start-up failure as an error instead of falling back to the CPU);
  - no TPU, an NVIDIA GPU and no CUDA plugin: left alone (JAX's own hint that a CUDA jaxlib is
    missing is worth seeing).

The variable is set in `os.environ`, so subprocesses on the same host inherit the decision. A process
that imported jax before this package made its own choice and is left alone.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pkgutil
import sys
from typing import Mapping, Optional

PLATFORMS_ENV = "JAX_PLATFORMS"

# Variables a TPU VM, a TPU pod launcher or a user sets to tell libtpu where it runs: any of them set
# means libtpu is wanted, whatever the device files say. (`TPU_SKIP_MDS_QUERY` is not one: jax itself
# sets it on hosts without chips.)
TPU_ENV = ("JAX_FORCE_TPU_INIT", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID",
           "TPU_PROCESS_BOUNDS", "TPU_CHIPS_PER_PROCESS_BOUNDS", "TPU_HOST_BOUNDS", "TPU_VISIBLE_CHIPS",
           "TPU_TOPOLOGY", "TPU_NAME", "TPU_LIBRARY_PATH")

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI base classes of Google devices that are not TPUs (gVNIC network, NVMe storage on GCE VMs).
_NOT_TPU_PCI_CLASSES = ("0x01", "0x02")
# The device files of an NVIDIA GPU (a container's `nvidiactl`, WSL2's `dxg`).
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def choose_platforms(environ: Mapping[str, str], *, libtpu_installed: bool, tpu_attached: bool,
                     nvidia_gpu: bool, cuda_plugin: bool) -> Optional[str]:
    """The `JAX_PLATFORMS` value to set, or None to leave JAX's own platform search (rules in the module
    docstring)."""
    if PLATFORMS_ENV in environ or not libtpu_installed or tpu_attached:
        return None
    if any(environ.get(name) for name in TPU_ENV):
        return None
    if nvidia_gpu:
        return "cuda,cpu" if cuda_plugin else None
    return "cpu"


def tpu_attached(dev: str = "/dev", pci_root: str = "/sys/bus/pci/devices") -> bool:
    """Whether the host shows a TPU: its device files (`accel*` up to v4, `vfio/<n>` from v5e on) or a
    Google PCI device that is not a network or storage controller (when in doubt: attached)."""
    if glob.glob(os.path.join(dev, "accel*")) or glob.glob(os.path.join(dev, "vfio", "[0-9]*")):
        return True
    for device in glob.glob(os.path.join(pci_root, "*")):
        try:
            with open(os.path.join(device, "vendor"), encoding="ascii") as f:
                vendor = f.read().strip().lower()
            if vendor != _GOOGLE_PCI_VENDOR:
                continue
            with open(os.path.join(device, "class"), encoding="ascii") as f:
                pci_class = f.read().strip().lower()
        except OSError:
            continue
        if not pci_class.startswith(_NOT_TPU_PCI_CLASSES):
            return True
    return False


def nvidia_gpu_visible() -> bool:
    """Whether an NVIDIA GPU's device files are visible."""
    return any(os.path.exists(path) for path in _NVIDIA_DEVICES)


def cuda_plugin_installed() -> bool:
    """Whether a JAX CUDA PJRT plugin (`jax-cuda12-plugin`, `jax-cuda13-plugin`) is installed."""
    spec = importlib.util.find_spec("jax_plugins")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any("cuda" in m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations)))


def install() -> Optional[str]:
    """Sets `JAX_PLATFORMS` when the host cannot have a TPU (see the module docstring); returns the value
    set, or None when the environment was left as it was."""
    if "jax" in sys.modules or PLATFORMS_ENV in os.environ:
        return None
    libtpu = importlib.util.find_spec("libtpu") is not None
    if not libtpu:
        return None
    value = choose_platforms(os.environ, libtpu_installed=True, tpu_attached=tpu_attached(),
                             nvidia_gpu=nvidia_gpu_visible(), cuda_plugin=cuda_plugin_installed())
    if value is not None:
        os.environ[PLATFORMS_ENV] = value
    return value
