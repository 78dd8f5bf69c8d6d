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
from qwen3next_jax.execution import REMAT_POLICIES, Execution
from qwen3next_jax.gated_deltanet import GatedDeltaNet
from qwen3next_jax.interface import Aux, Context
from qwen3next_jax.moe import MLP, SparseMoE
from qwen3next_jax.norms import RMSNorm
from qwen3next_jax.sharding import constrain
from qwen3next_kernels.registry import Platform

ACTIVATIONS = ("batch", "seq", None)  # the logical axes of the hidden state [B, T, D] between blocks


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, layer_type: str, sparse: bool, *, rngs: nnx.Rngs,
                 execution: Execution, platform: Platform):
        kw = dict(rngs=rngs, execution=execution, platform=platform)
        self.layer_type = layer_type
        # Scope names of the two halves, so a profile groups device time by part (benchmarks/train_step.py).
        self.scopes = ("attention" if layer_type == FULL else "gated_deltanet", "moe" if sparse else "mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=execution.params)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=execution.params)
        self.mixer = GatedAttention(cfg, **kw) if layer_type == FULL else GatedDeltaNet(cfg, **kw)
        if sparse:
            self.mlp = SparseMoE(cfg, **kw)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, dtype=execution.dtype,
                           param_dtype=execution.params, std=cfg.initializer_range)

    def __call__(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, Aux]:
        """x [B, T, D] -> (x, this layer's router statistics: zero for a dense MLP)."""
        with jax.named_scope(self.scopes[0]):
            y, mixer_aux = self.mixer(self.input_layernorm(x), ctx)
        x = constrain(x + y, ACTIVATIONS)
        with jax.named_scope(self.scopes[1]):
            y, mlp_aux = self.mlp(self.post_attention_layernorm(x), ctx)
        return constrain(x + y, ACTIVATIONS), mixer_aux.combine(mlp_aux)


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
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, execution: Execution, platform: Platform):
        self.period = layer_period(cfg)
        self.repeats = cfg.num_hidden_layers // self.period
        self.remat = execution.remat
        self.blocks = nnx.List([
            _stacked(lambda j=j: DecoderLayer(cfg, *cfg.layer_signature(j), rngs=rngs, execution=execution,
                                              platform=platform), self.repeats)
            for j in range(self.period)])

    def layer_location(self, i: int) -> tuple[int, int]:
        """(repeat r, block position j) holding decoder layer i."""
        return divmod(i, self.period)

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i as a standalone module (its slice of the stacked block), for inspection and tests."""
        r, j = self.layer_location(i)
        graphdef, state = nnx.split(self.blocks[j])
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[r], state))

    def __call__(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, Aux]:
        graphdefs, states = zip(*(nnx.split(block) for block in self.blocks))

        def run_layer(graphdef, state, x, ctx):
            return nnx.merge(graphdef, state)(x, ctx)

        if self.remat != "none":
            run_layer = jax.checkpoint(run_layer, policy=REMAT_POLICIES[self.remat], static_argnums=(0,))

        def one_repeat(carry, states_r):
            x, aux = carry
            for graphdef, state in zip(graphdefs, states_r):
                x, layer_aux = run_layer(graphdef, state, x, ctx)
                aux = aux.combine(layer_aux)
            return (x, aux), None

        (x, aux), _ = jax.lax.scan(one_repeat, (x, Aux.zero()), states)
        return x, aux
