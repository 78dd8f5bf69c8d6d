"""Causal GQA softmax attention within packed documents, in plain XLA: the oracle and the fallback.

q [B, T, H, hd], k and v [B, T, KV, hd] with H a multiple of KV; segment_ids [B, T] (None: one document a row):
a query attends to the keys at or before it that carry its segment id. Returns [B, T, H, hd] in q's dtype. XLA
materialises the [B, H, T, T] logits (and here a [B, 1, T, T] mask): fine for tests, costly at long context.
"""
import jax


def segment_mask(segment_ids):
    """[B, 1, T, T] True where query and key belong to the same packed document; None passes through."""
    if segment_ids is None:
        return None
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def attention(q, k, v, segment_ids=None, *, scale):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, mask=segment_mask(segment_ids),
                                        implementation="xla")
