"""Test session setup.

Eight fake CPU devices so sharding tests build real meshes (tests use device 0 otherwise), and no probing for TPU
chips on hosts without them (libtpu is installed for the TPU kernels' ahead-of-time compile tests; every test
process would otherwise try to open chips and contend for libtpu's lock file).
"""
from qwen3next_jax.platforms import skip_absent_tpu

skip_absent_tpu()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts; on a GPU host it only affects the CPU


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
