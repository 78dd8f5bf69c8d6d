"""The experts' grouped matmul: the tiled form against jax.lax.ragged_dot, and its memory bound."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3next_jax import Qwen3NextConfig
from qwen3next_jax.moe import SparseMoE, tiled_grouped_matmul


@pytest.mark.parametrize("sizes", [[5, 0, 17, 1, 0, 30], [0, 0, 53, 0, 0, 0], [9, 9, 9, 9, 9, 8]])
def test_tiled_matches_ragged_dot_values_and_gradients(sizes):
    rng = np.random.default_rng(0)
    M, D, F = sum(sizes), 12, 7
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((len(sizes), D, F)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    ct = jnp.asarray(rng.standard_normal((M, F)), jnp.float32)
    # tile 4 and a block of 3 tiles: several tiles per group, partial tiles, several blocks.
    tiled = lambda x, w: tiled_grouped_matmul(x, w, gs, tile=4, block_bytes=3 * D * F * 4)
    ragged = lambda x, w: jax.lax.ragged_dot(x, w, gs)
    (y1, vjp1), (y2, vjp2) = jax.vjp(tiled, x, w), jax.vjp(ragged, x, w)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(vjp1(ct), vjp2(ct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_moe_layer_is_the_same_with_either_grouped_matmul():
    cfg = Qwen3NextConfig.preset("tiny")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 33, cfg.hidden_size))
    mask = jnp.ones((2, 33), bool)
    outs = []
    for impl in ("tiled", "ragged_dot"):
        moe = SparseMoE(cfg, rngs=nnx.Rngs(0), moe_impl=impl)
        outs.append(nnx.jit(lambda m, x: m(x, mask))(moe, x))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-6)


def test_tiled_moe_memory_is_bounded_at_the_bench_shape():
    """One bench-1p3b MoE layer at 16K tokens, forward + backward: the dense expansion of ragged_dot off TPU
    needs over 100 GiB of temporaries; the tiled form a few."""
    cfg = Qwen3NextConfig.preset("bench-1p3b")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: SparseMoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                                  moe_impl="tiled")))
    x = jax.ShapeDtypeStruct((8, 2048, cfg.hidden_size), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((8, 2048), bool)

    def loss(state, x, mask):
        y, aux = nnx.merge(graphdef, state)(x, mask)
        return y.astype(jnp.float32).mean() + aux

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x, mask).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 8 * 2**30


def test_unknown_moe_impl_is_named():
    with pytest.raises(ValueError, match="unknown moe_impl 'megablox'"):
        SparseMoE(Qwen3NextConfig.preset("tiny"), rngs=nnx.Rngs(0), moe_impl="megablox")
