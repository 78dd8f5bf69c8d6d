"""Softmax attention for packed documents on one GPU: forward + backward of the bench preset's attention heads (8
query heads and 1 key/value head of 256, bf16) at the training shapes, each form beside the same cuDNN kernel on one
causal document a row (the ceiling: no document mask at all).

Forms: `packed` (cuDNN's packed sequences, offsets of `max_documents` slots a row: what the attention family runs),
`dense_mask` (cuDNN with the [B, 1, T, T] document mask, the fallback; only up to 8192 tokens a row, where the mask
fits), `causal` (the ceiling). Rows hold documents of lengths drawn around T/8, as benchmarks/train_step.py's packed
rows; `--mean-doc` changes that. Timing as benchmarks/gdn.py's bench(). Writes <out>/attention_bench.json.

    python3 benchmarks/attention.py [--shapes 8x2048,2x8192,1x65536] [--max-documents 64,256]
"""
import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gdn import bench
from benchmarks.train_step import synthetic_batch
from qwen3next_kernels.attention.cudnn import documents, documents_per_row, packed_attention
from qwen3next_kernels.attention.reference import mask

H, KV, HD = 8, 1, 256  # bench-1p3b's


def fwd_bwd(f):
    @jax.jit
    def step(q, k, v, do):
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x2048,2x8192,1x65536")
    ap.add_argument("--max-documents", default="64,256", help="offset slots a row, beside documents_per_row(T)")
    ap.add_argument("--mean-doc", type=int, default=0, help="mean document length (default T/8)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args()
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
    scale = HD ** -0.5
    for shape in args.shapes.split(","):
        B, T = map(int, shape.split("x"))
        ks = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(ks[0], (B, T, H, HD), jnp.bfloat16)
        k, v = (jax.random.normal(kk, (B, T, KV, HD), jnp.bfloat16) for kk in ks[1:3])
        do = jax.random.normal(ks[3], (B, T, H, HD), jnp.bfloat16)
        seg = jnp.asarray(synthetic_batch(np.random.default_rng(0), B, T, 100, args.mean_doc or T // 8)["segment_ids"])
        n_docs = int(jnp.max(documents(seg, T)[2]))
        forms = {"causal": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                                       implementation="cudnn")}
        for m in sorted({documents_per_row(T), *map(int, args.max_documents.split(","))}):
            if n_docs <= m <= T:
                forms[f"packed_M{m}"] = functools.partial(packed_attention, segment_ids=seg, scale=scale,
                                                          max_documents=m)
        if T <= 8192:
            forms["dense_mask"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=True, implementation="cudnn", mask=mask(T, T, seg))
        reference = None
        for name, f in forms.items():
            step = fwd_bwd(f)
            try:
                ms = bench(step, q, k, v, do, n=10, reps=5)
                out = step(q, k, v, do)
            except Exception as e:  # keep the other forms
                results["rows"].append(dict(shape=shape, form=name, error=repr(e)[:300]))
                print(shape, name, "error", repr(e)[:300], flush=True)
                continue
            row = dict(shape=shape, form=name, ms=round(ms, 3), documents_max=n_docs)
            if name != "causal":
                if reference is None:
                    reference = out
                # every document form computes the same thing: its largest difference from the first one's
                row["max_rel_diff_vs_first"] = max(
                    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                          / jnp.max(jnp.abs(b.astype(jnp.float32))))
                    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
            results["rows"].append(row)
            print(row, flush=True)
        with open(os.path.join(args.out, "attention_bench.json"), "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
