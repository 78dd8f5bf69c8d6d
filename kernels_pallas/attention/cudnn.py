"""reference.attention through cuDNN's flash attention (jax.nn.dot_product_attention, implementation="cudnn"): the
causal part is skipped, but the document mask still travels as a dense [B, 1, T, T] mask."""
import jax

from qwen3next_kernels.attention.reference import segment_mask


def supports(platform, site):
    """A Hopper GPU with bf16 or fp16 activations and a head dim cuDNN takes (a multiple of 8, at most 256)."""
    return (platform.is_hopper and site["dtype"] in ("bfloat16", "float16") and site["head_dim"] % 8 == 0
            and site["head_dim"] <= 256)


def attention(q, k, v, segment_ids=None, *, scale):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, mask=segment_mask(segment_ids),
                                        implementation="cudnn")
