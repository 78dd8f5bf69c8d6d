"""Random-weight Hugging Face checkpoints of any model config: the names and shapes of the real checkpoint (the one
name table, `names.leaf_specs`) with seeded random values, written by the exporter's own shard writer (`save`).

Each tensor's values depend only on (seed, its HF name, its shape), never on the other tensors or the number of
layers: a checkpoint with fewer layers holds exactly the first layers of one with more, so a small one built with the
same seed is a faithful piece of a large one (benchmarks/multi_gpu.py checks logits on the first block that way).
Values are uniform with standard deviation `cfg.initializer_range` (uniform because numpy draws it several times
faster than a normal, which matters at 80B): finite and small, enough for loading, sharding, memory and parity
checks; not a trained model.

Nothing is held whole: tensors are drawn one (leaf, layer) at a time, as the shard being written asks for them, and
each shard leaves memory once written. `workers` > 1 writes shards in that many processes.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import Execution
from qwen3next_jax.hf.load import abstract_model
from qwen3next_jax.hf.names import LeafSpec, leaf_specs
from qwen3next_jax.hf.save import DEFAULT_MAX_SHARD_SIZE, ShardPlan, plan_shards, write_metadata, write_shard


def checkpoint_specs(cfg: Qwen3NextConfig, dtype: str = "bfloat16") -> list[LeafSpec]:
    """Every leaf of the model `cfg` describes, with its HF tensors, stored in `dtype` (shapes only)."""
    return leaf_specs(abstract_model(cfg, Execution(compute_dtype=dtype, param_dtype=dtype)))


class RandomSlices:
    """A `save.SliceSource` of seeded random values: (spec, r) -> our-layout host array of repeat r."""

    def __init__(self, seed: int, std: float):
        self.seed, self.half_width = seed, std * math.sqrt(3)  # uniform on [-a, a] has standard deviation a / sqrt(3)
        self._key, self._host = None, None

    def tensor(self, name: str, shape: tuple, dtype) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        x = rng.random(shape, dtype=np.float32)
        x -= 0.5
        x *= 2 * self.half_width
        return x.astype(dtype)

    def __call__(self, spec: LeafSpec, r: int) -> np.ndarray:
        if self._key != (spec.path, r):  # the writer asks for one (leaf, repeat) per slot: draw it once
            self._host = None
            names = spec.hf_names[r]
            if spec.per_expert:
                host = np.empty((len(names), *spec.slot_shape), spec.dtype)
                for e, name in enumerate(names):
                    host[e] = self.tensor(name, spec.slot_shape, spec.dtype)
            else:
                host = self.tensor(names[0], spec.slot_shape, spec.dtype)
            self._key, self._host = (spec.path, r), host
        return self._host


def _write_shards(cfg_dict: dict, dtype: str, seed: int, max_shard_size, path: str, ks: list[int]) -> None:
    cfg = Qwen3NextConfig.from_dict(cfg_dict)
    plan = plan_shards(checkpoint_specs(cfg, dtype), max_shard_size)
    source = RandomSlices(seed, cfg.initializer_range)
    for k in ks:
        write_shard(plan, k, source, path)


def write_random_checkpoint(cfg: Qwen3NextConfig, path: str | os.PathLike, *, seed: int = 0, dtype: str = "bfloat16",
                            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, workers: int = 1) -> ShardPlan:
    """Writes the checkpoint of `cfg` with random values to `path`; returns its plan (files, tensors, parameters)."""
    path = os.fspath(path)
    plan = plan_shards(checkpoint_specs(cfg, dtype), max_shard_size)
    os.makedirs(path, exist_ok=True)
    n = len(plan.files)
    if workers <= 1:
        _write_shards(cfg.to_dict(), dtype, seed, max_shard_size, path, list(range(n)))
    else:
        # Fresh processes (spawn): this one may have started JAX's threads, which a fork would copy half-alive.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            jobs = [pool.submit(_write_shards, cfg.to_dict(), dtype, seed, max_shard_size, path,
                                list(range(i, n, workers))) for i in range(workers)]
            for job in jobs:
                job.result()
    write_metadata(plan, cfg, path)
    return plan
