"""Gated DeltaNet op benchmark on one GPU: correctness spot check, then forward and forward+backward timings.

Usage (on a Hopper GPU):  python3 benchmarks/gdn.py [--small] [--impls pallas_gpu,chunked] [--head-dim D] [--out DIR]
Shapes are the ANCHORS ones (16 key heads, 32 value heads, dk = dv = 128, bf16): B x T = 8x4096, 2x16384, 1x65536;
--head-dim sets dk = dv (the ANCHORS figures are at 128).
Timing: median over 5 repetitions of the mean wall time of 20 back-to-back calls after a warm-up, synchronised at the
end (the same method as shared/anchors/gpu_anchors.py's jax_bench, so figures are comparable side by side).
`--impls jla` runs jax-linear-attention's Mosaic GPU op (the anchor) in the same process.

Forward + backward is timed two ways. `fwdbwd_ms` returns the output with the gradients, as training consumes it.
`grads_only_ms` returns only the gradients, as shared/anchors/gpu_anchors.py does: there XLA drops any kernel whose
results only the output needs. jla's backward recomputes what it needs from its inputs, so its forward kernel is dead
code under that protocol (benchmarks/kernel_profile.py shows it missing); ours keeps the forward's states for the
backward, so it always runs. Writes <out>/gdn_bench.json.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

H, HV, D = 16, 32, 128   # heads and head dim (dk = dv) of Qwen3-Next's Gated DeltaNet


def inputs(B, T, d=D, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, T, H, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, HV, d), jnp.bfloat16)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, HV)) + 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV)))
    do = jax.random.normal(ks[5], (B, T, HV, d), jnp.bfloat16)
    return q, k, v, g, beta, do


def bench(fn, *args, n=20, reps=5):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(ts)


def get_impl(name):
    if name == "jla":
        from jla import ops
        return lambda q, k, v, g, beta: ops.linear_attention("gated_deltanet", q, k, v, g=g, beta=beta,
                                                             use_qk_l2norm=True, impl="mosaic_gpu")[0]
    if name == "pallas_gpu":
        from qwen3next_kernels.gdn import pallas_gpu
        return lambda q, k, v, g, beta: pallas_gpu.gated_delta_rule(q, k, v, g, beta)[0]
    if name == "chunked":
        from qwen3next_kernels.gdn import gated_delta_rule
        return lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, impl="chunked")[0]
    raise ValueError(name)


def fwd_bwd(f, *, with_output=True):
    """jit of f's forward + backward at (q, k, v, g, beta, do); with_output also returns the output, as training
    consumes it (without it, XLA drops kernels only the output needs: see the module docstring)."""
    @jax.jit
    def step(q, k, v, g, beta, do):
        o, vjp = jax.vjp(f, q, k, v, g, beta)
        return (o, vjp(do)) if with_output else vjp(do)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--impls", default="pallas_gpu")
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--head-dim", type=int, default=D)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    shapes = [(1, 256)] if a.small else [(8, 4096), (2, 16384), (1, 65536)]
    res = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    if a.breakdown:
        for B, T in shapes[:1] + shapes[2:]:
            res[f"breakdown_B{B}_T{T}"] = breakdown(B, T)
    for name in a.impls.split(","):
        if not name:
            continue
        f = get_impl(name)
        fwd = jax.jit(f)

        fwdbwd, grads_only = fwd_bwd(f), fwd_bwd(f, with_output=False)

        for B, T in shapes:
            q, k, v, g, beta, do = inputs(B, T, a.head_dim)
            t0 = time.time()
            jax.block_until_ready(fwd(q, k, v, g, beta))
            comp = time.time() - t0
            ms_f = bench(fwd, q, k, v, g, beta)
            rec = {"fwd_ms": ms_f, "compile_fwd_s": comp}
            if not a.fwd_only:
                try:
                    ms_fb = bench(fwdbwd, q, k, v, g, beta, do)
                    rec.update(fwdbwd_ms=ms_fb, Mtok_s_fwdbwd=B * T / ms_fb / 1e3,
                               grads_only_ms=bench(grads_only, q, k, v, g, beta, do))
                except Exception as e:  # keep the forward figures
                    rec["fwdbwd_error"] = repr(e)[:400]
            res[f"{name}_B{B}_T{T}"] = rec
            print(f"{name} B={B} T={T}: " + ", ".join(f"{k_}={v_:.3f}" if isinstance(v_, float) else f"{k_}={v_}"
                                                       for k_, v_ in rec.items()), flush=True)
            with open(os.path.join(a.out, "gdn_bench.json"), "w") as fh:
                json.dump(res, fh, indent=1)
    print(json.dumps(res, indent=1))


def breakdown(B=8, T=4096):  # noqa: D401
    """Per-kernel times of the pallas_gpu forward and backward (ms), same timing method."""
    from qwen3next_kernels.gdn import pallas_gpu as pg
    q, k, v, g, beta, do = inputs(B, T)
    K = q.shape[-1]
    scale = K ** -0.5
    h0 = jnp.zeros((B, HV, K, K), jnp.float32)
    res = {}
    gp = jax.jit(lambda g, beta: pg._gate_prep(g, beta, None, B, T, HV, 0))
    gc, bt, run, gam, gci, kdec = gp(g, beta)
    res["gate_prep_xla"] = bench(gp, g, beta)
    prep = jax.jit(lambda *a: pg._prep(*a, scale=scale, l2norm=True))
    res["prep"] = bench(prep, q, k, v, gc, bt, run, gci)
    prep_m = jax.jit(lambda *a: pg._prep(*a, scale=scale, l2norm=True, store_m=True))
    nw, u, att, qn, kn, m = prep_m(q, k, v, gc, bt, run, gci)
    res["prep_store_m"] = bench(prep_m, q, k, v, gc, bt, run, gci)
    st = jax.jit(lambda *a: pg._state(*a, T=T, out_dtype=v.dtype))
    res["state"] = bench(st, nw, u, att, qn, kn, gci, kdec, gam, h0)
    sth = jax.jit(lambda *a: pg._state(*a, T=T, out_dtype=v.dtype, store_h=True))
    o, ht, hc, vn = sth(nw, u, att, qn, kn, gci, kdec, gam, h0)
    res["state_store_h"] = bench(sth, nw, u, att, qn, kn, gci, kdec, gam, h0)
    sb = jax.jit(pg._state_bwd)
    dsp, dh0 = sb(do, nw, att, qn, kn, gci, kdec, gam, h0)
    res["state_bwd"] = bench(sb, do, nw, att, qn, kn, gci, kdec, gam, h0)
    cb = jax.jit(lambda *a: pg._chunk_bwd(*a, scale=scale, l2norm=True))
    res["chunk_bwd"] = bench(cb, q, k, v, do, gc, bt, run, gci, kdec, hc, dsp, vn, m)
    print(f"breakdown B={B} T={T}: " + ", ".join(f"{k_}={v_:.3f}" for k_, v_ in res.items()), flush=True)
    return res


if __name__ == "__main__":
    main()
