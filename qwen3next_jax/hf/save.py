"""Export: parameters -> a Hugging Face checkpoint directory (`save_hf_checkpoint`, `write_hf_checkpoint`).

config.json (transformers' keys), safetensors shards of at most `max_shard_size` (per-expert tensors, MTP included)
and `model.safetensors.index.json` when there is more than one shard. The writer streams: it asks its source for
one (leaf, repeat) at a time, in checkpoint order, and holds one shard's tensors until that shard is written. The
source is the model on its devices (`save_hf_checkpoint`) or any other reader of our-layout slices, such as an Orbax
checkpoint read with tensorstore (qwen3next_jax.orbax_io).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.hf.files import CONFIG_NAME, INDEX_FILE, SINGLE_FILE, write_json
from qwen3next_jax.hf.names import LeafSpec, hf_order, leaf_specs

DEFAULT_MAX_SHARD_SIZE = "5GB"

# (spec, r) -> our-layout host array of repeat r of that leaf (the whole leaf when not stacked), in spec.dtype.
SliceSource = Callable[[LeafSpec, int], np.ndarray]


def parse_size(size: int | str) -> int:
    """"5GB" -> 5 * 10**9 (HF's convention), "70KiB" -> 70 * 1024, ints pass through; must be positive."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 70KiB or an int of bytes")
        base = 1024 if m.group(3) else 1000
        n = int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))
    if n <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return n


def hf_config_dict(cfg: Qwen3NextConfig, dtype=None, layout: str = "5") -> dict:
    """What the export writes as config.json: transformers' keys (layout "5": rope in rope_parameters) plus
    `dtype` (layout "5") / `torch_dtype` (layout "4.57"), and `mtp_num_hidden_layers` so the depth reads back
    exactly (transformers ignores it)."""
    hf = cfg.to_hf_dict(layout)
    if dtype is not None:
        hf["dtype" if layout == "5" else "torch_dtype"] = jnp.dtype(dtype).name
    return dict(sorted(hf.items()))


class DeviceLeafFetcher:
    """Host copies of one (leaf, repeat) at a time of a model's parameters, in our layout."""

    def __init__(self, model):
        self.values = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
        self._key, self._host = None, None
        self.fetches = 0

    def __call__(self, spec: LeafSpec, r: int) -> np.ndarray:
        if self._key != (spec.path, r):
            self.fetches += 1
            self._host = None  # drop the previous one before fetching the next
            arr = self.values[spec.path]
            part = arr[r] if spec.stacked else arr
            if isinstance(part, jax.Array) and not part.is_fully_addressable:
                from jax.experimental import multihost_utils
                part = multihost_utils.process_allgather(part, tiled=True)
            self._key, self._host = (spec.path, r), np.asarray(jax.device_get(part))
        return self._host


def save_hf_checkpoint(model, path: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, *,
                       config_layout: str = "5", progress: bool = False) -> list[str]:
    """Write `model` as a Hugging Face checkpoint; each tensor keeps its parameter's dtype. Streams one shard at a
    time. Returns the written file names. Only process 0 writes (multi-host)."""
    return write_hf_checkpoint(leaf_specs(model), DeviceLeafFetcher(model), model.config, path, max_shard_size,
                               config_layout=config_layout, progress=progress)


def write_hf_checkpoint(specs: list[LeafSpec], fetch: SliceSource, cfg: Qwen3NextConfig, path: str | os.PathLike,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, *, config_layout: str = "5",
                        progress: bool = False) -> list[str]:
    """Write the leaves `specs` describe, read through `fetch` one (leaf, repeat) at a time, as the checkpoint of a
    model with config `cfg`: each tensor in its spec's dtype. Returns the written file names."""
    path = os.fspath(path)
    limit = parse_size(max_shard_size)
    entries = []  # (hf name, spec, r, e, nbytes), in checkpoint order with each (leaf, repeat) contiguous
    for spec in specs:
        itemsize = np.dtype(spec.dtype).itemsize
        for r, e, name in spec.slots():
            entries.append((name, spec, r, e, math.prod(spec.hf_shape) * itemsize))
    # Sort by the (leaf, repeat)'s first name, then expert: the experts of one leaf of one layer stay together, so
    # each (leaf, repeat) is fetched once.
    entries.sort(key=lambda t: (hf_order(t[1].hf_names[t[2]][0]), t[3]))
    shards, current, size = [], [], 0
    for entry in entries:
        if current and size + entry[4] > limit:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[4]
    if current:
        shards.append(current)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    weight_map = {}
    shard_iter = range(n)
    if progress:
        from tqdm import tqdm
        shard_iter = tqdm(shard_iter, desc=f"writing {os.path.basename(path.rstrip('/'))}", unit="shard")
    for k in shard_iter:
        tensors = {}
        for name, spec, r, e, _ in shards[k]:
            host = fetch(spec, r)
            slot = host[e] if spec.per_expert else host
            tensors[name] = np.ascontiguousarray(spec.transform.to_hf(slot))
            weight_map[name] = names[k]
        if writer:
            save_file(tensors, os.path.join(path, names[k]), metadata={"format": "pt"})
        del tensors
    if writer:
        if n > 1:
            total = sum(t[4] for t in entries)
            n_params = sum(math.prod(t[1].hf_shape) for t in entries)
            write_json(os.path.join(path, INDEX_FILE),
                       {"metadata": {"total_parameters": n_params, "total_size": total},
                        "weight_map": dict(sorted(weight_map.items(), key=lambda kv: hf_order(kv[0])))})
        else:
            stale = os.path.join(path, INDEX_FILE)
            if os.path.exists(stale):
                os.remove(stale)
        dtypes = Counter()
        for name, spec, *_ in entries:
            dtypes[np.dtype(spec.dtype).name] += 1
        write_json(os.path.join(path, CONFIG_NAME), hf_config_dict(cfg, dtypes.most_common(1)[0][0], config_layout))
    return names + ([INDEX_FILE] if n > 1 else []) + [CONFIG_NAME]
