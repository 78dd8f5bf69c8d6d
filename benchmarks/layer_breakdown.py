"""Where a training step's time goes: forward + backward of each part of the bench model on its own, at the
train-step shape (bench-1p3b, one sequence per row), bf16 compute with fp32 parameters, same timing method as
benchmarks/gdn.py. Parts: the Gated DeltaNet mixer, the gated attention mixer, the sparse MoE block, and the
LM head with chunked cross entropy. Writes $OUT/layer_breakdown.json.

    python benchmarks/layer_breakdown.py --shape 8x2048 --attention xla,cudnn --gdn auto,chunked --moe auto
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.gdn import bench
from qwen3next_jax import Qwen3NextConfig
from qwen3next_jax.attention import GatedAttention
from qwen3next_jax.execution import Execution
from qwen3next_jax.gated_deltanet import GatedDeltaNet
from qwen3next_jax.interface import Context
from qwen3next_jax.moe import SparseMoE
from qwen3next_jax.rope import rope_tables
from qwen3next_kernels.registry import FAMILIES, Platform


def bench_context(cfg, B, T, dtype=jnp.bfloat16) -> Context:
    """One document a row, as the train-step benchmark feeds it."""
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return Context(rope_tables(cfg, pos, dtype), jnp.ones((B, T), jnp.int32), jnp.ones((B, T), bool))


def module_step(module, x, ctx):
    """(jit of the gradient of sum(block(x, ctx)) w.r.t. its parameters and x, its arguments (params, x))."""
    graphdef, params = nnx.split(module)

    @jax.jit
    def step(params, x):
        def f(params, x):
            out, _ = nnx.merge(graphdef, params)(x, ctx)
            return jnp.sum(out.astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1))(params, x)

    return step, (params, x)


def time_fwd_bwd(module):
    """ms of forward + backward of sum(block(x, ctx)) w.r.t. its parameters and x."""
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size), jnp.bfloat16)
    step, step_args = module_step(module, x, bench_context(cfg, B, T))
    return bench(step, *step_args, n=10, reps=3)


def main():
    global B, T, cfg
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-1p3b")
    ap.add_argument("--shape", default="8x2048")
    ap.add_argument("--gdn", default="auto,chunked")
    ap.add_argument("--attention", default="xla,cudnn")
    ap.add_argument("--moe", default="auto")
    ap.add_argument("--loss", default="auto")
    a = ap.parse_args()
    B, T = map(int, a.shape.split("x"))
    cfg = Qwen3NextConfig.preset(a.preset)
    here = Platform.current()
    kw = lambda **choice: dict(rngs=nnx.Rngs(0), platform=here,
                               execution=Execution(compute_dtype="bfloat16", param_dtype="float32", **choice))
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": " ".join(sys.argv)}
    jobs = [(f"gdn_{i}", lambda i=i: time_fwd_bwd(GatedDeltaNet(cfg, **kw(gdn=i)))) for i in a.gdn.split(",")]
    jobs += [(f"attention_{i}", lambda i=i: time_fwd_bwd(GatedAttention(cfg, **kw(attention=i))))
             for i in a.attention.split(",")]
    jobs += [(f"moe_{i}", lambda i=i: time_fwd_bwd(SparseMoE(cfg, **kw(moe=i)))) for i in a.moe.split(",")]

    def head_loss(impl):
        w = jax.random.normal(jax.random.key(2), (cfg.hidden_size, cfg.vocab_size), jnp.float32) * 0.02
        targets = jax.random.randint(jax.random.key(3), (B, T), 0, cfg.vocab_size)
        x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size), jnp.bfloat16)
        name = FAMILIES["loss"].resolve(impl, dict(hidden=cfg.hidden_size, vocab=cfg.vocab_size, dtype="bfloat16"),
                                        here)
        ce = FAMILIES["loss"].function(name)
        weights = (jnp.full(targets.shape, 1 / targets.size), jnp.zeros(targets.shape))
        # the gradient of the training objective, which the family forms in its forward pass
        f = jax.jit(lambda x, w: ce(x, w.astype(jnp.bfloat16), targets, weights, chunk_tokens=4096)[2])
        return bench(f, x, w, n=10, reps=3)

    jobs += [(f"lm_head_ce_{i}", lambda i=i: head_loss(i)) for i in a.loss.split(",")]
    for name, job in jobs:
        try:
            res[name + "_ms"] = job()
        except Exception as e:  # record and go on
            traceback.print_exc()
            res[name + "_error"] = repr(e)[:500]
        print(name, res.get(name + "_ms", res.get(name + "_error")), flush=True)
        with open(os.path.join(os.environ.get("OUT", "/tmp"), "layer_breakdown.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
