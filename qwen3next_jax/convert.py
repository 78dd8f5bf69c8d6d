"""Convert checkpoints: Hugging Face safetensors <-> Orbax params checkpoints, and trained models out to Hugging Face.

    qwen3next-convert hf-to-orbax --hf HF_DIR --out ORBAX_DIR [--dtype bf16] [--mesh fsdp=8]
    qwen3next-convert orbax-to-hf --orbax ORBAX_DIR --out HF_DIR [--max-shard-size 5GB] [--dtype fp32]
    qwen3next-convert train-to-hf --run RUN_DIR [--step N] --out HF_DIR [--dtype bf16|fp32] [--max-shard-size 5GB]

(`python -m qwen3next_jax.convert` is the same command.) The arguments are checked before anything is loaded: a bad
one ends the command with one message naming it and exit status 2; a checkpoint that turns out unreadable ends it
with one message naming the file and exit status 1.

hf-to-orbax reads the HF tensors one leaf at a time and places each leaf in its shards on a mesh (default: every
device on the fsdp axis), so no device holds the whole model, and Orbax writes each array from its shards. The
params-checkpoint layout is described in qwen3next_jax.orbax_io; `load_orbax_params` restores one.

orbax-to-hf and train-to-hf need no devices: they read the Orbax arrays one (leaf, repeat) at a time on the host
with tensorstore (orbax_io.ParamArrays) and write one safetensors shard at a time. Peak host memory is one output
shard (--max-shard-size) + one (leaf, repeat) in its stored dtype (and its cast, with --dtype) + the stored chunks
being decoded (each at most one device's shard of that leaf as the trainer saved it). At 80B-A3B the largest
(leaf, repeat) is one layer's 512 experts of one projection, [512, 2048, 512]: 2.1 GB in fp32.

train-to-hf writes the parameters of the run's newest complete checkpoint (or of --step N) in their stored dtype (the
trainer's param_dtype) or --dtype, MTP included, with the model config from the checkpoint's own `config` item; then
the run's tokenizer (data.tokenizer: a tokenizer.json path is copied with its siblings, "bytes" gets a byte-level
tokenizer.json, see qwen3next_jax.hf.tokenizer) and a generation_config.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax.execution import Execution
from qwen3next_jax.hf import tokenizer as hf_tokenizer
from qwen3next_jax.hf.files import CONFIG_NAME, INDEX_FILE, SINGLE_FILE, CheckpointError
from qwen3next_jax.hf.load import abstract_model, load_hf_checkpoint, read_hf_config
from qwen3next_jax.hf.names import leaf_specs
from qwen3next_jax.hf.save import DEFAULT_MAX_SHARD_SIZE, parse_size, write_hf_checkpoint
from qwen3next_jax.orbax_io import (PARAMS_DIR, ParamArrays, load_orbax_params, open_run_checkpoint,
                                    save_orbax_params)

DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "float32": jnp.float32,
          "f32": jnp.float32, "fp16": jnp.float16, "float16": jnp.float16}
DEFAULT_MESH = "fsdp=-1"


class ArgumentError(ValueError):
    """A command-line argument that cannot work; the message names it."""


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=4,expert=2" -> {"fsdp": 4, "expert": 2} (qwen3next_jax.sharding.make_mesh's axis sizes)."""
    sizes = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        axis, sep, size = item.partition("=")
        if not sep or not size.strip().lstrip("-").isdigit():
            raise ArgumentError(f"--mesh {text!r}: write axis=size pairs, e.g. fsdp=8 or fsdp=4,expert=2")
        sizes[axis.strip()] = int(size)
    return sizes


def make_mesh_arg(text: str):
    from qwen3next_jax.sharding import make_mesh
    try:
        return make_mesh(**parse_mesh(text))
    except ValueError as e:
        raise ArgumentError(f"--mesh {text!r}: {e}") from None


# ================================================================================================== conversions

def hf_to_orbax(hf_path, out, dtype=None, mesh=None, progress=True):
    """A Hugging Face checkpoint -> a params checkpoint at `out`; each leaf placed in its shards on `mesh`."""
    t0 = time.time()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    execution = None if dtype is None else Execution(compute_dtype=jnp.dtype(dtype).name,
                                                     param_dtype=jnp.dtype(dtype).name)
    model = load_hf_checkpoint(hf_path, mesh=mesh, execution=execution, progress=progress)
    save_orbax_params(model, out)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    print(f"wrote {out}: {sum(x.size for x in leaves):,} parameters in {time.time() - t0:.1f}s", file=sys.stderr)
    return model


def write_hf_from_arrays(arrays: ParamArrays, cfg, out, dtype=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                         progress=True) -> list[str]:
    """The parameters in an Orbax checkpoint (`arrays`) of a model with config `cfg` -> a Hugging Face checkpoint,
    streamed one (leaf, repeat) at a time; dtype None keeps each array's stored dtype."""
    model_dtype = jnp.dtype(dtype).name if dtype is not None else arrays.dominant_dtype()
    model = abstract_model(cfg, Execution(compute_dtype=model_dtype, param_dtype=model_dtype))
    arrays.check({p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})
    specs = leaf_specs(model)
    if dtype is None:
        specs = [dataclasses.replace(s, dtype=arrays.meta(s.path).dtype) for s in specs]
    return write_hf_checkpoint(specs, arrays, cfg, out, max_shard_size, progress=progress)


def orbax_to_hf(orbax_dir, out, max_shard_size=DEFAULT_MAX_SHARD_SIZE, dtype=None, progress=True) -> list[str]:
    t0 = time.time()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    cfg = read_hf_config(orbax_dir)
    files = write_hf_from_arrays(ParamArrays(os.path.join(orbax_dir, PARAMS_DIR)), cfg, out, dtype, max_shard_size,
                                 progress)
    print(f"wrote {out}: {len(files)} files in {time.time() - t0:.1f}s", file=sys.stderr)
    return files


def train_to_hf(run_dir, out, step=None, dtype=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                progress=True) -> list[str]:
    """A trainer run's checkpoint -> a Hugging Face directory as transformers writes one: config.json, safetensors
    (+ index), the run's tokenizer files and generation_config.json. Returns the written file names."""
    t0 = time.time()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    ckpt = open_run_checkpoint(run_dir, step)
    cfg = ckpt.model_config
    tokenizer_json, eos_id = _run_tokenizer(ckpt)
    files = write_hf_from_arrays(ckpt.params(), cfg, out, dtype, max_shard_size, progress)
    if jax.process_index() == 0:
        if tokenizer_json is None:
            files += hf_tokenizer.write_byte_tokenizer(out, eos_id, cfg.max_position_embeddings)
        else:
            files += hf_tokenizer.copy_tokenizer(tokenizer_json, out)
        files.append(hf_tokenizer.write_generation_config(out, cfg, eos_id))
    print(f"wrote {out} from step {ckpt.step} of {ckpt.run_dir}: {len(files)} files in {time.time() - t0:.1f}s",
          file=sys.stderr)
    return files


def _run_tokenizer(ckpt) -> tuple[str | None, int | None]:
    """(tokenizer.json path or None for the byte tokenizer, the end-of-document id the run trained with), read the
    way the trainer reads data.tokenizer (qwen3next_train.data.make_tokenizer)."""
    from qwen3next_train.data import make_tokenizer

    spec = ckpt.tokenizer
    if spec != "bytes" and not os.path.isfile(spec):
        raise ArgumentError(f"the run's data.tokenizer {spec!r} (step {ckpt.step}) is not a file here; run the "
                            f"command from the directory the run was started in, or where that file is")
    try:
        tok = make_tokenizer(spec, ckpt.model_config.eos_token_id)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types for a bad file
        raise ArgumentError(f"the run's data.tokenizer {spec!r} cannot be read ({e})") from None
    return (None if spec == "bytes" else spec), tok.eos_id


# ==================================================================================================== the command

def _check_dir(path: str, flag: str, *, must_hold: tuple[str, ...] = (), any_of: tuple[str, ...] = ()) -> None:
    if not os.path.isdir(path):
        raise ArgumentError(f"{flag} {path}: {'not a directory' if os.path.exists(path) else 'does not exist'}")
    for name in must_hold:
        if not os.path.exists(os.path.join(path, name)):
            raise ArgumentError(f"{flag} {path}: has no {name}")
    if any_of and not any(os.path.exists(os.path.join(path, name)) for name in any_of):
        raise ArgumentError(f"{flag} {path}: has neither {' nor '.join(any_of)}")


def _check_out(out: str, source: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ArgumentError(f"--out {out}: exists and is not a directory")
    if os.path.abspath(out) == os.path.abspath(source):
        raise ArgumentError(f"--out {out}: is the directory being read")


def validate(args) -> dict:
    """Every check that needs no checkpoint loaded; returns the parsed values (mesh, max_shard_size, run)."""
    parsed = {}
    if getattr(args, "max_shard_size", None) is not None:
        try:
            parsed["max_shard_size"] = parse_size(args.max_shard_size)
        except ValueError as e:
            raise ArgumentError(f"--max-shard-size: {e}") from None
    if args.cmd == "hf-to-orbax":
        _check_dir(args.hf, "--hf", must_hold=(CONFIG_NAME,), any_of=(SINGLE_FILE, INDEX_FILE))
        _check_out(args.out, args.hf)
        parsed["mesh"] = make_mesh_arg(args.mesh)
    elif args.cmd == "orbax-to-hf":
        _check_dir(args.orbax, "--orbax", must_hold=(CONFIG_NAME, PARAMS_DIR))
        _check_out(args.out, args.orbax)
    else:
        _check_dir(args.run, "--run")
        _check_out(args.out, args.run)
        try:
            parsed["run"] = open_run_checkpoint(args.run, args.step)
        except (FileNotFoundError, CheckpointError) as e:
            raise ArgumentError(f"--run: {e}") from None
        _run_tokenizer(parsed["run"])
    return parsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen3next-convert", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-orbax", help="Hugging Face safetensors directory -> Orbax params checkpoint")
    a.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    a.add_argument("--out", required=True, help="output directory (config.json + params/)")
    a.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast parameters (default: keep)")
    a.add_argument("--mesh", default=DEFAULT_MESH,
                   help=f"devices per mesh axis the parameters are sharded over, e.g. fsdp=8 or fsdp=4,expert=2 "
                        f"(default {DEFAULT_MESH}: all devices on fsdp)")
    b = sub.add_parser("orbax-to-hf", help="Orbax params checkpoint -> Hugging Face safetensors directory")
    b.add_argument("--orbax", required=True, help="directory written by hf-to-orbax / save_orbax_params")
    b.add_argument("--out", required=True)
    c = sub.add_parser("train-to-hf", help="a trainer run's checkpoint -> Hugging Face directory (with tokenizer)")
    c.add_argument("--run", required=True, help="the run directory (out_dir/name, holding checkpoints/)")
    c.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest complete one)")
    c.add_argument("--out", required=True)
    for p in (b, c):
        p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB (default), 500MB")
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="cast parameters (default: keep the stored dtype)")
    for p in (a, b, c):
        p.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        parsed = validate(args)
    except ArgumentError as e:
        ap.error(str(e))  # exits with status 2
    progress = not args.no_progress
    try:
        if args.cmd == "hf-to-orbax":
            hf_to_orbax(args.hf, args.out, args.dtype, parsed["mesh"], progress=progress)
        elif args.cmd == "orbax-to-hf":
            orbax_to_hf(args.orbax, args.out, parsed["max_shard_size"], args.dtype, progress=progress)
        else:
            train_to_hf(args.run, args.out, parsed["run"].step, args.dtype, parsed["max_shard_size"], progress)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["hf_to_orbax", "load_orbax_params", "main", "orbax_to_hf", "save_orbax_params", "train_to_hf",
           "write_hf_from_arrays"]

if __name__ == "__main__":
    sys.exit(main())
