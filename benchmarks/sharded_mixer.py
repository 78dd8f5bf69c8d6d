"""The Gated DeltaNet mixer (forward + backward) over several GPUs: XLA's partitioning alone against the per-shard
kernels (qwen3next_jax.sharding.per_shard, active with the mesh in context), and one GPU with its share of the batch.

Usage (a machine with 2+ GPUs):  python3 benchmarks/sharded_mixer.py [--preset qwen3-next-80b-a3b] [--shape 8x4096]
The batch is split over all devices (mesh axis `data`). Prints and writes <out>/sharded_mixer.json: the times, the
all-gathers in each compiled step, and each variant's largest gradient differences from the whole batch on one
GPU.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.gdn import bench
from benchmarks.layer_breakdown import bench_context, module_step
from qwen3next_jax import Qwen3NextConfig
from qwen3next_jax import sharding as shd
from qwen3next_jax.execution import Execution
from qwen3next_jax.gated_deltanet import GatedDeltaNet
from qwen3next_kernels.registry import Platform


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-next-80b-a3b")
    ap.add_argument("--shape", default="8x4096")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    B, T = map(int, a.shape.split("x"))
    n = jax.device_count()
    cfg = Qwen3NextConfig.preset(a.preset)
    make = lambda: GatedDeltaNet(cfg, rngs=nnx.Rngs(0), execution=Execution(compute_dtype="bfloat16"),
                                 platform=Platform.current())
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size), jnp.bfloat16)
    ctx = bench_context(cfg, B, T)
    res = {"devices": n, "device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": a.preset,
           "shape": a.shape, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}

    mesh = shd.make_mesh(data=n)
    xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
    grads = {}
    for name in ("xla_partitioned", "per_shard"):
        module = shd.create_sharded(make, mesh)
        ctx_s = jax.tree.map(lambda a: jax.device_put(a, jax.NamedSharding(mesh, jax.P("data"))), ctx)
        step, (params, _) = module_step(module, xs, ctx_s)
        if name == "per_shard":
            step = shd.in_mesh(mesh, step)
            with jax.set_mesh(mesh):
                hlo = step.__wrapped__.lower(params, xs).compile().as_text()
        else:
            hlo = step.lower(params, xs).compile().as_text()
        grads[name] = jax.block_until_ready(step(params, xs))
        res[name] = {"ms": bench(step, params, xs, n=10, reps=3), "all_gathers": hlo.count(" all-gather(")
                     + hlo.count(" all-gather-start(")}
        print(name, res[name], flush=True)
    one = make()
    step, args = module_step(one, x, ctx)
    want = jax.block_until_ready(step(*args))   # the whole batch on one GPU: the reference
    for name, got in grads.items():
        diffs = {}
        for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
            w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
            diffs[jax.tree_util.keystr(path)] = float(np.linalg.norm(g - w) / (np.linalg.norm(w) + 1e-30))
        res[name]["largest_rel_grad_differences_from_one_gpu"] = dict(sorted(diffs.items(), key=lambda d: -d[1])[:3])
    step, args = module_step(one, x[:B // n], jax.tree.map(lambda a: a[:B // n], ctx))
    res["one_gpu_its_share"] = {"ms": bench(step, *args, n=10, reps=3)}
    print(json.dumps(res, indent=1))
    with open(os.path.join(a.out, "sharded_mixer.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
