"""TensorFlow's start-up notices are filtered, real stderr output is kept, and TensorFlow sees no GPU."""

import os
import subprocess
import sys
import textwrap

from spectron_jax import quiet_tensorflow

# Lines TensorFlow 2.21 prints on a machine without CUDA (copied from a real run; the timestamps vary).
TF_STARTUP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796173100.501069   12664 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796173100.501595   12664 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1796173100.568752   12664 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1796173107.270880   12664 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""


def test_filter_drops_the_startup_notices_and_keeps_everything_else():
    real = "W1202 01:00:00.000000   1 some_op.cc:10] Out of range: a real warning\nTraceback (most recent call last):\n"
    mixed = TF_STARTUP.splitlines(keepends=True)
    mixed.insert(2, real.splitlines(keepends=True)[0])
    mixed.append(real.splitlines(keepends=True)[1])
    assert quiet_tensorflow.filter_noise("".join(mixed)) == real
    assert quiet_tensorflow.filter_noise(TF_STARTUP) == ""
    assert not quiet_tensorflow.is_noise("E0000 00:00:1.0   1 cuda_platform.cc:52] something else entirely")


def _run(script: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet_tensorflow.VERBOSE_ENV)}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=full_env, timeout=600)


def test_importing_tensorflow_after_the_package_is_quiet_and_hides_gpus(tmp_path):
    out = tmp_path / "result.txt"
    result = _run(f"""
        import os, sys
        import spectron_jax
        from spectron_jax import quiet_tensorflow
        with quiet_tensorflow._stderr_filtered():   # a real line written on fd 2 inside the window survives
            os.write(2, b"kept: a real line\\n")
            os.write(2, {TF_STARTUP.splitlines()[2]!r}.encode() + b"\\n")
        import tensorflow as tf
        tf.constant(1.0) + 1.0
        open({str(out)!r}, "w").write(repr(tf.config.get_visible_devices("GPU")))
    """)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "[]"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["kept: a real line"], result.stderr
