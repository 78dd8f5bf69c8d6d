"""Test session setup.

Eight fake CPU devices so sharding tests build real meshes (tests use device 0 otherwise). Where no CUDA plugin is
installed, JAX is kept on the CPU: libtpu (installed for the TPU kernels' ahead-of-time compile tests) would
otherwise make every test process probe for TPU chips and contend for libtpu's lock file.
"""
import importlib.util
import os

if importlib.util.find_spec("jax_plugins") is None or not any(
        importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts; on a GPU host it only affects the CPU


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
