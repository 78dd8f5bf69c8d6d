"""One training step end to end on one GPU at the bench shape of ANCHORS.md (`bench-1p3b`, 16K tokens a step).

Times the trainer's own step function (train.loop.make_train_step: forward, MTP, chunked fp32 cross entropy,
router loss, backward, AdamW with clipping; fp32 master weights, bf16 compute) on synthetic tokens, one document
per row, for each variant given, and writes $OUT/train_step.json (OUT defaults to /tmp). Run the anchor trainer
(jax-linear-attention's, `gpu_anchors.py jlatrain`) in the same device call so the ratio is measured at one time:

    python benchmarks/train_step.py --shapes 8x2048,2x8192 --variants xla,cudnn --remat dots
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3next_jax import Qwen3NextForCausalLM
from qwen3next_jax import sharding as shd
from qwen3next_train.config import load_config
from qwen3next_train.loop import make_train_step
from qwen3next_train.metrics import flops_per_token, peak_flops
from qwen3next_train.optim import make_optimizer, schedule
from qwen3next_train.state import TrainState


def bench_one(preset: str, B: int, T: int, attention_impl: str, remat: str, gdn_impl: str, steps: int,
              moe_impl: str = "auto") -> dict:
    cfg = load_config(None, [f"model.preset={preset}", f"data.seq_len={T}", f"data.batch_size={B}",
                             f"execution.remat={remat}", f"execution.gdn={gdn_impl}",
                             f"execution.attention={attention_impl}", f"execution.moe={moe_impl}"])
    mesh = shd.make_mesh(data=-1)
    model = shd.create_sharded(lambda: Qwen3NextForCausalLM(cfg.model, rngs=nnx.Rngs(0), execution=cfg.execution),
                               mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg.optim, 1000)
    state = TrainState(params=params, opt_state=jax.jit(tx.init)(params), step=jnp.zeros((), jnp.int32),
                       rng=jax.random.key_data(jax.random.key(0)))
    step = jax.jit(make_train_step(graphdef, rest, tx, cfg, schedule(cfg.optim, 1000)), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    batch = dict(input_ids=jnp.asarray(rng.integers(0, cfg.model.vocab_size, (B, T)), jnp.int32),
                 segment_ids=jnp.ones((B, T), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    losses = [float(metrics["loss"])]  # every step's loss: a NaN is told apart from a later divergence
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    dt = statistics.median(times)
    tps = B * T / dt
    peak = peak_flops(jax.devices()[0])
    stats = jax.devices()[0].memory_stats() or {}
    return dict(step_ms=dt * 1e3, tok_s=tps, compile_s=compile_s, losses=losses,
                mfu=flops_per_token(cfg.model, T)["total"] * tps / peak if peak else None,
                peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench-1p3b")
    ap.add_argument("--shapes", default="8x2048,2x8192")
    ap.add_argument("--variants", default="xla,cudnn", help="attention implementations: xla, cudnn")
    ap.add_argument("--remat", default="dots")
    ap.add_argument("--gdn-impl", default="auto")
    ap.add_argument("--moe-impl", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    out = os.path.join(os.environ.get("OUT", "/tmp"), "train_step.json")
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "args": vars(args)}
    for shape in args.shapes.split(","):
        B, T = map(int, shape.split("x"))
        for variant in args.variants.split(","):
            key = f"B{B}_T{T}_{variant}_moe-{args.moe_impl}_remat-{args.remat}"
            try:
                results[key] = bench_one(args.preset, B, T, variant, args.remat, args.gdn_impl,
                                         args.steps, args.moe_impl)
            except Exception as e:  # record and go on to the next variant
                traceback.print_exc()
                results[key] = {"error": repr(e)[:600]}
            print(key, results[key], flush=True)
            with open(out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
