"""reference.attention through cuDNN's flash attention.

Queries at the keys' positions (the usual case) run cuDNN's packed-sequence form: each row's documents are passed as
offsets and lengths and cuDNN applies the causal mask within each; this branch builds no [T, T] mask, and its memory
grows linearly with T. cuDNN sees a document boundary wherever the segment id changes: a document's tokens are one
run of its row (how packed rows are made), which is what makes this equal to the reference's mask.

The offsets array has a static width, `max_documents` per row (documents_per_row: 16). A batch with a
row of more documents takes the other branch of a lax.cond: the same cuDNN kernel with a dense [B, 1, T, T] mask,
exact, with that mask's memory. A shard of queries (q_offset, context parallelism) always takes the dense mask,
causal part included.
"""
import jax
import jax.numpy as jnp
from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention as cudnn_attention

from qwen3next_kernels.attention.reference import mask


def supports(platform, site):
    """A Hopper GPU with bf16 or fp16 activations and a head dim cuDNN takes (a multiple of 8, at most 256)."""
    return (platform.is_hopper and site["dtype"] in ("bfloat16", "float16") and site["head_dim"] % 8 == 0
            and site["head_dim"] <= 256)


def documents_per_row(seq_len: int) -> int:
    """The offsets' static width M. cuDNN's grid and its backward's fp32 workspace cover every (row, document slot,
    head, position up to T): about 8 bytes x B x M x heads x T x head_dim, so M is kept small; a batch with a row of
    more documents takes the dense-mask branch (module docstring)."""
    return min(seq_len, 16)


def documents(segment_ids, max_documents):
    """Contiguous segment ids [B, T] -> (offsets [B, M + 1], lengths [B, M], count [B]) in cuDNN's packed form:
    each row's document starts and lengths, -1 past its last document, M = max_documents; count is the number of
    documents each row has (it may exceed M, and then offsets and lengths hold only the first M)."""
    B, T = segment_ids.shape
    position = jnp.arange(T, dtype=jnp.int32)
    is_start = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    count = is_start.sum(axis=1, dtype=jnp.int32)
    # The start positions in order, T where a row has no more: the smallest M + 1 of (position where a start, else
    # T), with one T more so that a row of T one-token documents still ends at T.
    candidates = jnp.concatenate([jnp.where(is_start, position, T), jnp.full((B, 1), T, jnp.int32)], axis=1)
    starts = -jax.lax.top_k(-candidates, max_documents + 1)[0]  # [B, M + 1]
    ends = starts[:, 1:]  # a document ends where the next starts, the last at T
    present = starts[:, :-1] < T
    lengths = jnp.where(present, ends - starts[:, :-1], -1)
    offsets = jnp.concatenate([jnp.where(present, starts[:, :-1], -1), jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return offsets, lengths, count


def packed_attention(q, k, v, segment_ids, *, scale, max_documents):
    """Causal attention within each row's documents through cuDNN's packed form; rows of more than max_documents
    documents make the whole batch take the dense-mask form instead."""
    offsets, lengths, count = documents(segment_ids, max_documents)

    def packed(q, k, v):
        return cudnn_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
                               scale=scale, mask_type=MaskType.PADDING_CAUSAL)

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn",
                                            mask=mask(q.shape[1], k.shape[1], segment_ids))

    return jax.lax.cond(jnp.max(count) <= max_documents, packed, dense, q, k, v)


def attention(q, k, v, segment_ids=None, *, scale, q_offset=0, kv_segment_ids=None):
    if isinstance(q_offset, int) and q_offset == 0 and kv_segment_ids is None:
        if segment_ids is None:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
        return packed_attention(q, k, v, segment_ids, scale=scale, max_documents=documents_per_row(q.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn",
                                        mask=mask(q.shape[1], k.shape[1], segment_ids, kv_segment_ids, q_offset))
