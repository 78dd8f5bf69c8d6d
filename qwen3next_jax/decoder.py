"""The decoder layer and the layer stack, scanned over its repeating block.

A layer is `x += mixer(input_layernorm(x)); x += mlp(post_attention_layernorm(x))`, the mixer being Gated DeltaNet or
gated attention and the mlp a sparse MoE or a dense MLP. The stack finds the shortest period P of the layers' kinds
(4 for Qwen3-Next: 3 Gated DeltaNet + 1 attention) and stores each of the P layer positions with its parameters
stacked over the R = num_layers / P repeats, so a `lax.scan` over R runs the whole stack and compile time does not
grow with depth. Any `layer_types` works: with no shorter period the block is the whole stack, scanned once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax.attention import GatedAttention
from qwen3next_jax.config import FULL, Qwen3NextConfig
from qwen3next_jax.gated_deltanet import GatedDeltaNet
from qwen3next_jax.moe import MLP, SparseMoE
from qwen3next_jax.norms import RMSNorm

# What each layer keeps for the backward pass. "none" keeps everything, "full" recomputes the layer,
# "dots" keeps only matmul outputs without batch dimensions (projections), recomputing the rest.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, layer_type: str, sparse: bool, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, gdn_impl: str = "auto", attention_impl: str | None = None,
                 moe_impl: str = "auto"):
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if layer_type == FULL:
            self.mixer = GatedAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                        attention_impl=attention_impl)
        else:
            self.mixer = GatedDeltaNet(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, gdn_impl=gdn_impl)
        if sparse:
            self.mlp = SparseMoE(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, moe_impl=moe_impl)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                           std=cfg.initializer_range)

    def __call__(self, x, rope, segment_ids, token_mask) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> (x, load-balancing loss of this layer, 0 for a dense MLP)."""
        h = self.input_layernorm(x)
        x = x + (self.mixer(h, rope, segment_ids) if self.layer_type == FULL else self.mixer(h, segment_ids))
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoE):
            y, aux = self.mlp(h, token_mask)
        else:
            y, aux = self.mlp(h), jnp.zeros((), jnp.float32)
        return x + y, aux


def layer_period(cfg: Qwen3NextConfig) -> int:
    """The shortest P dividing num_layers such that layer i has the kinds of layer i % P."""
    n = cfg.num_hidden_layers
    sig = [cfg.layer_signature(i) for i in range(n)]
    return next(p for p in range(1, n + 1) if n % p == 0 and all(sig[i] == sig[i % p] for i in range(n)))


def _stacked(make_layer, repeats: int) -> DecoderLayer:
    """One DecoderLayer whose every parameter has a leading axis of `repeats` independently initialised copies."""
    layers = [make_layer() for _ in range(repeats)]
    graphdef, _ = nnx.split(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(layer) for layer in layers])
    return nnx.merge(graphdef, stacked)


class DecoderStack(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, remat: str = "none", **layer_kw):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {remat!r}; choose from {sorted(REMAT_POLICIES)}")
        self.period = layer_period(cfg)
        self.repeats = cfg.num_hidden_layers // self.period
        self.remat = remat
        self.blocks = nnx.List([
            _stacked(lambda j=j: DecoderLayer(cfg, *cfg.layer_signature(j), rngs=rngs, **layer_kw), self.repeats)
            for j in range(self.period)])

    def layer_location(self, i: int) -> tuple[int, int]:
        """(repeat r, block position j) holding decoder layer i."""
        return divmod(i, self.period)

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i as a standalone module (its slice of the stacked block), for inspection and tests."""
        r, j = self.layer_location(i)
        graphdef, state = nnx.split(self.blocks[j])
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[r], state))

    def __call__(self, x, rope, segment_ids, token_mask) -> tuple[jax.Array, jax.Array]:
        graphdefs, states = zip(*(nnx.split(block) for block in self.blocks))

        def run_layer(graphdef, state, x, rope, segment_ids, token_mask):
            return nnx.merge(graphdef, state)(x, rope, segment_ids, token_mask)

        if self.remat != "none":
            run_layer = jax.checkpoint(run_layer, policy=REMAT_POLICIES[self.remat], static_argnums=(0,))

        def one_repeat(x, states_r):
            aux = jnp.zeros((), jnp.float32)
            for graphdef, state in zip(graphdefs, states_r):
                x, layer_aux = run_layer(graphdef, state, x, rope, segment_ids, token_mask)
                aux = aux + layer_aux
            return x, aux

        x, aux = jax.lax.scan(one_repeat, x, states)
        return x, aux.sum()
