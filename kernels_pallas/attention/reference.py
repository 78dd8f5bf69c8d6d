"""Causal GQA softmax attention within packed documents, in plain XLA: the oracle and the fallback.

q [B, Tq, H, hd], k and v [B, Tk, KV, hd] with H a multiple of KV; query i sits at position q_offset + i of the
keys' sequence (0 unless the queries are one shard of it: context parallelism); segment_ids [B, Tq] of the queries
and kv_segment_ids [B, Tk] of the keys (default: segment_ids; None: one document a row). A query attends to the keys
at or before its position that carry its segment id. Packed rows hold each document as one run of ids; the cuDNN
form relies on that (it sees a document end where the id changes). Returns [B, Tq, H, hd] in q's dtype. XLA
materialises the [B, H, Tq, Tk] logits (and here a [B, 1, Tq, Tk] mask): fine for tests, costly at long context.
"""

import jax
import jax.numpy as jnp


def mask(q_len, kv_len, segment_ids=None, kv_segment_ids=None, q_offset=0):
    """[B or 1, 1, Tq, Tk] True where query i may attend to key j: j <= q_offset + i, in the same document."""
    causal = (q_offset + jnp.arange(q_len))[:, None] >= jnp.arange(kv_len)[None, :]
    if segment_ids is None:
        return causal[None, None]
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    return (causal & (segment_ids[:, :, None] == kv_segment_ids[:, None, :]))[:, None]


def attention(q, k, v, segment_ids=None, *, scale, q_offset=0, kv_segment_ids=None):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla",
                                        mask=mask(q.shape[1], k.shape[1], segment_ids, kv_segment_ids, q_offset))
