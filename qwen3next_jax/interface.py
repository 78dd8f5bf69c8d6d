"""What every block takes besides the hidden state, and what it returns besides its output.

Every mixer (Gated DeltaNet, gated attention) and every feed-forward block (MoE, dense MLP) is called as
`block(x, ctx) -> (y, aux)`: x and y [B, T, D], ctx the row's context, aux the block's auxiliary terms (zero where
it has none). A decoder layer, the layer stack and the MTP layers combine the aux of their blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
    rope: tuple[jax.Array, jax.Array]  # cos, sin [B, T, rotary_dim] in the compute dtype
    segment_ids: jax.Array | None  # [B, T] int, 0 = padding; None: one document a row
    token_mask: jax.Array  # [B, T] bool: real tokens (what the router's statistics count)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Aux:
    """Router statistics, fp32 scalars: the load-balancing loss (summed over MoE layers), the largest expert load
    over the mean load (the max over layers: 1 is perfect balance), and the (token, expert) assignments that an
    expert capacity dropped (summed over layers)."""
    load_balancing: jax.Array
    load_max_over_mean: jax.Array
    dropped: jax.Array

    @classmethod
    def zero(cls) -> "Aux":
        z = jnp.zeros((), jnp.float32)
        return cls(z, z, z)

    def combine(self, other: "Aux") -> "Aux":
        return Aux(self.load_balancing + other.load_balancing,
                   jnp.maximum(self.load_max_over_mean, other.load_max_over_mean), self.dropped + other.dropped)
