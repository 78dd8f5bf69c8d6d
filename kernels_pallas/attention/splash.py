"""reference.attention on TPU through JAX's splash attention (jax.experimental.pallas.ops.tpu.splash_attention): a
block-sparse flash attention whose causal mask is static and whose documents come as segment ids, so no [T, T]
mask is ever formed, and blocks wholly above the diagonal are skipped.

Grouped heads: each key/value head with its r = H / KV query heads is one multi-query call (vmapped over the
batch and the key/value heads). T is padded to whole 128-token blocks with segment 0, after every real token, where
the causal mask keeps real queries from seeing it; the padded queries are dropped. The scale multiplies q first.
Queries that are one shard of the keys' sequence (q_offset, context parallelism) take the reference instead: the
kernel's causal mask is fixed when it is built.
"""
import functools

import jax
import jax.numpy as jnp

from qwen3next_kernels.attention import reference
from qwen3next_kernels.registry import interpret_pallas_tpu

BLOCK = 128


def supports(platform, site):
    """A TPU, head dims that fill the MXU's lanes (multiples of 128)."""
    return platform.backend == "tpu" and site["head_dim"] % 128 == 0


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads)])
    return splash.make_splash_mqa(mask, block_sizes=splash.BlockSizes.get_default(), head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def attention(q, k, v, segment_ids=None, *, scale, q_offset=0, kv_segment_ids=None, interpret=None):
    """interpret: run the kernels in the Pallas interpreter; default: when not traced for TPU chips
    (registry.interpret_pallas_tpu: CPU tests)."""
    if not (isinstance(q_offset, int) and q_offset == 0) or kv_segment_ids is not None or q.shape[1] != k.shape[1]:
        return reference.attention(q, k, v, segment_ids, scale=scale, q_offset=q_offset,
                                   kv_segment_ids=kv_segment_ids)
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    B, T, H, hd = q.shape
    KV = k.shape[2]
    r = H // KV
    Tp = -(-T // BLOCK) * BLOCK
    pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2))
    seg = pad(jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32))   # [B, Tp]
    qg = pad((q * jnp.asarray(scale, q.dtype)).reshape(B, T, KV, r, hd)).transpose(0, 2, 3, 1, 4)   # [B,KV,r,Tp,hd]
    kg, vg = (pad(x).transpose(0, 2, 1, 3) for x in (k, v))                                           # [B,KV,Tp,hd]
    kernel = _kernel(r, Tp, interpret_pallas_tpu() if interpret is None else interpret)

    def one(q_h, k_h, v_h, seg_b):  # q_h [r, Tp, hd], k_h and v_h [Tp, hd], seg_b [Tp]
        return kernel(q_h, k_h, v_h, segment_ids=SegmentIds(q=seg_b, kv=seg_b))

    over_heads = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(over_heads, in_axes=(0, 0, 0, 0))(qg, kg, vg, seg)                                 # [B,KV,r,Tp,hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, hd)[:, :T]
