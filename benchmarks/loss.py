"""The LM head's loss alone on one GPU: the chunked form with its gradient formed in the forward pass (what training
runs), at several chunk sizes, beside the three bf16 products it needs (the ceiling: logits with fp32 output,
d hidden and d w, with a random logits gradient passed as an argument). 16,384 tokens, hidden 1024, the bench
vocabulary (128,256) and Qwen3-Next's (151,936). "online_lse" variants reduce each row's logsumexp in one pass (a
variadic reduction of (max, sum of exp)) instead of jax.nn.logsumexp's two: an experiment, checked against the
chunked form's values. Timing as benchmarks/gdn.py's bench(). Writes $OUT/loss.json.

    python3 benchmarks/loss.py [--chunks 4096,8192] [--vocabs 128256,151936]
"""
import argparse
import json
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks.gdn import bench
from qwen3next_kernels.cross_entropy import chunked

N, D = 16384, 1024


def online_logsumexp(x, axis=-1):
    """logsumexp over the last axis in one pass: a reduction of (running max, sum of exp below it)."""
    def combine(a, b):
        (m1, s1), (m2, s2) = a, b
        m = jnp.maximum(m1, m2)
        scaled = lambda mi, si: jnp.where(mi == -jnp.inf, 0.0, si * jnp.exp(mi - m))
        return m, scaled(m1, s1) + scaled(m2, s2)

    assert axis in (-1, x.ndim - 1)
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.float32(-jnp.inf), jnp.float32(0)), combine, (x.ndim - 1,))
    return m + jnp.log(s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="4096,8192")
    ap.add_argument("--vocabs", default="128256,151936")
    a = ap.parse_args()
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": " ".join(sys.argv), "tokens": N, "hidden": D}
    for V in map(int, a.vocabs.split(",")):
        k = jax.random.split(jax.random.key(V), 4)
        h = jax.random.normal(k[0], (N, D), jnp.bfloat16)
        w = (jax.random.normal(k[1], (D, V), jnp.float32) * 0.02).astype(jnp.bfloat16)
        y = jax.random.randint(k[2], (N,), 0, V)
        weights = (jnp.full((N,), 1 / N), jnp.full((N,), 1e-4 / N))
        d_logits = jax.random.normal(k[3], (N, V), jnp.bfloat16)

        def products(h, w, d):
            return (jnp.dot(h, w, preferred_element_type=jnp.float32), jnp.dot(d, w.T),
                    jnp.dot(h.T, d, preferred_element_type=jnp.float32))

        res[f"V{V}_products_ms"] = bench(jax.jit(products), h, w, d_logits, n=10, reps=3)
        print(V, "products", res[f"V{V}_products_ms"], flush=True)
        first = None
        for C in map(int, a.chunks.split(",")):
            for variant in ("", "_online_lse"):
                name = f"V{V}_chunked_{C}{variant}"
                with mock.patch.object(chunked.jax.nn, "logsumexp", online_logsumexp if variant else
                                       jax.nn.logsumexp):
                    f = jax.jit(lambda h, w, y, weights, C=C: chunked.linear_cross_entropy(h, w, y, weights,
                                                                                          chunk_tokens=C))
                    out = f(h, w, y, weights)
                res[name + "_ms"] = bench(f, h, w, y, weights, n=10, reps=3)
                first = first or out
                res[name + "_max_lse_diff"] = float(jnp.max(jnp.abs(out[1] - first[1])))
                res[name + "_max_dw_diff"] = float(jnp.max(jnp.abs(out[2][1] - first[2][1])))
                print(name, res[name + "_ms"], res[name + "_max_lse_diff"], flush=True)
        del d_logits
        with open(os.path.join(os.environ.get("OUT", "/tmp"), "loss.json"), "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
