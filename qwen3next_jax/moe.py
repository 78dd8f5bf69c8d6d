"""Feed-forward blocks: the dense SwiGLU MLP and the ultra-sparse mixture of experts with a gated shared expert.

Routing: softmax over all experts in fp32, top-k, optional renormalisation of the k weights, cast to the activation
dtype. Dispatch is dropless and sort-based: the N*k (token, expert) assignments are sorted by expert, so each
expert's rows are contiguous, and the experts' SwiGLU MLP (the registry's "moe" family) runs every expert at once
on the sorted rows. Dispatch and combine are gathers whose transposes are gathers too (by the inverse permutation):
no scatter-add in the forward or the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import Execution
from qwen3next_jax.interface import Aux, Context
from qwen3next_jax.layers import Linear, param
from qwen3next_kernels.registry import FAMILIES, Platform


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)): a dense feed-forward block, and the MoE's shared expert."""

    def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype, param_dtype, std: float):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=std)
        self.gate_proj = Linear(hidden, intermediate, ("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden, intermediate, ("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, ctx: Context | None = None) -> tuple[jax.Array, Aux]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)), Aux.zero()


def moe_site(cfg: Qwen3NextConfig, dtype) -> dict:
    return dict(experts=cfg.num_experts, hidden=cfg.hidden_size, width=cfg.moe_intermediate_size,
                dtype=jnp.dtype(dtype).name)


class Experts(nnx.Module):
    """E SwiGLU experts stored stacked: gate_proj, up_proj [E, D, I]; down_proj [E, I, D]."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, execution: Execution, platform: Platform):
        E, D, I, std = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.initializer_range
        self.gate_proj = param(rngs, (E, D, I), execution.params, ("experts", "embed", "expert_mlp"), std=std)
        self.up_proj = param(rngs, (E, D, I), execution.params, ("experts", "embed", "expert_mlp"), std=std)
        self.down_proj = param(rngs, (E, I, D), execution.params, ("experts", "expert_mlp", "embed"), std=std)
        self.dtype = execution.dtype
        self.kernels = {"moe": execution.resolve("moe", moe_site(cfg, execution.dtype), platform)}

    def __call__(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """x_sorted [M, D], rows grouped by expert; group_sizes [E] rows per expert -> [M, D]."""
        w = lambda p: p[...].astype(self.dtype)
        expert_mlp = FAMILIES["moe"].function(self.kernels["moe"])
        return expert_mlp(x_sorted, w(self.gate_proj), w(self.up_proj), w(self.down_proj), group_sizes)


# ------------------------------------------------------------------------------------------- the permutations

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_to_experts(x, order, inverse, k):
    """x [N, D] -> [N*k, D] in expert order: row m is token order[m] // k. Its transpose gathers each token's k
    rows back (by the inverse permutation) and sums them, instead of a k-way contended scatter-add."""
    return x[order // k]


def _gather_to_experts_fwd(x, order, inverse, k):
    return x[order // k], inverse


def _gather_to_experts_bwd(k, inverse, g):
    N = inverse.shape[0] // k
    dx = g[inverse].reshape(N, k, g.shape[-1]).astype(jnp.float32).sum(1)
    return dx.astype(g.dtype), None, None


gather_to_experts.defvjp(_gather_to_experts_fwd, _gather_to_experts_bwd)


@jax.custom_vjp
def combine_from_experts(y_sorted, weights, order, inverse):
    """out[n] = sum_j weights[n, j] y_sorted[inverse[n k + j]]: each token's k expert outputs, weighted.
    y_sorted [N*k, D] in expert order, weights [N, k]. The backward gathers too: d y_sorted[m] is token
    order[m] // k's output gradient times its weight (one pass), d weights a gathered dot."""
    return _combine(y_sorted, weights, inverse)


def _combine(y_sorted, weights, inverse):
    N, k = weights.shape
    y = y_sorted[inverse].reshape(N, k, y_sorted.shape[-1])                  # [N, k, D]
    return jnp.einsum("nkd,nk->nd", y, weights)


def _combine_fwd(y_sorted, weights, order, inverse):
    return _combine(y_sorted, weights, inverse), (y_sorted, weights, order, inverse)


def _combine_bwd(res, dout):
    y_sorted, weights, order, inverse = res
    N, k = weights.shape
    d_y_sorted = (weights.reshape(-1)[order][:, None] * dout[order // k]).astype(y_sorted.dtype)
    y = y_sorted[inverse].reshape(N, k, y_sorted.shape[-1])
    d_weights = jnp.einsum("nkd,nd->nk", y, dout, preferred_element_type=jnp.float32).astype(weights.dtype)
    return d_y_sorted, d_weights, None, None


combine_from_experts.defvjp(_combine_fwd, _combine_bwd)


def sort_by_expert(top_idx: jax.Array, num_experts: int):
    """top_idx [N, k] -> (order, inverse [N*k], group_sizes [E] int32): order[m] is the flat (token * k + slot) of
    sorted row m, stable within an expert; inverse[a] is the sorted row of flat assignment a."""
    flat = top_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32),
                                                  unique_indices=True)
    group_sizes = jnp.sum(flat[:, None] == jnp.arange(num_experts, dtype=flat.dtype), axis=0, dtype=jnp.int32)
    return order, inverse, group_sizes


# ------------------------------------------------------------------------------------------------- statistics

def router_stats(probs: jax.Array, top_idx: jax.Array, token_mask: jax.Array, total=lambda x: x) -> Aux:
    """Aux over the real tokens: load balancing E * sum_e f_e P_e (f_e the share of top-k assignments to e, P_e the
    mean router probability; 1 when balanced) and the largest expert load over the mean.

    probs [N, E] fp32; top_idx [N, k]; token_mask [N]. `total` sums a statistic over every shard of the batch
    (a psum under shard_map), so that the statistics are those of the whole batch."""
    E, k = probs.shape[-1], top_idx.shape[-1]
    mask = token_mask.astype(jnp.float32)
    counts = total(jnp.einsum("nke,n->e", jax.nn.one_hot(top_idx, E, dtype=jnp.float32), mask))
    prob_sums = total(jnp.einsum("ne,n->e", probs, mask))
    n = jnp.maximum(total(mask.sum()), 1.0)
    f, P = counts / (n * k), prob_sums / n
    mean_load = n * k / E
    return Aux(E * jnp.sum(f * P), jnp.max(counts) / mean_load, jnp.zeros((), jnp.float32))


class SparseMoE(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, execution: Execution, platform: Platform):
        D, std = cfg.hidden_size, cfg.initializer_range
        kw = dict(rngs=rngs, dtype=execution.dtype, param_dtype=execution.params, std=std)
        self.gate = Linear(D, cfg.num_experts, ("embed", None), **kw)
        self.experts = Experts(cfg, rngs=rngs, execution=execution, platform=platform)
        self.shared_expert = MLP(D, cfg.shared_expert_intermediate_size, **kw)
        self.shared_expert_gate = Linear(D, 1, ("embed", None), **kw)
        self.top_k, self.norm_topk_prob, self.dtype = cfg.num_experts_per_tok, cfg.norm_topk_prob, execution.dtype

    def route(self, x2: jax.Array):
        """x2 [N, D] -> (router probabilities [N, E] fp32, top-k weights [N, k] in the compute dtype, top-k
        experts [N, k])."""
        probs = jax.nn.softmax(self.gate(x2).astype(jnp.float32), axis=-1)
        top_w, top_idx = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(-1, keepdims=True)
        return probs, top_w.astype(self.dtype), top_idx

    def __call__(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, Aux]:
        """x [B, T, D] -> (y [B, T, D], router statistics)."""
        B, T, D = x.shape
        k = self.top_k
        x2 = x.reshape(B * T, D)
        probs, top_w, top_idx = self.route(x2)
        order, inverse, group_sizes = sort_by_expert(top_idx, probs.shape[-1])
        y_sorted = self.experts(gather_to_experts(x2, order, inverse, k), group_sizes)   # [N*k, D]
        routed = combine_from_experts(y_sorted, top_w, order, inverse)                 # [N, D]
        shared = self.shared_expert(x2)[0] * jax.nn.sigmoid(self.shared_expert_gate(x2))
        aux = router_stats(probs, top_idx, ctx.token_mask.reshape(-1))
        return (routed + shared).reshape(B, T, D), aux
