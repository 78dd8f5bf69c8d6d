"""Keep JAX from probing for TPU chips on a host that has none.

libtpu is installed with the test extras (the TPU kernels compile ahead of time in the tests), and once installed,
JAX's start-up on any host tries to open TPU chips, prints a long error and takes libtpu's process lock. Where the
host shows no TPU device files and JAX_PLATFORMS is unset, this narrows JAX to the GPU (if a CUDA plugin is
installed) and the CPU. It must run before JAX starts a backend (importing jax does not start one).
"""

from __future__ import annotations

import glob
import importlib.util
import os


def skip_absent_tpu() -> None:
    if "JAX_PLATFORMS" in os.environ or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    has_cuda = importlib.util.find_spec("jax_plugins") is not None and any(
        importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
    import jax

    jax.config.update("jax_platforms", "cuda,cpu" if has_cuda else "cpu")
