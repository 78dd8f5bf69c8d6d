"""The Gated DeltaNet input conv alone (qwen3next_kernels.conv.split_conv): forward and forward + backward of the Mosaic
GPU kernels against the plain-JAX form XLA compiles, at Qwen3-Next-80B-A3B's heads (16 key / 32 value heads of
128, kernel 4), bf16, one document per row. Same timing method as gdn.py (median of 5 x 20 back-to-back calls after
a warm-up). Writes $OUT/conv_bench.json.

    python3 benchmarks/conv.py --shapes 8x4096,1x32768
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks.gdn import bench
from qwen3next_kernels.conv import split_conv

DIMS = dict(key_heads=16, key_dim=128, value_heads=32, value_dim=128)


def steps(impl, seg):
    def fwd(x, w):
        return split_conv(x, w, seg, impl=impl, **DIMS)

    def fwd_bwd(x, w):   # outputs and both gradients returned, so nothing is dead code
        outs, vjp = jax.vjp(fwd, x, w)
        return outs, vjp(outs)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x4096")
    ap.add_argument("--impls", default="pallas_gpu,xla")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": " ".join(sys.argv)}
    for shape in a.shapes.split(","):
        B, T = map(int, shape.split("x"))
        nk, dk, nv, dv = DIMS["key_heads"], DIMS["key_dim"], DIMS["value_heads"], DIMS["value_dim"]
        x = jax.random.normal(jax.random.key(0), (B, T, nk, 2 * dk + 2 * (nv // nk) * dv), jnp.bfloat16)
        w = (0.5 * jax.random.normal(jax.random.key(1), (4, 2 * nk * dk + nv * dv))).astype(jnp.bfloat16)
        seg = jnp.ones((B, T), jnp.int32)
        for impl in a.impls.split(","):
            fwd, fwd_bwd = steps(impl, seg)
            r = {"fwd_ms": bench(fwd, x, w), "fwdbwd_ms": bench(fwd_bwd, x, w)}
            res[f"{impl}_B{B}_T{T}"] = r
            print(f"{impl} B{B} T{T}: fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwdbwd_ms']:.3f} ms", flush=True)
    with open(os.path.join(a.out, "conv_bench.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
