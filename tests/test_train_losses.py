"""The chunked fp32 cross entropy equals the plain one (values and gradients); targets respect documents."""
import jax
import jax.numpy as jnp
import numpy as np

from qwen3next_train.losses import chunked_cross_entropy, shifted_targets


def test_chunked_cross_entropy_matches_full_logits():
    B, T, D, V = 2, 9, 8, 50
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (B, T, D))
    w = jax.random.normal(k2, (D, V))
    y = jax.random.randint(k3, (B, T), 0, V)

    def full(h, w):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]

    def chunked(h, w):
        return chunked_cross_entropy(h, w, y, chunk_tokens=4)[0]  # 18 tokens: the last chunk is padded

    np.testing.assert_allclose(chunked(h, w), full(h, w), rtol=1e-5, atol=1e-5)
    g_full = jax.grad(lambda h, w: full(h, w).sum(), argnums=(0, 1))(h, w)
    g_chunked = jax.grad(lambda h, w: chunked(h, w).sum(), argnums=(0, 1))(h, w)
    for a, b in zip(g_chunked, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_targets_stay_inside_documents():
    ids = jnp.array([[10, 11, 12, 20, 21, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    targets, mask = shifted_targets(ids, seg, 1)
    np.testing.assert_array_equal(targets, [[11, 12, 20, 21, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 0, 0]])  # no target across the boundary, none for padding
    targets, mask = shifted_targets(ids, seg, 2)  # MTP depth 1 predicts x_{t+2}
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 0, 0]])
