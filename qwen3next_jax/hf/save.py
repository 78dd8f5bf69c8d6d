"""Export: parameters -> a Hugging Face checkpoint directory (`save_hf_checkpoint`, `write_hf_checkpoint`).

config.json (transformers' keys), safetensors shards of at most `max_shard_size` (per-expert tensors, MTP included)
and `model.safetensors.index.json` when there is more than one shard. The writer streams: it asks its source for
one (leaf, repeat) at a time, in checkpoint order, and holds one shard's tensors until that shard is written. The
source is the model on its devices (`save_hf_checkpoint`), any other reader of our-layout slices, such as an Orbax
checkpoint read with tensorstore (qwen3next_jax.orbax_io), or random values (qwen3next_jax.hf.synthetic). The
steps are separate so that shards can be written by several processes: `plan_shards` (names, shapes, files; no
data), `write_shard`, `write_metadata` (index and config.json).
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor of the checkpoint: slot (r, e) of `spec`, `nbytes` in the spec's dtype."""
    name: str
    spec: LeafSpec
    r: int
    e: int
    nbytes: int


@dataclasses.dataclass
class ShardPlan:
    """Which tensors go to which file: `shards[k]` holds the entries of `files[k]`, in checkpoint order."""
    shards: list[list[Entry]]
    files: list[str]

    @property
    def entries(self) -> list[Entry]:
        return [entry for shard in self.shards for entry in shard]

    @property
    def checkpoint_files(self) -> list[str]:
        """Every file of the checkpoint: the tensor files, the index when there are several, config.json."""
        return self.files + ([INDEX_FILE] if len(self.files) > 1 else []) + [CONFIG_NAME]

    @property
    def parameters(self) -> int:
        return sum(math.prod(t.spec.hf_shape) for t in self.entries)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.entries)


def plan_shards(specs: list[LeafSpec], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> ShardPlan:
    """The tensors `specs` describe, in checkpoint order, cut into files of at most `max_shard_size` bytes (a
    tensor larger than that gets a file of its own). Needs only shapes and dtypes: no data is read."""
    limit = parse_size(max_shard_size)
    entries = [Entry(name, spec, r, e, math.prod(spec.hf_shape) * np.dtype(spec.dtype).itemsize)
               for spec in specs for r, e, name in spec.slots()]
    # Sort by the (leaf, repeat)'s first name, then expert: the experts of one leaf of one layer stay together, so
    # each (leaf, repeat) is fetched once.
    entries.sort(key=lambda t: (hf_order(t.spec.hf_names[t.r][0]), t.e))
    shards, current, size = [], [], 0
    for entry in entries:
        if current and size + entry.nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current:
        shards.append(current)
    n = len(shards)
    return ShardPlan(shards, [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                                                           for k in range(n)])


def write_shard(plan: ShardPlan, k: int, fetch: SliceSource, path: str | os.PathLike) -> None:
    """Writes file k of `plan` under `path`, its tensors read through `fetch`; only process 0 writes."""
    tensors = {}
    for t in plan.shards[k]:
        host = fetch(t.spec, t.r)
        slot = host[t.e] if t.spec.per_expert else host
        tensors[t.name] = np.ascontiguousarray(t.spec.transform.to_hf(slot))
    if jax.process_index() == 0:
        save_file(tensors, os.path.join(os.fspath(path), plan.files[k]), metadata={"format": "pt"})


def write_metadata(plan: ShardPlan, cfg: Qwen3NextConfig, path: str | os.PathLike, config_layout: str = "5"
                   ) -> None:
    """The index (when there is more than one file; a stale one is removed) and config.json of `plan`'s checkpoint,
    config.json's dtype the one most tensors have."""
    path = os.fspath(path)
    if len(plan.files) > 1:
        weight_map = {t.name: plan.files[k] for k, shard in enumerate(plan.shards) for t in shard}
        write_json(os.path.join(path, INDEX_FILE),
                   {"metadata": {"total_parameters": plan.parameters, "total_size": plan.nbytes},
                    "weight_map": dict(sorted(weight_map.items(), key=lambda kv: hf_order(kv[0])))})
    elif os.path.exists(os.path.join(path, INDEX_FILE)):
        os.remove(os.path.join(path, INDEX_FILE))
    dtypes = Counter(np.dtype(t.spec.dtype).name for t in plan.entries)
    write_json(os.path.join(path, CONFIG_NAME), hf_config_dict(cfg, dtypes.most_common(1)[0][0], config_layout))


def write_hf_checkpoint(specs: list[LeafSpec], fetch: SliceSource, cfg: Qwen3NextConfig, path: str | os.PathLike,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, *, config_layout: str = "5",
                        progress: bool = False) -> list[str]:
    """Write the leaves `specs` describe, read through `fetch` one (leaf, repeat) at a time, as the checkpoint of a
    model with config `cfg`: each tensor in its spec's dtype. Returns the written file names."""
    plan = plan_shards(specs, max_shard_size)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    shard_iter = range(len(plan.files))
    if progress:
        from tqdm import tqdm
        shard_iter = tqdm(shard_iter, desc=f"writing {os.path.basename(os.fspath(path).rstrip('/'))}", unit="shard")
    for k in shard_iter:
        write_shard(plan, k, fetch, path)
    if writer:
        write_metadata(plan, cfg, path, config_layout)
    return plan.checkpoint_files
