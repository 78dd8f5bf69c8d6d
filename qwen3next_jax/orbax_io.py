"""Orbax checkpoints of a model's parameters: the params checkpoint, and the parameters inside a trainer run.

A params checkpoint (`hf-to-orbax` writes one, `load_orbax_params` restores it, the trainer's
`checkpoint.init_from_params` starts from it):

    DIR/config.json   the model config in transformers' config.json layout (qwen3next_jax.hf.save.hf_config_dict),
                      with `mtp_num_hidden_layers` and `dtype` (the parameters' dominant dtype)
    DIR/params/       Orbax StandardCheckpointer of nnx.to_pure_dict(nnx.state(model, nnx.Param)): the parameter
                      tree exactly as the model holds it (stacked decoder blocks [repeats, ...], [in, out] kernels,
                      [E, ...] experts, MTP), one array per leaf, each written from its shards

A trainer run (qwen3next_train.checkpoint): RUN/checkpoints/<step>/{state, data, config}. `state` is Orbax's
StandardSave of the train state, whose `params` subtree is nnx.state(model, nnx.Param) (one more level, `value`,
under each parameter); `config` is the resolved trainer config as JSON, its `model` section a Qwen3NextConfig.
`RunCheckpoint` reads only `config` and `state/params`: never the optimizer state.

`ParamArrays` reads the parameters of either for export, one (leaf, repeat) at a time, with tensorstore: it opens
each array through the name and storage format in Orbax's own metadata (orbax.checkpoint.type_handlers'
get_json_tspec_read: the spec Orbax's own restore opens; public in orbax-checkpoint 0.12.8 though marked deprecated,
with no public successor) and reads only the repeat asked for. So no devices are needed, nor the topology that
wrote the checkpoint, and no host holds more than one (leaf, repeat) of the parameters. Tensorstore decodes whole
stored chunks: each is one device's shard of a leaf as it was saved (or smaller), and since the layer axis is never
sharded a stacked leaf's chunks span all its repeats, so they are decoded once per repeat.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import Execution
from qwen3next_jax.hf.files import CONFIG_NAME, CheckpointError, CheckpointMismatchError, write_json
from qwen3next_jax.hf.load import abstract_model, leaf_shardings, pure_dict_with, read_hf_config
from qwen3next_jax.hf.names import LeafSpec
from qwen3next_jax.hf.save import hf_config_dict

PARAMS_DIR = "params"
RUN_CHECKPOINTS_DIR = "checkpoints"
# The trainer's item names (qwen3next_train.checkpoint.Checkpoints) and where the parameters sit in its state.
STATE_ITEM, CONFIG_ITEM, PARAMS_KEY = "state", "config", "params"
VARIABLE_VALUE = "value"  # an nnx.State saved as a pytree holds each parameter's array under this key


# =============================================================================================== params checkpoint

def _param_values(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def dominant_dtype(dtypes_and_sizes) -> str:
    """The dtype holding the most elements among (dtype, size) pairs."""
    sizes = Counter()
    for dtype, size in dtypes_and_sizes:
        sizes[jnp.dtype(dtype).name] += size
    return sizes.most_common(1)[0][0]


def save_orbax_params(model, directory: str | os.PathLike) -> None:
    """Write `model`'s parameters and config in the params-checkpoint layout (overwrites an existing params/).
    Each array is written from its shards, so a model on a mesh is never gathered."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    values = _param_values(model)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), values, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        dtype = dominant_dtype((x.dtype, x.size) for x in jax.tree.leaves(values))
        write_json(os.path.join(directory, CONFIG_NAME), hf_config_dict(model.config, dtype))


def load_orbax_params(directory: str | os.PathLike, dtype=None, mesh=None, execution: Execution | None = None):
    """A params checkpoint -> Qwen3NextForCausalLM, each array read straight into its shard when a mesh is given
    (qwen3next_jax.sharding rules; else onto the default device), whatever topology wrote it.

    dtype: the parameters' dtype; None: execution's param_dtype when an execution is given, else each array's
    stored dtype. execution: how the model runs (default: computing in the parameters' dominant dtype).
    Raises CheckpointMismatchError naming every array that is missing, unexpected, mis-shaped or not a float.
    """
    directory = _absolute(directory)
    if not epath.Path(directory, PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"{directory}: no {PARAMS_DIR}/ (not a params checkpoint)")
    cfg = read_hf_config(directory)
    arrays = ParamArrays(os.path.join(directory, PARAMS_DIR))
    if dtype is None and execution is not None:
        dtype = execution.params
    model_dtype = jnp.dtype(dtype).name if dtype is not None else arrays.dominant_dtype()
    if execution is None:
        execution = Execution(compute_dtype=model_dtype, param_dtype=model_dtype)
    model = abstract_model(cfg, dataclasses.replace(execution, param_dtype=model_dtype))
    state = nnx.state(model, nnx.Param)
    arrays.check(_abstract_leaves(state))
    shardings = leaf_shardings(state, mesh) if mesh is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {path: jax.ShapeDtypeStruct(leaf.shape, dtype if dtype is not None else arrays.meta(path).dtype,
                                         sharding=shardings.get(path, default))
              for path, leaf in _abstract_leaves(state).items()}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(directory, PARAMS_DIR), pure_dict_with(state, target))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def _absolute(path: str | os.PathLike) -> str:
    """An absolute path (Orbax's requirement) for a local one; a URI (gs://bucket/...) as it is."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def _abstract_leaves(state: nnx.State) -> dict[tuple, jax.ShapeDtypeStruct]:
    return {path: v.get_value() for path, v in nnx.to_flat_state(state)}


# ================================================================================================= the arrays

class ParamArrays:
    """The parameter arrays of an Orbax pytree checkpoint (a params checkpoint's params/, or a run step's state/
    with subtree ("params",)), by our parameter path; called as (spec, r) it reads one (leaf, repeat) to the host
    in spec.dtype (qwen3next_jax.hf.save.SliceSource)."""

    def __init__(self, directory: str | os.PathLike, subtree: tuple[str, ...] = ()):
        self.directory = epath.Path(_absolute(directory))
        try:
            meta = ocp.StandardCheckpointHandler().metadata(self.directory)
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"{self.directory}: not a readable Orbax checkpoint ({e})") from None
        tree = meta.tree
        for key in subtree:
            if not isinstance(tree, dict) or key not in tree:
                raise CheckpointError(f"{self.directory}: the checkpoint has no {'/'.join(subtree)} subtree")
            tree = tree[key]
        self.arrays: dict[tuple, ocp.metadata.ArrayMetadata] = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            if keys and keys[-1] == VARIABLE_VALUE:
                keys = keys[:-1]
            self.arrays[keys] = leaf
        self._use_zarr3 = meta.use_zarr3
        self._use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.directory)
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        self._open = (None, None)  # (path, tensorstore) of the leaf being read
        self._last = (None, None)  # ((path, r), host array) last read

    @staticmethod
    def _key(path: tuple) -> tuple:
        return tuple(str(p) for p in path)

    def meta(self, path: tuple):
        return self.arrays[self._key(path)]

    def dominant_dtype(self) -> str:
        return dominant_dtype((a.dtype, math.prod(a.shape)) for a in self.arrays.values())

    def check(self, expected: dict[tuple, jax.ShapeDtypeStruct]) -> None:
        """Raise CheckpointMismatchError naming every array missing, unexpected, mis-shaped or not a float."""
        want = {self._key(p): tuple(v.shape) for p, v in expected.items()}
        missing = sorted(k for k in want if k not in self.arrays)
        unexpected = sorted(k for k in self.arrays if k not in want)
        misshaped = sorted(k for k in want if k in self.arrays and tuple(self.arrays[k].shape) != want[k])
        not_float = sorted(k for k in want if k in self.arrays and
                           not jnp.issubdtype(self.arrays[k].dtype, jnp.floating))
        if not (missing or unexpected or misshaped or not_float):
            return
        lines = [f"Orbax checkpoint {self.directory} does not match the model its config describes:"]
        name = ".".join
        if missing:
            lines += [f"  {len(missing)} missing array(s):"] + [f"    {name(k)}  (expected shape {list(want[k])})"
                                                               for k in missing]
        if unexpected:
            lines += [f"  {len(unexpected)} unexpected array(s):"] + [
                f"    {name(k)}  (shape {list(self.arrays[k].shape)})" for k in unexpected]
        if misshaped:
            lines += [f"  {len(misshaped)} array(s) with the wrong shape:"] + [
                f"    {name(k)}  expected {list(want[k])}, found {list(self.arrays[k].shape)}" for k in misshaped]
        if not_float:
            lines += [f"  {len(not_float)} array(s) with a non-floating dtype:"] + [
                f"    {name(k)}  {np.dtype(self.arrays[k].dtype).name}" for k in not_float]
        raise CheckpointMismatchError("\n".join(lines))

    def __call__(self, spec: LeafSpec, r: int) -> np.ndarray:
        """Our-layout host array of repeat r of `spec`'s leaf (the whole leaf when not stacked), in spec.dtype; the
        last one is kept, as the writer asks for each expert of a (leaf, repeat) in turn."""
        if self._last[0] != (spec.path, r):
            self._last = (None, None)  # drop the previous one before reading the next
            self._last = ((spec.path, r), self.read(spec, r))
        return self._last[1]

    def read(self, spec: LeafSpec, r: int) -> np.ndarray:
        """__call__'s array, read from storage."""
        path, store = self._open
        name = self.meta(spec.path).name
        if path != spec.path:
            store = None  # let the previous leaf's store go before opening the next
            info = ocp.type_handlers.ParamInfo(name=name, parent_dir=self.directory, use_zarr3=self._use_zarr3,
                                               ts_context=self._context)
            tspec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
            store = self._ts(name, lambda: ts.open(tspec, open=True, context=self._context).result())
            self._open = (spec.path, store)
        part = store[r] if spec.stacked else store
        host = self._ts(name, lambda: part.read().result())
        return host if host.dtype == spec.dtype else host.astype(spec.dtype)

    def _ts(self, name: str, op):
        try:
            return op()
        except ValueError as e:  # tensorstore's errors (a missing or damaged file): name the array
            raise CheckpointError(f"{self.directory}: cannot read array {name} ({e})") from None


# ================================================================================================= trainer runs

@dataclasses.dataclass
class RunCheckpoint:
    """One complete checkpoint of a trainer run: its step, its config item and its parameters."""
    run_dir: str
    step: int
    config: dict  # the `config` item: the resolved trainer config the checkpoint was written with

    @property
    def model_config(self) -> Qwen3NextConfig:
        try:
            return Qwen3NextConfig.from_dict(dict(self.config["model"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.step_dir}/{CONFIG_ITEM}: no usable model config ({e})") from None

    @property
    def tokenizer(self) -> str:
        try:
            return self.config["data"]["tokenizer"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.step_dir}/{CONFIG_ITEM}: no data.tokenizer") from None

    @property
    def step_dir(self) -> str:
        return os.path.join(self.run_dir, RUN_CHECKPOINTS_DIR, str(self.step))

    def params(self) -> ParamArrays:
        return ParamArrays(os.path.join(self.step_dir, STATE_ITEM), subtree=(PARAMS_KEY,))


def _manager(run_dir: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), RUN_CHECKPOINTS_DIR), options=options)


def _require_run(run_dir: str) -> None:
    if not os.path.isdir(os.path.join(run_dir, RUN_CHECKPOINTS_DIR)):
        raise FileNotFoundError(f"{run_dir}: no {RUN_CHECKPOINTS_DIR}/ (not a trainer run directory)")


def open_run_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> RunCheckpoint:
    """The run's checkpoint at `step` (default: the newest complete one), with its config item read."""
    run_dir = os.path.abspath(os.fspath(run_dir))
    _require_run(run_dir)
    with _manager(run_dir) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint in {RUN_CHECKPOINTS_DIR}/")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint at step {step}; the run has steps {steps}")
        try:
            config = manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"{run_dir}: cannot read the {CONFIG_ITEM} item of step {step} ({e})") from None
    return RunCheckpoint(run_dir, step, dict(config[CONFIG_ITEM]))
