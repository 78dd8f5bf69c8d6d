"""Import: a Hugging Face checkpoint directory -> Qwen3NextForCausalLM (`load_hf_checkpoint`).

Streams tensor by tensor: the model is built abstractly (`nnx.eval_shape`) and every leaf is filled and placed (with
its `NamedSharding` when a mesh is given) before the next is read; a stacked leaf is assembled one repeat at a time
on the device, so host memory peaks near the largest group of tensors that form one leaf of one layer (a layer's
experts), never the whole checkpoint.

MTP: transformers drops `mtp.*`; we keep it. When config.json has no `mtp_num_hidden_layers` key (the real
checkpoint), the depth is the number of `mtp.layers.{i}` present, 0 when there are none (HF-saved checkpoints).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import Execution
from qwen3next_jax.hf.files import CONFIG_NAME, CheckpointError, CheckpointMismatchError, read_json
from qwen3next_jax.hf.names import EMBEDDING, TIED_HEAD, LeafSpec, hf_order, leaf_specs
from qwen3next_jax.hf.safetensors import FLOAT_DTYPES, SafetensorsReader

# A stacked leaf smaller than this is assembled on the host and placed once; a larger one one repeat at a time.
STACK_ON_HOST_BYTES = 256 * 2**20


def read_hf_config(path: str | os.PathLike, tensor_names: list[str] | None = None) -> Qwen3NextConfig:
    """config.json -> Qwen3NextConfig; without an `mtp_num_hidden_layers` key, the MTP depth is the number of
    `mtp.layers.{i}` among `tensor_names` (0 when none, or when tensor_names is None)."""
    cfg_path = os.path.join(os.fspath(path), CONFIG_NAME)
    if not epath.Path(cfg_path).exists():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}")
    hf = read_json(cfg_path)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object of config keys, found {type(hf).__name__}")
    try:
        cfg = Qwen3NextConfig.from_hf_dict(hf)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    if "mtp_num_hidden_layers" not in hf:
        depth = infer_mtp_depth(tensor_names or [])
        if depth != cfg.mtp_num_hidden_layers:
            cfg = cfg.replace(mtp_num_hidden_layers=depth)
    return cfg


def infer_mtp_depth(tensor_names) -> int:
    idx = [int(m.group(1)) for n in tensor_names if (m := re.match(r"^mtp\.layers\.(\d+)\.", n))]
    return max(idx) + 1 if idx else 0


def abstract_model(cfg: Qwen3NextConfig, execution: Execution):
    """The model with abstract (shape and dtype only) parameters: the tree that import and export walk."""
    from qwen3next_jax.model import Qwen3NextForCausalLM
    return nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0), execution=execution))


def leaf_shardings(state: nnx.State, mesh) -> dict[tuple, jax.sharding.Sharding]:
    """path -> NamedSharding of every leaf, from qwen3next_jax.sharding's logical-axis rules."""
    from qwen3next_jax.sharding import state_shardings
    shardings = state_shardings(state, mesh)
    return {path: v.get_value() for path, v in nnx.to_flat_state(shardings)}


def pure_dict_with(state: nnx.State, leaves: dict[tuple, Any]) -> dict:
    """nnx.to_pure_dict(state) with the leaf at each path (a tuple of keys) replaced by the given value."""
    pure = nnx.to_pure_dict(state)
    for path, value in leaves.items():
        d = pure
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return pure


def check_checkpoint(reader: SafetensorsReader, specs: list[LeafSpec], path: str = "", ignored=()) -> None:
    """Raise CheckpointMismatchError listing every missing, unexpected, mis-shaped or non-float tensor (empty: all
    good). ignored: tensor names that may be present without being read."""
    expected = {}
    for spec in specs:
        for _, _, name in spec.slots():
            expected[name] = spec.hf_shape
    present = set(reader.names()) - set(ignored)
    missing = sorted((n for n in expected if n not in present), key=hf_order)
    unexpected = sorted((n for n in present if n not in expected), key=hf_order)
    misshaped = sorted((n for n in expected if n in present and reader.shape[n] != expected[n]), key=hf_order)
    bad_dtype = sorted((n for n in expected if n in present and reader.dtype[n] not in FLOAT_DTYPES), key=hf_order)
    if not (missing or unexpected or misshaped or bad_dtype):
        return
    lines = [f"checkpoint {path or reader.path} does not match the model its {CONFIG_NAME} describes:"]
    if missing:
        lines.append(f"  {len(missing)} missing tensor(s):")
        lines += [f"    {n}  (expected shape {list(expected[n])})" for n in missing]
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected tensor(s):")
        lines += [f"    {n}  (shape {list(reader.shape[n])})" for n in unexpected]
    if misshaped:
        lines.append(f"  {len(misshaped)} tensor(s) with the wrong shape:")
        lines += [f"    {n}  expected {list(expected[n])}, found {list(reader.shape[n])}" for n in misshaped]
    if bad_dtype:
        lines.append(f"  {len(bad_dtype)} tensor(s) stored as a non-floating dtype (parameters must be one of "
                     f"{', '.join(FLOAT_DTYPES)}):")
        lines += [f"    {n}  {reader.dtype[n]}  (in {reader.file_of[n]})" for n in bad_dtype]
    raise CheckpointMismatchError("\n".join(lines))


def _dominant_dtype(reader: SafetensorsReader) -> np.dtype:
    counts = Counter()
    for n in reader.names():
        counts[reader.dtype[n]] += math.prod(reader.shape[n])
    return FLOAT_DTYPES.get(counts.most_common(1)[0][0], np.dtype(np.float32)) if counts else np.dtype(np.float32)


def _place(host: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _set_row(full, piece, r):
    return jax.lax.dynamic_update_index_in_dim(full, piece, r, 0)


_set_row_donating = jax.jit(_set_row, donate_argnums=0)


def _read_slot_group(reader: SafetensorsReader, spec: LeafSpec, r: int, dtype) -> np.ndarray:
    """Our-layout host array of repeat r of `spec` (all experts of that layer when per-expert), cast to dtype."""
    row = spec.hf_names[r]
    if not spec.per_expert:
        w = spec.transform.to_ours(reader.get(row[0]))
        return np.ascontiguousarray(w if dtype is None else w.astype(dtype))
    out = None
    for e, name in enumerate(row):
        w = spec.transform.to_ours(reader.get(name))
        if out is None:
            out = np.empty((len(row), *w.shape), dtype or w.dtype)
        out[e] = w
    return out


def _load_leaf(reader: SafetensorsReader, spec: LeafSpec, dtype, sharding) -> jax.Array:
    if not spec.stacked:
        return _place(_read_slot_group(reader, spec, 0, dtype), sharding)
    R = len(spec.hf_names)
    nbytes = math.prod(spec.shape) * np.dtype(dtype or reader.np_dtype(spec.hf_names[0][0])).itemsize
    if nbytes <= STACK_ON_HOST_BYTES or R == 1:
        host = None
        for r in range(R):
            piece = _read_slot_group(reader, spec, r, dtype)
            if host is None:
                host = np.empty((R, *piece.shape), piece.dtype)
            host[r] = piece
        return _place(host, sharding)
    # Large stacked leaf: build it on the device one repeat at a time; host memory holds one repeat.
    full = None
    for r in range(R):
        piece = _read_slot_group(reader, spec, r, dtype)
        if full is None:
            shape, dt = (R, *piece.shape), piece.dtype
            full = jax.jit(lambda: jnp.zeros(shape, dt), out_shardings=sharding)()
        row_sharding = None
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec_row = jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:])
            row_sharding = jax.sharding.NamedSharding(sharding.mesh, spec_row)
        full = _set_row_donating(full, _place(piece, row_sharding), r)
        del piece
    return full


def load_hf_checkpoint(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, *,
                       execution: Execution | None = None, progress: bool = False):
    """A Hugging Face Qwen3-Next checkpoint directory -> Qwen3NextForCausalLM.

    execution: how the model runs (qwen3next_jax.execution); its param_dtype is the dtype every parameter is cast
    to. None keeps each tensor's checkpoint dtype (bit for bit) and computes in the checkpoint's dtype.
    mesh: place each leaf with its NamedSharding (qwen3next_jax.sharding's logical-axis rules).
    Raises CheckpointMismatchError listing all missing / unexpected / mis-shaped / non-float tensors, and
    CheckpointError naming a config.json, index or safetensors file that cannot be read.
    """
    path = os.fspath(path)
    reader = SafetensorsReader(path)
    try:
        cfg = read_hf_config(path, reader.names())
        cast = None if execution is None else np.dtype(execution.params)
        if execution is None:
            stored = jnp.dtype(_dominant_dtype(reader)).name
            execution = Execution(compute_dtype=stored, param_dtype=stored)
        model = abstract_model(cfg, execution)
        specs = leaf_specs(model)
        # A tied checkpoint may still carry lm_head.weight; transformers ties it to the embedding and ignores it.
        tied_head = cfg.tie_word_embeddings and TIED_HEAD in reader.names()
        check_checkpoint(reader, specs, path, ignored=(TIED_HEAD,) if tied_head else ())
        if tied_head and not np.array_equal(reader.get(TIED_HEAD), reader.get(EMBEDDING)):
            warnings.warn(f"{path}: tie_word_embeddings is true but {TIED_HEAD} differs from {EMBEDDING}; like "
                          f"transformers, the model uses the embedding and ignores {TIED_HEAD}", stacklevel=2)
        state = nnx.state(model)
        shardings = leaf_shardings(state, mesh) if mesh is not None else {}
        values = {}
        it = specs
        if progress:
            from tqdm import tqdm
            it = tqdm(specs, desc=f"loading {os.path.basename(path.rstrip('/'))}", unit="leaf")
        for spec in it:
            values[spec.path] = _load_leaf(reader, spec, cast, shardings.get(spec.path))
    finally:
        reader.close()
    nnx.replace_by_pure_dict(state, pure_dict_with(state, values))
    nnx.update(model, state)
    return model
