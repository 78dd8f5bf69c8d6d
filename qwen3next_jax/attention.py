"""Gated softmax attention: causal GQA with q/k RMSNorm, partial RoPE and a per-head sigmoid output gate.

q_proj yields, per head, [query (head_dim) | gate (head_dim)] side by side (interleaved per head, not two halves of
the row). The gate multiplies the attention output before o_proj (the "G1" position of arXiv 2505.06708). The
attention itself (causal, within packed documents) is the registry's "attention" family; under a mesh it runs per
shard of the batch, the key-value heads and the sequence (context parallelism: qwen3next_jax.context_parallel).
"""

from __future__ import annotations

import jax
from flax import nnx

from qwen3next_jax import context_parallel as cp
from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import Execution
from qwen3next_jax.interface import Aux, Context
from qwen3next_jax.layers import Linear
from qwen3next_jax.norms import RMSNorm
from qwen3next_jax.rope import apply_rope
from qwen3next_jax.sharding import per_shard
from qwen3next_kernels.registry import FAMILIES, Platform


def attention_site(cfg: Qwen3NextConfig, dtype) -> dict:
    return dict(heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                dtype=jax.numpy.dtype(dtype).name)


class GatedAttention(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, execution: Execution, platform: Platform):
        D, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(rngs=rngs, bias=cfg.attention_bias, dtype=execution.dtype, param_dtype=execution.params,
                  std=cfg.initializer_range)
        self.q_proj = Linear(D, H * hd * 2, ("embed", "q_heads"), **kw)
        self.k_proj = Linear(D, KV * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(D, KV * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(H * hd, D, ("q_heads", "embed"), **kw)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=execution.params)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=execution.params)
        self.num_heads, self.num_kv_heads, self.head_dim = H, KV, hd
        self.kernels = {"attention": execution.resolve("attention", attention_site(cfg, execution.dtype), platform)}

    def __call__(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, Aux]:
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q_and_gate = self.q_proj(x).reshape(B, T, H, 2 * hd)
        q, gate = q_and_gate[..., :hd], q_and_gate[..., hd:]
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).reshape(B, T, KV, hd))
        v = self.v_proj(x).reshape(B, T, KV, hd)
        cos, sin = ctx.rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Query heads grouped by their key-value head ([B, T, KV, H / KV, hd]), so that shards of the heads split
        # both alike.
        grouped = ("batch", "seq", "kv_heads", None)
        segments = None if ctx.segment_ids is None else ("batch", "seq")
        out = per_shard(self._attend, in_axes=(grouped + (None,), grouped, grouped, segments),
                        out_axes=grouped + (None,), sequence=True)(q.reshape(B, T, KV, H // KV, hd), k, v,
                                                                   ctx.segment_ids)
        out = out.reshape(B, T, H * hd) * jax.nn.sigmoid(gate.reshape(B, T, H * hd))
        return self.o_proj(out), Aux.zero()

    def _attend(self, q, k, v, segment_ids, *, seq_axis):
        """q [B, T, KV, H / KV, hd], k and v [B, T, KV, hd] (a shard's, under a mesh) -> [B, T, KV, H / KV, hd]."""
        B, T, KV, r, hd = q.shape
        attend = FAMILIES["attention"].function(self.kernels["attention"])
        q = q.reshape(B, T, KV * r, hd)                   # query head h reads key-value head h // r
        if seq_axis is None:
            out = attend(q, k, v, segment_ids, scale=hd ** -0.5)
        else:
            out = cp.attention_over_shards(attend, q, k, v, segment_ids, axis=seq_axis, scale=hd ** -0.5)
        return out.reshape(B, T, KV, r, hd)
