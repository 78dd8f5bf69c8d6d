"""Feed-forward blocks: the dense SwiGLU MLP and the ultra-sparse mixture of experts with a gated shared expert.

Routing: softmax over all experts in fp32, top-k, optional renormalisation of the k weights, cast to the activation
dtype. Dispatch is dropless and sort-based: the N*k (token, expert) assignments are sorted by expert so each
expert's tokens are contiguous, and three grouped matmuls run every expert at once.

The grouped matmul has two forms. `jax.lax.ragged_dot` is native on TPU; elsewhere JAX 0.11 lowers it by expanding
the rows to [experts, rows, features] (126 GiB of temporaries for one bench-1p3b MoE layer at 16K tokens, fwd+bwd,
on the CPU). The "tiled" form pads each expert's rows to whole tiles and multiplies tile by tile with that tile's
expert weights, a few hundred tiles at a time: the arithmetic of the real rows plus under one tile per expert, and
memory bounded by the tiles in flight.
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


def tiled_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int | None = None,
                         block_bytes: int = 256 * 2**20) -> jax.Array:
    """out[m] = x[m] @ w[g(m)], rows of x grouped by g in order; x [M, D], w [G, D, F], group_sizes [G] -> [M, F].

    Each group is padded to whole tiles of `tile` rows (at most one partial tile per group, so M / tile + G tiles
    bound the padded rows statically); blocks of tiles are multiplied with their gathered expert weights, as many
    tiles per block as keep the gathered weights under `block_bytes`. Every tile gathers its expert's whole weight
    matrix, so larger tiles move fewer bytes but pad more rows: by default the largest of 128, 256, 512 rows that is
    at most a quarter of the mean group (padding about 1/8 of the rows). On an H100 a bench-1p3b MoE layer at 16K
    tokens took 43 ms forward + backward with 128-row tiles and 17.5 ms with 512.
    """
    M, D = x.shape
    G, _, F = w.shape
    if tile is None:
        tile = max([t for t in (128, 256, 512) if t <= M // (4 * G)], default=128)
    padded_sizes = -(-group_sizes // tile) * tile
    padded_starts = jnp.cumsum(padded_sizes) - padded_sizes
    group_starts = jnp.cumsum(group_sizes) - group_sizes
    row_group = jnp.repeat(jnp.arange(G), group_sizes, total_repeat_length=M)  # [M]
    dest = padded_starts[row_group] + jnp.arange(M) - group_starts[row_group]  # row m's slot in the padded layout

    per_block = max(1, min(block_bytes // (D * F * w.dtype.itemsize), -(-M // tile) + G))
    n_blocks = -(-(-(-M // tile) + G) // per_block)
    n_tiles = n_blocks * per_block
    x_pad = jnp.zeros((n_tiles * tile, D), x.dtype).at[dest].set(x)
    # Tile t holds rows of the group whose padded range contains it (tiles past the last group: zeros, any weight).
    tile_group = jnp.searchsorted(jnp.cumsum(padded_sizes), jnp.arange(n_tiles) * tile, side="right")
    tile_group = jnp.minimum(tile_group, G - 1)

    @jax.checkpoint  # the backward gathers the block's weights again rather than keeping every block's copy
    def block(_, args):  # x_b [per_block, tile, D], g_b [per_block]
        x_b, g_b = args
        return None, jnp.einsum("std,sdf->stf", x_b, w[g_b])

    _, y = jax.lax.scan(block, None, (x_pad.reshape(n_blocks, per_block, tile, D),
                                      tile_group.reshape(n_blocks, per_block)))
    return y.reshape(n_tiles * tile, F)[dest]


GROUPED_MATMULS = {"ragged_dot": jax.lax.ragged_dot, "tiled": tiled_grouped_matmul}


class Experts(nnx.Module):
    """E SwiGLU experts stored stacked: gate_proj, up_proj [E, D, I]; down_proj [E, I, D].

    moe_impl: "ragged_dot", "tiled", or "auto" (ragged_dot on TPU, where it is native; tiled elsewhere).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype, param_dtype,
                 std: float, moe_impl: str = "auto"):
        E, D, I = num_experts, hidden, intermediate
        self.gate_proj = param(rngs, (E, D, I), param_dtype, ("experts", "embed", "expert_mlp"), std=std)
        self.up_proj = param(rngs, (E, D, I), param_dtype, ("experts", "embed", "expert_mlp"), std=std)
        self.down_proj = param(rngs, (E, I, D), param_dtype, ("experts", "expert_mlp", "embed"), std=std)
        if moe_impl not in ("auto", *GROUPED_MATMULS):
            raise ValueError(f"unknown moe_impl {moe_impl!r}; choose from {['auto', *GROUPED_MATMULS]}")
        self.dtype, self.moe_impl = dtype, moe_impl

    def __call__(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """x_sorted [M, D], rows grouped by expert; group_sizes [E] rows per expert."""
        impl = self.moe_impl
        if impl == "auto":
            impl = "ragged_dot" if jax.default_backend() == "tpu" else "tiled"
        matmul = GROUPED_MATMULS[impl]
        w = lambda p: p[...].astype(self.dtype)
        h = jax.nn.silu(matmul(x_sorted, w(self.gate_proj), group_sizes))
        h = h * matmul(x_sorted, w(self.up_proj), group_sizes)
        return matmul(h, w(self.down_proj), group_sizes)  # [M, D]


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
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 moe_impl: str = "auto"):
        D, std = cfg.hidden_size, cfg.initializer_range
        self.gate = Linear(D, cfg.num_experts, ("embed", None), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                           std=std)
        self.experts = Experts(cfg.num_experts, D, cfg.moe_intermediate_size, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype, std=std, moe_impl=moe_impl)
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
