"""Test session setup: eight fake CPU devices so sharding tests can build real meshes; tests use device 0 otherwise."""
import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts; on a GPU host it only affects the CPU


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
