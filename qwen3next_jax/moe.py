"""Feed-forward blocks: the dense SwiGLU MLP and the ultra-sparse mixture of experts with a gated shared expert.

Routing: softmax over all experts in fp32, top-k, optional renormalisation of the k weights, cast to the activation
dtype. Dispatch is dropless and sort-based: the N*k (token, expert) assignments are sorted by expert so each
expert's tokens are contiguous, and three grouped matmuls (`jax.lax.ragged_dot`) run every expert at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.layers import Linear, param


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype, param_dtype, std: float):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=std)
        self.gate_proj = Linear(hidden, intermediate, ("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden, intermediate, ("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nnx.Module):
    """E SwiGLU experts stored stacked: gate_proj, up_proj [E, D, I]; down_proj [E, I, D]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype, param_dtype,
                 std: float):
        E, D, I = num_experts, hidden, intermediate
        self.gate_proj = param(rngs, (E, D, I), param_dtype, ("experts", "embed", "expert_mlp"), std=std)
        self.up_proj = param(rngs, (E, D, I), param_dtype, ("experts", "embed", "expert_mlp"), std=std)
        self.down_proj = param(rngs, (E, I, D), param_dtype, ("experts", "expert_mlp", "embed"), std=std)
        self.dtype = dtype

    def __call__(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """x_sorted [M, D], rows grouped by expert; group_sizes [E] rows per expert."""
        w = lambda p: p[...].astype(self.dtype)
        h = jax.nn.silu(jax.lax.ragged_dot(x_sorted, w(self.gate_proj), group_sizes))
        h = h * jax.lax.ragged_dot(x_sorted, w(self.up_proj), group_sizes)
        return jax.lax.ragged_dot(h, w(self.down_proj), group_sizes)  # [M, D]


def load_balancing_loss(probs: jax.Array, top_idx: jax.Array, token_mask: jax.Array) -> jax.Array:
    """E * sum_e f_e P_e over the real tokens: f_e the share of top-k assignments to e, P_e the mean probability.

    probs [N, E] fp32; top_idx [N, k]; token_mask [N] (0 for padding). Balanced routing gives 1.
    """
    E, k = probs.shape[-1], top_idx.shape[-1]
    mask = token_mask.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    counts = jnp.zeros((E,), jnp.float32).at[top_idx.reshape(-1)].add(jnp.repeat(mask, k))
    f = counts / (n * k)
    P = (probs * mask[:, None]).sum(0) / n
    return E * jnp.sum(f * P)


class SparseMoE(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        D, std = cfg.hidden_size, cfg.initializer_range
        self.gate = Linear(D, cfg.num_experts, ("embed", None), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                           std=std)
        self.experts = Experts(cfg.num_experts, D, cfg.moe_intermediate_size, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype, std=std)
        self.shared_expert = MLP(D, cfg.shared_expert_intermediate_size, rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype, std=std)
        self.shared_expert_gate = Linear(D, 1, ("embed", None), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                         std=std)
        self.top_k, self.norm_topk_prob, self.dtype = cfg.num_experts_per_tok, cfg.norm_topk_prob, dtype

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D], token_mask [B, T] -> (y [B, T, D], load-balancing loss)."""
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)
        probs = jax.nn.softmax(self.gate(x2).astype(jnp.float32), axis=-1)      # [N, E]
        top_w, top_idx = jax.lax.top_k(probs, self.top_k)                      # [N, k]
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(-1, keepdims=True)
        top_w = top_w.astype(self.dtype)

        # Sort the N*k assignments by expert; order[m] is the flat (token * k + slot) of sorted row m.
        flat_expert = top_idx.reshape(-1)
        order = jnp.argsort(flat_expert, stable=True)
        group_sizes = jnp.bincount(flat_expert, length=probs.shape[-1]).astype(jnp.int32)
        y_sorted = self.experts(x2[order // self.top_k], group_sizes)          # [N*k, D]
        y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(B * T, self.top_k, D)
        routed = jnp.einsum("nkd,nk->nd", y, top_w)

        shared = self.shared_expert(x2) * jax.nn.sigmoid(self.shared_expert_gate(x2))
        aux = load_balancing_loss(probs, top_idx, token_mask.reshape(-1))
        return (routed + shared).reshape(B, T, D), aux
