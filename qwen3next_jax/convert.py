"""Convert checkpoints between Hugging Face safetensors and Orbax.

    python -m qwen3next_jax.convert hf-to-orbax --hf HF_DIR --out ORBAX_DIR [--dtype bf16]
    python -m qwen3next_jax.convert orbax-to-hf --orbax ORBAX_DIR --out HF_DIR [--max-shard-size 5GB] [--dtype fp32]

The Orbax layout (a "params checkpoint"):

    ORBAX_DIR/config.json   the model config, transformers-5 config.json layout (hf_io.hf_config_dict), with
                            `mtp_num_hidden_layers` and `dtype`
    ORBAX_DIR/params/       orbax StandardCheckpointer of nnx.to_pure_dict(nnx.state(model, nnx.Param)): the
                            parameter tree exactly as the model holds it (stacked decoder blocks, [in, out] kernels,
                            [E, ...] experts, MTP), one array per leaf

`load_orbax_params(dir, dtype=None, mesh=None)` restores it straight into a model (each array read into its shard
when a mesh is given); a trainer initialises its train state's parameters from it. The trainer's own run
checkpoints (train/checkpoint.py: a CheckpointManager with items state/data/config) hold optimizer state too and
are a different thing; `--from-train-checkpoint` is not provided.

Both directions stream: HF tensors are read one leaf at a time (hf_io), Orbax writes and reads per array, and the HF
export writes one shard at a time. A tqdm bar shows progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from qwen3next_jax import hf_io
from qwen3next_jax.execution import Execution

DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "float32": jnp.float32,
          "f32": jnp.float32, "fp16": jnp.float16, "float16": jnp.float16}
PARAMS_DIR = "params"


def _dtype(name):
    if name is None:
        return None
    if name not in DTYPES:
        raise SystemExit(f"unknown --dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def _param_values(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _dominant_dtype(model) -> str:
    sizes = {}
    for leaf in jax.tree.leaves(_param_values(model)):
        sizes[jnp.dtype(leaf.dtype).name] = sizes.get(jnp.dtype(leaf.dtype).name, 0) + leaf.size
    return max(sizes, key=sizes.get)


def save_orbax_params(model, directory: str | os.PathLike) -> None:
    """Write `model`'s parameters and config in the layout above (overwrites an existing params/)."""
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), _param_values(model), force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, hf_io.CONFIG_NAME), "w") as f:
            json.dump(hf_io.hf_config_dict(model.config, _dominant_dtype(model)), f, indent=2)
            f.write("\n")


def load_orbax_params(directory: str | os.PathLike, dtype=None, mesh=None, execution: Execution | None = None):
    """A params checkpoint -> Qwen3NextForCausalLM. dtype None keeps the stored dtypes; mesh places each array in
    its shard (qwen3next_jax.sharding rules); execution: how the model runs (default: in the parameters' dtype)."""
    directory = os.path.abspath(os.fspath(directory))
    with open(os.path.join(directory, hf_io.CONFIG_NAME)) as f:
        hf = json.load(f)
    cfg = hf_io.Qwen3NextConfig.from_hf_dict(hf)
    stored = jnp.dtype(hf.get("dtype", "float32"))
    param_dtype = jnp.dtype(dtype if dtype is not None else stored).name
    if execution is None:
        execution = Execution(compute_dtype=param_dtype, param_dtype=param_dtype)
    model = hf_io.abstract_model(cfg, dataclasses.replace(execution, param_dtype=param_dtype))
    state = nnx.state(model, nnx.Param)
    params_dir = os.path.join(directory, PARAMS_DIR)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir)
        tree_meta = getattr(meta, "item_metadata", meta)
        tree_meta = getattr(tree_meta, "tree", tree_meta)
        stored_leaves = {tuple(str(k) for k in path): leaf for path, leaf in _flat(tree_meta)}
        shardings = hf_io._leaf_shardings(state, mesh) if mesh is not None else {}
        target = {}
        for path, var in nnx.to_flat_state(state):
            value = var.get_value()
            key = tuple(str(k) for k in path)
            leaf_meta = stored_leaves.get(key)
            if leaf_meta is None:
                raise hf_io.CheckpointMismatchError(f"{params_dir}: no array for parameter {'.'.join(key)}")
            if tuple(leaf_meta.shape) != tuple(value.shape):
                raise hf_io.CheckpointMismatchError(
                    f"{params_dir}: {'.'.join(key)} has shape {list(leaf_meta.shape)}, the model expects "
                    f"{list(value.shape)}")
            leaf_dtype = jnp.dtype(dtype) if dtype is not None else leaf_meta.dtype
            sharding = shardings.get(path) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target[path] = jax.ShapeDtypeStruct(value.shape, leaf_dtype, sharding=sharding)
        extra = sorted(".".join(k) for k in stored_leaves if k not in {tuple(str(p) for p in t) for t in target})
        if extra:
            raise hf_io.CheckpointMismatchError(f"{params_dir}: arrays with no parameter: {extra}")
        restored = ckptr.restore(params_dir, hf_io.pure_dict_with(state, target))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, prefix + (k,))
    elif isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        for i, v in enumerate(tree):
            yield from _flat(v, prefix + (i,))
    else:
        yield prefix, tree


def hf_to_orbax(hf_path, out, dtype=None, progress=True):
    t0 = time.time()
    dtype = _dtype(dtype) if isinstance(dtype, str) else dtype
    execution = None if dtype is None else Execution(compute_dtype=jnp.dtype(dtype).name,
                                                     param_dtype=jnp.dtype(dtype).name)
    model = hf_io.load_hf_checkpoint(hf_path, execution=execution, progress=progress)
    save_orbax_params(model, out)
    n = sum(x.size for x in jax.tree.leaves(_param_values(model)))
    print(f"wrote {out}: {n:,} parameters ({_dominant_dtype(model)}) in {time.time() - t0:.1f}s", file=sys.stderr)
    return model


def orbax_to_hf(orbax_dir, out, max_shard_size=hf_io.DEFAULT_MAX_SHARD_SIZE, dtype=None, progress=True):
    t0 = time.time()
    model = load_orbax_params(orbax_dir, dtype=_dtype(dtype) if isinstance(dtype, str) else dtype)
    files = hf_io.save_hf_checkpoint(model, out, max_shard_size=max_shard_size, progress=progress)
    print(f"wrote {out}: {len(files)} files in {time.time() - t0:.1f}s", file=sys.stderr)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwen3next_jax.convert", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-orbax", help="Hugging Face safetensors directory -> Orbax params checkpoint")
    a.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    a.add_argument("--out", required=True, help="output directory (config.json + params/)")
    a.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast parameters (default: keep)")
    b = sub.add_parser("orbax-to-hf", help="Orbax params checkpoint -> Hugging Face safetensors directory")
    b.add_argument("--orbax", required=True, help="directory written by hf-to-orbax / save_orbax_params")
    b.add_argument("--out", required=True)
    b.add_argument("--max-shard-size", default=hf_io.DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB (default), 500MB")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast parameters (default: keep)")
    b.add_argument("--no-progress", action="store_true")
    a.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "hf-to-orbax":
        hf_to_orbax(args.hf, args.out, args.dtype, progress=not args.no_progress)
    else:
        orbax_to_hf(args.orbax, args.out, args.max_shard_size, args.dtype, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
