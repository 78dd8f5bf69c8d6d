"""reference.attention through cuDNN's flash attention (jax.nn.dot_product_attention, implementation="cudnn"). For
queries at the keys' positions the causal part is skipped and the document mask travels as a dense [B, 1, T, T]
mask; for a shard of queries (q_offset, context parallelism) the whole [B, 1, Tq, Tk] mask does, causal part
included."""
import jax

from qwen3next_kernels.attention.reference import mask


def supports(platform, site):
    """A Hopper GPU with bf16 or fp16 activations and a head dim cuDNN takes (a multiple of 8, at most 256)."""
    return (platform.is_hopper and site["dtype"] in ("bfloat16", "float16") and site["head_dim"] % 8 == 0
            and site["head_dim"] <= 256)


def attention(q, k, v, segment_ids=None, *, scale, q_offset=0, kv_segment_ids=None):
    if isinstance(q_offset, int) and q_offset == 0 and kv_segment_ids is None:
        document = None if segment_ids is None else mask(q.shape[1], k.shape[1], segment_ids)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, mask=document,
                                            implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn",
                                        mask=mask(q.shape[1], k.shape[1], segment_ids, kv_segment_ids, q_offset))
