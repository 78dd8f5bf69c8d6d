"""Hugging Face checkpoints in and out: `load_hf_checkpoint` and `save_hf_checkpoint`.

One table, `HF_TABLE`, maps every parameter of our tree to the Hugging Face tensor(s) it comes from, with the
transform between the two layouts; import and export both read it. Our kernels are [in, out], torch weights
[out, in]; the decoder stack stores layer i at (repeat r, block position j) = divmod(i, period) with a leading
repeat axis, and each layer's experts are one [E, ...] array where the checkpoint has one tensor per expert
(`mlp.experts.{e}.{gate,up,down}_proj.weight`; transformers 5 fuses them only in memory and writes them per expert).

Import streams: tensor by tensor from a single `model.safetensors` or from the shards that
`model.safetensors.index.json` names, through `safetensors.safe_open` (memory-mapped). The model is built abstractly
(`nnx.eval_shape`) and every leaf is filled and placed (with its `NamedSharding` when a mesh is given) before the
next is read; a stacked leaf is assembled one repeat at a time on the device, so host memory peaks near the largest
group of tensors that form one leaf of one layer (a layer's experts), never the whole checkpoint. Export streams
too: shard by shard, fetching one (leaf, repeat) at a time.

MTP: transformers drops `mtp.*`; we keep it. When config.json has no `mtp_num_hidden_layers` key (the real
checkpoint), the depth is the number of `mtp.layers.{i}` present, 0 when there are none (HF-saved checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections import Counter
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import Execution

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
# A stacked leaf smaller than this is assembled on the host and placed once; a larger one one repeat at a time.
STACK_ON_HOST_BYTES = 256 * 2**20


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model its config.json describes (all problems listed)."""


# ====================================================================================================== the table
# Transforms between one HF tensor and its slot in our leaf (both directions, and the HF shape of a slot shape).

@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]


COPY = Transform("copy", lambda w: w, lambda w: w, lambda s: tuple(s))
LINEAR = Transform("transpose", lambda w: w.T, lambda w: w.T, lambda s: tuple(s[::-1]))  # [out, in] <-> [in, out]
CONV = Transform("conv",                                                              # [C, 1, K] <-> [K, C]
                 lambda w: w[:, 0, :].T, lambda w: w.T[:, None, :], lambda s: (s[1], 1, s[0]))

# (our path, HF name, transform). `{L}` / `{H}` stand for a decoder layer: ours `model.layers.blocks.{j}` (stacked
# over repeats) or `mtp.layers.{i}`; HF `model.layers.{i}` or `mtp.layers.{i}`. `{e}` marks a per-expert tensor:
# our [E, ...] leaf slot e is HF tensor e. The mixer and mlp parameter names never collide between the kinds.
HF_TABLE: list[tuple[str, str, Transform]] = [
    ("model.embed_tokens.embedding", "model.embed_tokens.weight", COPY),
    ("model.norm.weight", "model.norm.weight", COPY),
    ("lm_head.kernel", "lm_head.weight", LINEAR),
    ("mtp.fc.kernel", "mtp.fc.weight", LINEAR),
    ("mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_embedding.weight", COPY),
    ("mtp.pre_fc_norm_hidden.weight", "mtp.pre_fc_norm_hidden.weight", COPY),
    ("mtp.norm.weight", "mtp.norm.weight", COPY),
    ("{L}.input_layernorm.weight", "{H}.input_layernorm.weight", COPY),
    ("{L}.post_attention_layernorm.weight", "{H}.post_attention_layernorm.weight", COPY),
    # Gated DeltaNet (HF linear_attn)
    ("{L}.mixer.in_proj_qkvz.kernel", "{H}.linear_attn.in_proj_qkvz.weight", LINEAR),
    ("{L}.mixer.in_proj_ba.kernel", "{H}.linear_attn.in_proj_ba.weight", LINEAR),
    ("{L}.mixer.conv1d.kernel", "{H}.linear_attn.conv1d.weight", CONV),
    ("{L}.mixer.dt_bias", "{H}.linear_attn.dt_bias", COPY),
    ("{L}.mixer.A_log", "{H}.linear_attn.A_log", COPY),
    ("{L}.mixer.norm.weight", "{H}.linear_attn.norm.weight", COPY),
    ("{L}.mixer.out_proj.kernel", "{H}.linear_attn.out_proj.weight", LINEAR),
    # Gated attention (HF self_attn)
    *[(f"{{L}}.mixer.{p}_proj.{k}", f"{{H}}.self_attn.{p}_proj.{w}", LINEAR if k == "kernel" else COPY)
      for p in "qkvo" for k, w in (("kernel", "weight"), ("bias", "bias"))],
    ("{L}.mixer.q_norm.weight", "{H}.self_attn.q_norm.weight", COPY),
    ("{L}.mixer.k_norm.weight", "{H}.self_attn.k_norm.weight", COPY),
    # Sparse MoE
    ("{L}.mlp.gate.kernel", "{H}.mlp.gate.weight", LINEAR),
    *[(f"{{L}}.mlp.experts.{p}", f"{{H}}.mlp.experts.{{e}}.{p}.weight", LINEAR)
      for p in ("gate_proj", "up_proj", "down_proj")],
    *[(f"{{L}}.mlp.shared_expert.{p}.kernel", f"{{H}}.mlp.shared_expert.{p}.weight", LINEAR)
      for p in ("gate_proj", "up_proj", "down_proj")],
    ("{L}.mlp.shared_expert_gate.kernel", "{H}.mlp.shared_expert_gate.weight", LINEAR),
    # Dense MLP
    *[(f"{{L}}.mlp.{p}.kernel", f"{{H}}.mlp.{p}.weight", LINEAR) for p in ("gate_proj", "up_proj", "down_proj")],
]

_TOP_RULES = {ours: (hf, t) for ours, hf, t in HF_TABLE if not ours.startswith("{L}.")}
_LAYER_RULES = {ours[len("{L}."):]: (hf[len("{H}."):], t) for ours, hf, t in HF_TABLE if ours.startswith("{L}.")}
_STACK_RE = re.compile(r"^model\.layers\.blocks\.(\d+)\.(.+)$")
_MTP_LAYER_RE = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass
class LeafSpec:
    """One leaf of our tree and the HF tensors that fill it.

    hf_names[r][e]: r over the repeats of a stacked leaf (a single entry when not stacked), e over the experts of a
    per-expert leaf (a single entry otherwise). slot_shape: the shape of one (r, e) slot in our layout.
    """
    path: tuple
    shape: tuple
    dtype: Any
    stacked: bool
    per_expert: bool
    hf_names: list[list[str]]
    transform: Transform

    @property
    def key(self) -> str:
        return ".".join(str(p) for p in self.path)

    @property
    def slot_shape(self) -> tuple:
        return tuple(self.shape[int(self.stacked) + int(self.per_expert):])

    @property
    def hf_shape(self) -> tuple:
        return self.transform.hf_shape(self.slot_shape)

    def slots(self) -> Iterator[tuple[int, int, str]]:
        for r, row in enumerate(self.hf_names):
            for e, name in enumerate(row):
                yield r, e, name


def _layer_params(model) -> tuple[int, int]:
    stack = model.model.layers
    return stack.period, stack.repeats


def leaf_specs(model) -> list[LeafSpec]:
    """Every parameter of `model` (concrete or abstract) with its HF source tensors, in HF checkpoint order."""
    period, repeats = _layer_params(model)
    specs, unmapped = [], []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = ".".join(str(p) for p in path)
        value = var.get_value() if hasattr(var, "get_value") else var.value
        shape, dtype = tuple(value.shape), value.dtype
        if m := _STACK_RE.match(key):
            j, rest = int(m.group(1)), m.group(2)
            hf_prefixes, stacked = [f"model.layers.{r * period + j}" for r in range(repeats)], True
        elif m := _MTP_LAYER_RE.match(key):
            rest, hf_prefixes, stacked = m.group(2), [f"mtp.layers.{m.group(1)}"], False
        else:
            rest, hf_prefixes, stacked = None, None, False
        if rest is not None and rest in _LAYER_RULES:
            hf_rel, transform = _LAYER_RULES[rest]
            template = [f"{prefix}.{hf_rel}" for prefix in hf_prefixes]
        elif rest is None and key in _TOP_RULES:
            hf_rel, transform = _TOP_RULES[key]
            template = [hf_rel]
        else:
            unmapped.append(key)
            continue
        per_expert = "{e}" in hf_rel
        if per_expert:
            n_exp = shape[int(stacked)]
            names = [[t.replace("{e}", str(e)) for e in range(n_exp)] for t in template]
        else:
            names = [[t] for t in template]
        specs.append(LeafSpec(tuple(path), shape, dtype, stacked, per_expert, names, transform))
    if unmapped:
        raise NotImplementedError(f"hf_io.HF_TABLE has no entry for parameter(s) {unmapped}; extend the table")
    specs.sort(key=lambda s: _hf_order(s.hf_names[0][0]))
    return specs


def _hf_order(name: str):
    """Checkpoint order: embeddings, layers by index, final norm, lm_head, then MTP; natural order inside."""
    group = 0 if name.startswith("model.embed") else 1 if name.startswith("model.layers.") else \
        2 if name.startswith("model.") else 3 if name.startswith("lm_head") else 4
    return group, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ============================================================================================ safetensors reading

class SafetensorsReader:
    """The tensors of a checkpoint directory (one file, or the shards an index names), read lazily by name."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(self.path, SINGLE_FILE)):
            files, weight_map = [SINGLE_FILE], None
        else:
            raise FileNotFoundError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self._handles = {}
        self.file_of: dict[str, str] = {}
        self.shape: dict[str, tuple] = {}
        self.dtype: dict[str, str] = {}
        for fn in files:
            full = os.path.join(self.path, fn)
            if not os.path.exists(full):
                raise FileNotFoundError(f"{self.path}: shard {fn} named in {INDEX_FILE} is missing")
            handle = safe_open(full, framework="numpy")
            self._handles[fn] = handle
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name) != fn:
                    continue  # the index is authoritative (a tensor in a shard but not mapped there is ignored)
                sl = handle.get_slice(name)
                self.file_of[name] = fn
                self.shape[name] = tuple(sl.get_shape())
                self.dtype[name] = sl.get_dtype()
        if weight_map is not None:
            absent = sorted(n for n in weight_map if n not in self.file_of)
            if absent:
                raise CheckpointMismatchError(
                    f"{self.path}: {INDEX_FILE} maps {len(absent)} tensor(s) to shards that do not hold them: "
                    + ", ".join(f"{n} -> {weight_map[n]}" for n in absent[:20]))

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> np.ndarray:
        return self._handles[self.file_of[name]].get_tensor(name)

    def np_dtype(self, name: str) -> np.dtype:
        return _ST_DTYPES[self.dtype[name]]

    def close(self):
        for h in self._handles.values():
            close = getattr(h, "__exit__", None)
            if close:
                close(None, None, None)
        self._handles = {}


_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
              "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
              "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
              "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


# ================================================================================================= config in/out

def read_hf_config(path: str | os.PathLike, tensor_names: list[str] | None = None) -> Qwen3NextConfig:
    """config.json -> Qwen3NextConfig; without an `mtp_num_hidden_layers` key, the MTP depth is the number of
    `mtp.layers.{i}` among `tensor_names` (0 when none, or when tensor_names is None)."""
    cfg_path = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}")
    with open(cfg_path) as f:
        hf = json.load(f)
    try:
        cfg = Qwen3NextConfig.from_hf_dict(hf)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    if "mtp_num_hidden_layers" not in hf:
        depth = infer_mtp_depth(tensor_names or [])
        if depth != cfg.mtp_num_hidden_layers:
            cfg = cfg.replace(mtp_num_hidden_layers=depth)
    return cfg


def infer_mtp_depth(tensor_names) -> int:
    idx = [int(m.group(1)) for n in tensor_names if (m := re.match(r"^mtp\.layers\.(\d+)\.", n))]
    return max(idx) + 1 if idx else 0


def hf_config_dict(cfg: Qwen3NextConfig, dtype=None, layout: str = "5") -> dict:
    """What save_hf_checkpoint writes as config.json: transformers' keys (layout "5": rope in rope_parameters) plus
    `dtype` (layout "5") / `torch_dtype` (layout "4.57"), and `mtp_num_hidden_layers` so the depth reads back
    exactly (transformers ignores it)."""
    hf = cfg.to_hf_dict(layout)
    if dtype is not None:
        hf["dtype" if layout == "5" else "torch_dtype"] = jnp.dtype(dtype).name
    return dict(sorted(hf.items()))


# ====================================================================================================== import

def _leaf_shardings(state: nnx.State, mesh) -> dict[tuple, jax.sharding.Sharding]:
    """path -> NamedSharding of every leaf, from qwen3next_jax.sharding's logical-axis rules."""
    from qwen3next_jax.sharding import state_shardings
    shardings = state_shardings(state, mesh)
    return {path: (v.get_value() if hasattr(v, "get_value") else v.value)
            for path, v in nnx.to_flat_state(shardings)}


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
            full = jax.jit(lambda: jnp.zeros((R, *piece.shape), piece.dtype), out_shardings=sharding)()
        row_sharding = None
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec_row = jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:])
            row_sharding = jax.sharding.NamedSharding(sharding.mesh, spec_row)
        full = _set_row_donating(full, _place(piece, row_sharding), r)
        del piece
    return full


TIED_HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def check_checkpoint(reader: SafetensorsReader, specs: list[LeafSpec], path: str = "", ignored=()) -> None:
    """Raise CheckpointMismatchError listing every missing, unexpected or mis-shaped tensor (empty: all good).
    ignored: tensor names that may be present without being read."""
    expected = {}
    for spec in specs:
        for _, _, name in spec.slots():
            expected[name] = spec.hf_shape
    present = set(reader.names()) - set(ignored)
    missing = sorted((n for n in expected if n not in present), key=_hf_order)
    unexpected = sorted((n for n in present if n not in expected), key=_hf_order)
    misshaped = sorted((n for n in expected if n in present and reader.shape[n] != expected[n]), key=_hf_order)
    bad_dtype = sorted((n for n in expected if n in present and reader.dtype[n] not in _ST_DTYPES), key=_hf_order)
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
        lines.append(f"  {len(bad_dtype)} tensor(s) with an unsupported dtype:")
        lines += [f"    {n}  {reader.dtype[n]}" for n in bad_dtype]
    raise CheckpointMismatchError("\n".join(lines))


def _dominant_dtype(reader: SafetensorsReader):
    counts = Counter()
    for n in reader.names():
        counts[reader.dtype[n]] += math.prod(reader.shape[n])
    return _ST_DTYPES.get(counts.most_common(1)[0][0], np.dtype(np.float32)) if counts else np.dtype(np.float32)


def abstract_model(cfg: Qwen3NextConfig, execution: Execution):
    from qwen3next_jax.model import Qwen3NextForCausalLM
    return nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0), execution=execution))


def load_hf_checkpoint(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, *,
                       execution: Execution | None = None, progress: bool = False):
    """A Hugging Face Qwen3-Next checkpoint directory -> Qwen3NextForCausalLM.

    execution: how the model runs (qwen3next_jax.execution); its param_dtype is the dtype every parameter is cast
    to. None keeps each tensor's checkpoint dtype (bit for bit) and computes in the checkpoint's dtype.
    mesh: place each leaf with its NamedSharding (qwen3next_jax.sharding's logical-axis rules).
    Raises CheckpointMismatchError listing all missing / unexpected / mis-shaped tensors.
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
        shardings = _leaf_shardings(state, mesh) if mesh is not None else {}
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


def pure_dict_with(state: nnx.State, leaves: dict[tuple, Any]) -> dict:
    """nnx.to_pure_dict(state) with the leaf at each path (a tuple of keys) replaced by the given value."""
    pure = nnx.to_pure_dict(state)
    for path, value in leaves.items():
        d = pure
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return pure


# ====================================================================================================== export

def parse_size(size: int | str) -> int:
    """"5GB" -> 5 * 10**9 (HF's convention), "70KiB" -> 70 * 1024, ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 70KiB or an int of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


class _LeafFetcher:
    """Host copies of one (leaf, repeat) at a time, in our layout."""

    def __init__(self, model):
        self.values = {p: (v.get_value() if hasattr(v, "get_value") else v.value)
                       for p, v in nnx.to_flat_state(nnx.state(model))}
        self._key, self._host = None, None
        self.fetches = 0

    def get(self, spec: LeafSpec, r: int) -> np.ndarray:
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
    """Write `model` as a Hugging Face checkpoint: config.json, safetensors (per-expert tensors, MTP included), and
    model.safetensors.index.json when there is more than one shard. Each tensor keeps its parameter's dtype.
    Streams one shard at a time. Returns the written file names. Only process 0 writes (multi-host)."""
    path = os.fspath(path)
    limit = parse_size(max_shard_size)
    specs = leaf_specs(model)
    entries = []  # (hf name, spec, r, e, nbytes), in checkpoint order with each (leaf, repeat) contiguous
    for spec in specs:
        itemsize = np.dtype(spec.dtype).itemsize
        for r, e, name in spec.slots():
            entries.append((name, spec, r, e, math.prod(spec.hf_shape) * itemsize))
    # Sort by the (leaf, repeat)'s first name, then expert: the experts of one leaf of one layer stay together, so
    # each (leaf, repeat) is fetched from the device once.
    entries.sort(key=lambda t: (_hf_order(t[1].hf_names[t[2]][0]), t[3]))
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
    fetch = _LeafFetcher(model)
    weight_map = {}
    shard_iter = range(n)
    if progress:
        from tqdm import tqdm
        shard_iter = tqdm(shard_iter, desc=f"writing {os.path.basename(path.rstrip('/'))}", unit="shard")
    for k in shard_iter:
        tensors = {}
        for name, spec, r, e, _ in shards[k]:
            host = fetch.get(spec, r)
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
            with open(os.path.join(path, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_parameters": n_params, "total_size": total},
                           "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _hf_order(kv[0])))},
                          f, indent=2)
                f.write("\n")
        else:
            stale = os.path.join(path, INDEX_FILE)
            if os.path.exists(stale):
                os.remove(stale)
        dtypes = Counter()
        for name, spec, *_ in entries:
            dtypes[np.dtype(spec.dtype).name] += 1
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(hf_config_dict(model.config, dtypes.most_common(1)[0][0], config_layout), f, indent=2)
            f.write("\n")
    return names + ([INDEX_FILE] if n > 1 else []) + [CONFIG_NAME]


__all__ = ["CheckpointMismatchError", "HF_TABLE", "LeafSpec", "SafetensorsReader", "check_checkpoint",
           "hf_config_dict", "infer_mtp_depth", "leaf_specs", "load_hf_checkpoint", "parse_size",
           "read_hf_config", "save_hf_checkpoint"]
