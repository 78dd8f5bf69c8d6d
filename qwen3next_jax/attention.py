"""Gated softmax attention: causal GQA with q/k RMSNorm, partial RoPE and a per-head sigmoid output gate.

q_proj yields, per head, [query (head_dim) | gate (head_dim)] side by side (interleaved per head, not two halves of
the row). The gate multiplies the attention output before o_proj (the "G1" position of arXiv 2505.06708).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.layers import Linear
from qwen3next_jax.norms import RMSNorm
from qwen3next_jax.rope import apply_rope


def segment_mask(segment_ids: jax.Array | None) -> jax.Array | None:
    """[B, 1, T, T] True where query and key belong to the same packed document."""
    if segment_ids is None:
        return None
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


class GatedAttention(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = None):
        D, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(rngs=rngs, bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype,
                  std=cfg.initializer_range)
        self.q_proj = Linear(D, H * hd * 2, ("embed", "q_heads"), **kw)
        self.k_proj = Linear(D, KV * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(D, KV * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(H * hd, D, ("q_heads", "embed"), **kw)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = H, KV, hd
        # None lets JAX pick (cuDNN flash attention on GPU where it applies, else XLA); "xla" forces the einsums.
        self.attention_impl = attention_impl

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], segment_ids: jax.Array | None) -> jax.Array:
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q_and_gate = self.q_proj(x).reshape(B, T, H, 2 * hd)
        q, gate = q_and_gate[..., :hd], q_and_gate[..., hd:]
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).reshape(B, T, KV, hd))
        v = self.v_proj(x).reshape(B, T, KV, hd)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = jax.nn.dot_product_attention(q, k, v, scale=hd ** -0.5, is_causal=True, mask=segment_mask(segment_ids),
                                           implementation=self.attention_impl)  # [B, T, H, hd]
        out = out.reshape(B, T, H * hd) * jax.nn.sigmoid(gate.reshape(B, T, H * hd))
        return self.o_proj(out)
