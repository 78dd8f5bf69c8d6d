"""The LM head's cross entropy (the registry's "loss" family): every implementation against the definition, log
softmax of the full logits, in values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3next_kernels.registry import FAMILIES


@pytest.mark.parametrize("impl", [i.name for i in FAMILIES["loss"].impls])
def test_matches_full_logits(impl):
    B, T, D, V = 2, 9, 8, 50
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (B, T, D))
    w = jax.random.normal(k2, (D, V))
    y = jax.random.randint(k3, (B, T), 0, V)
    linear_cross_entropy = FAMILIES["loss"].function(impl)

    def full(h, w):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]

    def ours(h, w):
        return linear_cross_entropy(h, w, y, chunk_tokens=4)[0]  # 18 tokens: the chunked form's last chunk is padded

    np.testing.assert_allclose(ours(h, w), full(h, w), rtol=1e-5, atol=1e-5)
    g_full = jax.grad(lambda h, w: full(h, w).sum(), argnums=(0, 1))(h, w)
    g_ours = jax.grad(lambda h, w: ours(h, w).sum(), argnums=(0, 1))(h, w)
    for a, b in zip(g_ours, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
