"""The MoE's forward row gather alone on one GPU: x[order // k] at the bench shape (16,384 tokens of 1024 bf16, top-10
of 64 experts: 163,840 rows in expert order), in the index form moe.gather_to_experts uses and three others, beside a
copy of the same bytes (the ceiling). Checks that every form gathers the same rows. Timing as benchmarks/gdn.py's
bench(). Writes $OUT/moe_gather.json.

    python3 benchmarks/moe_gather.py
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks.gdn import bench

N, D, E, K = 16384, 1024, 64, 10

FORMS = {
    "floor_div_wrap": lambda x, o: x[o // K],  # as gather_to_experts: floor division, negative indices wrapped
    "lax_div_promise": lambda x, o: x.at[jax.lax.div(o, K)].get(mode="promise_in_bounds"),
    "barrier_index": lambda x, o: x.at[jax.lax.optimization_barrier(jax.lax.div(o, K))].get(mode="promise_in_bounds"),
    "take_rows": lambda x, o: jnp.take(x, jax.lax.optimization_barrier(jax.lax.div(o, K)), axis=0, mode="clip"),
    "copy_ceiling": lambda x, o: jnp.tile(x, (K, 1)),
}


def main():
    x = jax.random.normal(jax.random.key(0), (N, D), jnp.bfloat16)
    order = jnp.argsort(jax.random.randint(jax.random.key(1), (N * K,), 0, E), stable=True).astype(jnp.int32)
    res, first = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}, None
    for name, form in FORMS.items():
        f = jax.jit(form)
        res[name + "_ms"] = bench(f, x, order, n=20, reps=5)
        if name != "copy_ceiling":
            y = f(x, order)
            first = y if first is None else first
            res[name + "_same_rows"] = bool(jnp.array_equal(y, first))
        print(name, res[name + "_ms"], flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "moe_gather.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
