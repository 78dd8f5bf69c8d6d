"""Which GPU code path makes the training loss non-finite? Runs the bench model's forward and backward with every
combination of Gated DeltaNet, attention and MoE implementation on one batch, and reports, per combination, whether
the loss, the output of every decoder layer and the gradients are finite, and how far the loss and logits are from
the all-XLA combination (gdn chunked, attention xla). Writes $OUT/finite_check.json.

    python benchmarks/finite_check.py --layers 4 --shape 2x2048
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3next_jax import Qwen3NextConfig, Qwen3NextForCausalLM
from qwen3next_jax.execution import Execution
from qwen3next_train.losses import loss_and_metrics


def run_combo(cfg, B, T, gdn_impl, attention_impl, moe_impl, seed=0):
    execution = Execution(compute_dtype="bfloat16", remat="dots", gdn=gdn_impl, attention=attention_impl,
                          moe=moe_impl)
    model = Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(seed), execution=execution)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    batch = dict(input_ids=ids, segment_ids=jnp.ones((B, T), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    counts = {"main": jnp.float32(B * (T - 1))}
    counts.update({f"mtp{d}": jnp.float32(B * (T - 1 - d)) for d in range(1, cfg.mtp_num_hidden_layers + 1)})

    @jax.jit
    def loss_grads(p):
        def f(p):
            return loss_and_metrics(nnx.merge(graphdef, p, rest), batch, counts, mtp_weight=0.3, aux_coef=1e-3,
                                    z_loss_coef=0.0, chunk_tokens=4096, n_micro=1)
        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(p)
        gfin = {"/".join(str(getattr(k, "key", k)) for k in path): jnp.all(jnp.isfinite(g))
                for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
        return loss, metrics, gfin

    @jax.jit
    def layer_outputs(p):
        m = nnx.merge(graphdef, p, rest)
        ctx = m._context(ids, batch["segment_ids"], batch["positions"])
        x = m.model.embed_tokens(ids)
        outs = [x]
        for i in range(cfg.num_hidden_layers):
            x, _ = m.model.layers.layer(i)(x, ctx)
            outs.append(x)
        logits = m.logits(m.model.norm(x)[:, :64])
        return [jnp.all(jnp.isfinite(o)) for o in outs], [jnp.max(jnp.abs(o.astype(jnp.float32))) for o in outs], logits

    loss, metrics, gfin = loss_grads(params)
    gfin = {k: bool(v) for k, v in gfin.items()}
    fin, amax, logits = layer_outputs(params)
    fin, amax = [bool(f) for f in fin], [float(m) for m in amax]
    return dict(loss=float(loss), metrics={k: float(v) for k, v in metrics.items()},
                grads_finite=all(gfin.values()), nonfinite_grads=[k for k, ok in gfin.items() if not ok][:20],
                layer_outputs_finite=fin, layer_outputs_absmax=amax), np.asarray(logits, np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-1p3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shape", default="2x2048")
    ap.add_argument("--gdn", default="chunked,pallas_gpu")
    ap.add_argument("--attention", default="xla,cudnn")
    ap.add_argument("--moe", default="tiled")
    a = ap.parse_args()
    B, T = map(int, a.shape.split("x"))
    cfg = Qwen3NextConfig.preset(a.preset)
    cfg = cfg.replace(num_hidden_layers=a.layers, layer_types=cfg.layer_types[:a.layers])
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "args": vars(a)}
    ref_logits = None
    for gdn, att, moe in itertools.product(a.gdn.split(","), a.attention.split(","), a.moe.split(",")):
        key = f"gdn={gdn} attention={att} moe={moe}"
        try:
            r, logits = run_combo(cfg, B, T, gdn, att, moe)
            if ref_logits is None:
                ref_logits = logits
            else:
                r["logits_rel_to_first"] = float(np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits))
        except Exception as e:  # record and go on
            traceback.print_exc()
            r = {"error": repr(e)[:800]}
        res[key] = r
        print(key, json.dumps(r), flush=True)
        with open(os.path.join(os.environ.get("OUT", "/tmp"), "finite_check.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
