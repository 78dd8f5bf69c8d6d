"""The mixture of experts on one GPU: every expert-MLP implementation beside a dense product chain of the same FLOPs
(the ceiling), the whole MoE block, and the block's pieces, forward + backward, at the bench shape (bench-1p3b:
64 experts, top-10, hidden 1024, width 256) and at the Qwen3-Next-80B-A3B layer shape (512 experts, top-10, hidden
2048, width 512), 16,384 tokens each.

    python benchmarks/moe.py [--shapes bench,80b] [--impls pallas_gpu,tiled] [--tokens 16384] [--tune]

--tune first sweeps block shapes for each of the six grouped products of kernels_pallas/moe/pallas_gpu.py (the
forward's two, the input gradients' two, the weight gradients' two) at the first shape, prints the fastest of each,
and uses them for the rest of the run (copy them into pallas_gpu.BLOCKS to keep them).

Protocol (shared/anchors/moe_anchor.py's): bf16; each timed function returns the gradients of all inputs for a
random cotangent passed as an argument (so XLA cannot fold it), which drops the unused last forward product the same
way for every variant. Timing: median over 5 repetitions of the mean of 10 back-to-back calls after a warm-up
(benchmarks/gdn.py's bench). Each implementation is first checked against the tiled form in fp32 on the same
bf16 inputs (jax.lax.ragged_dot, the definition, needs 640 GiB off TPU at the 80B shape). Writes $OUT/moe.json.
"""
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
from qwen3next_jax.execution import Execution
from qwen3next_jax.interface import Context
from qwen3next_jax.moe import SparseMoE, combine_from_experts, gather_to_experts, sort_by_expert
from qwen3next_kernels.moe import pallas_gpu
from qwen3next_kernels.registry import FAMILIES, Platform

SHAPES = {"bench": "bench-1p3b", "80b": "qwen3-next-80b-a3b"}


def grads_of(f, *args):
    """jit of (args..., cotangent) -> gradients of <f(args), cotangent> w.r.t. every argument."""
    @jax.jit
    def step(*a):
        *a, ct = a
        out, vjp = jax.vjp(f, *a)
        return vjp(ct)
    return step


def expert_inputs(cfg, tokens, seed=0):
    E, k, D, F = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    ks = jax.random.split(jax.random.key(seed), 6)
    top = jax.lax.top_k(jax.random.normal(ks[0], (tokens, E)), k)[1]
    gs = jnp.sum(jax.nn.one_hot(top.reshape(-1), E, dtype=jnp.int32), axis=0)
    M = tokens * k
    x = jax.random.normal(ks[1], (M, D), jnp.bfloat16)
    w = lambda key, s: (0.02 * jax.random.normal(key, s)).astype(jnp.bfloat16)
    return x, w(ks[2], (E, D, F)), w(ks[3], (E, D, F)), w(ks[4], (E, F, D)), gs, \
        jax.random.normal(ks[5], (M, D), jnp.bfloat16)


def expert_mlp_rows(cfg, tokens, impls):
    x, gate, up, down, gs, ct = expert_inputs(cfg, tokens)
    M, D, F = x.shape[0], cfg.hidden_size, cfg.moe_intermediate_size
    flops = 3 * 2 * M * (D * 2 * F + F * D)
    out = {"rows": M, "group_sizes_min_max": [int(gs.min()), int(gs.max())], "fwd_bwd_tflop": flops / 1e12}
    f32 = lambda a: a.astype(jnp.float32)
    ref = jax.jit(lambda *a: FAMILIES["moe"].function("tiled")(*map(f32, a), gs))(x, gate, up, down)
    for impl in impls:
        fn = FAMILIES["moe"].function(impl)
        try:
            y = jax.jit(lambda *a: fn(*a, gs))(x, gate, up, down)
            err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            ms = bench(grads_of(lambda *a: fn(*a, gs), x, gate, up, down), x, gate, up, down, ct, n=10, reps=5)
            out[impl] = dict(ms=ms, tflops=flops / ms / 1e9, rel_err=err)
        except Exception as e:  # record and go on
            traceback.print_exc()
            out[impl] = {"error": repr(e)[:500]}
        print(f"  expert MLP {impl}: {out[impl]}", flush=True)

    # The ceiling: one dense chain of the same shapes and FLOPs (moe_anchor.py's).
    w_gu, w_d = jnp.concatenate([gate[0], up[0]], -1), down[0]

    def dense(x, w_gu, w_d):
        h = x @ w_gu
        return (jax.nn.silu(h[:, :F]) * h[:, F:]) @ w_d

    ms = bench(grads_of(dense, x, w_gu, w_d), x, w_gu, w_d, ct, n=10, reps=5)
    out["dense_same_flops"] = dict(ms=ms, tflops=flops / ms / 1e9)
    print(f"  dense chain of the same FLOPs: {out['dense_same_flops']}", flush=True)
    return out


def block_rows(cfg, tokens, impls):
    """The whole SparseMoE block (router, dispatch, experts, combine, shared expert) and its pieces."""
    B, T = tokens // 2048, 2048
    out = {}
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size), jnp.bfloat16)
    ct = jax.random.normal(jax.random.key(2), x.shape, jnp.bfloat16)
    ctx = Context(rope=None, segment_ids=None, token_mask=jnp.ones((B, T), bool))
    for impl in impls:
        try:
            moe = SparseMoE(cfg, rngs=nnx.Rngs(0), execution=Execution(compute_dtype="bfloat16", moe=impl),
                            platform=Platform.current())
            graphdef, params = nnx.split(moe)

            def block(params, x):
                y, aux = nnx.merge(graphdef, params)(x, ctx)
                return y + aux.load_balancing.astype(y.dtype)

            out[f"block_{impl}"] = bench(grads_of(block, params, x), params, x, ct, n=10, reps=5)
        except Exception as e:
            traceback.print_exc()
            out[f"block_{impl}"] = repr(e)[:500]
        print(f"  block {impl}: {out[f'block_{impl}']}", flush=True)

    # Pieces, forward + backward where they have a backward.
    moe = SparseMoE(cfg, rngs=nnx.Rngs(0), execution=Execution(compute_dtype="bfloat16"), platform=Platform.current())
    x2 = x.reshape(tokens, -1)
    probs, top_w, top_idx = jax.jit(lambda x2: moe.route(x2, moe.gate))(x2)
    k, D = cfg.num_experts_per_tok, cfg.hidden_size
    order, inverse, gs = jax.jit(sort_by_expert, static_argnums=1)(top_idx, cfg.num_experts)
    rows_ct = jax.random.normal(jax.random.key(3), (tokens * k, D), jnp.bfloat16)
    x2_ct = jax.random.normal(jax.random.key(4), (tokens, D), jnp.bfloat16)
    g_router, p_router = nnx.split(moe.gate)  # the router alone: its matmul, softmax and top-k
    pieces = {
        "router_softmax_topk": (grads_of(lambda p, x2: jnp.sum(jax.lax.top_k(jax.nn.softmax(
            nnx.merge(g_router, p)(x2).astype(jnp.float32), -1), k)[0], -1), p_router, x2),
            (p_router, x2, jnp.ones((tokens,), jnp.float32))),
        "sort_by_expert": (jax.jit(sort_by_expert, static_argnums=1), (top_idx, cfg.num_experts)),
        "gather_to_experts": (grads_of(lambda x2: gather_to_experts(x2, order, inverse, k), x2), (x2, rows_ct)),
        "combine_from_experts": (grads_of(lambda y, w: combine_from_experts(y, w, order, inverse), rows_ct, top_w),
                                 (rows_ct, top_w, x2_ct)),
    }
    for name, (fn, args) in pieces.items():
        try:
            out[name] = bench(fn, *args, n=10, reps=5) if name != "sort_by_expert" else \
                bench(lambda t: fn(t, cfg.num_experts), top_idx, n=10, reps=5)
        except Exception as e:
            traceback.print_exc()
            out[name] = repr(e)[:500]
        print(f"  piece {name}: {out[name]}", flush=True)
    return out


TUNE_CANDIDATES = [(128, 128, 64, 4, g) for g in (1, 2, 4, 8)] + [
    (128, 128, 64, 5, 4), (128, 128, 64, 6, 1), (128, 64, 64, 5, 4), (64, 128, 64, 5, 4), (128, 128, 128, 3, 4),
    (128, 128, 128, 3, 1)]


def tune(cfg, tokens):
    """The fastest block shape of each grouped product at this shape; sets pallas_gpu.BLOCKS."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    x, gate, up, down, gs, dy = expert_inputs(cfg, tokens)
    w_gu = jnp.concatenate([gate, up], -1)
    F = cfg.moe_intermediate_size
    a = jax.random.normal(jax.random.key(7), (x.shape[0], F), jnp.bfloat16)
    dh = jax.random.normal(jax.random.key(8), (x.shape[0], 2 * F), jnp.bfloat16)
    roles = {  # role: (kernel, lhs, rhs, transpose_rhs)
        "gate_up": ("ragged", x, w_gu, False), "down": ("ragged", a, down, False),
        "d_down": ("ragged", dy, down, True), "d_gate_up": ("ragged", dh, w_gu, True),
        "w_down": ("weight", a, dy, None), "w_gate_up": ("weight", x, dh, None)}
    out = {}
    for role, (kind, lhs, rhs, transpose) in roles.items():
        times = {}
        for blocks in TUNE_CANDIDATES:
            kw = dict(zip(pallas_gpu.BLOCK_FIELDS, blocks))
            if kind == "ragged":
                fn = jax.jit(lambda lhs, rhs, kw=kw: ragged_dot_mgpu.ragged_dot(
                    lhs, rhs, group_sizes=gs, transpose_rhs=transpose, **kw))
            else:
                fn = jax.jit(lambda lhs, rhs, kw=kw: transposed_ragged_dot_mgpu.transposed_ragged_dot(
                    lhs, rhs, group_sizes=gs, **kw))
            try:
                times[str(blocks)] = bench(fn, lhs, rhs, n=20, reps=3)
            except Exception as e:  # a shape the kernel refuses (shared memory, divisibility)
                times[str(blocks)] = repr(e)[:120]
        timed = {b: t for b, t in times.items() if isinstance(t, float)}
        best = min(timed, key=timed.get)
        pallas_gpu.BLOCKS[role] = tuple(int(v) for v in best.strip("()").split(","))
        out[role] = {"best": best, "best_ms": timed[best], "default_ms": times.get(str(TUNE_CANDIDATES[2])),
                     "all": times}
        print(f"  tune {role}: best {best} {timed[best]:.3f} ms (was {times.get(str(TUNE_CANDIDATES[2]))})",
              flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="bench,80b")
    ap.add_argument("--impls", default="pallas_gpu,tiled")
    ap.add_argument("--block-impls", default="pallas_gpu,tiled")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--tune", action="store_true")
    a = ap.parse_args()
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": " ".join(sys.argv)}
    path = os.path.join(os.environ.get("OUT", "/tmp"), "moe.json")
    if a.tune:
        res["tune"] = tune(Qwen3NextConfig.preset(SHAPES[a.shapes.split(",")[0]]), a.tokens)
        res["blocks_used"] = dict(pallas_gpu.BLOCKS)
    for shape in a.shapes.split(","):
        cfg = Qwen3NextConfig.preset(SHAPES[shape])
        print(f"{shape}: {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, hidden {cfg.hidden_size}, "
              f"width {cfg.moe_intermediate_size}, {a.tokens} tokens", flush=True)
        res[shape] = expert_mlp_rows(cfg, a.tokens, a.impls.split(","))
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        res[shape].update(block_rows(cfg, a.tokens, a.block_impls.split(",")))
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
