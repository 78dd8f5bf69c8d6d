"""Scaled RoPE variants against transformers' own frequencies (tests/golden/rope_scaling.json)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from qwen3next_jax import Qwen3NextConfig
from qwen3next_jax.rope import apply_rope, inverse_frequencies, rope_tables

with open(os.path.join(os.path.dirname(__file__), "golden", "rope_scaling.json")) as f:
    CASES = json.load(f)


@pytest.mark.parametrize("name", sorted(CASES))
def test_scaled_rope_matches_transformers(name):
    case = CASES[name]
    cfg = Qwen3NextConfig.preset("tiny").replace(**case["config"])
    inv_freq, factor = inverse_frequencies(cfg)
    np.testing.assert_allclose(inv_freq, case["inv_freq"], rtol=2e-6)
    assert factor == pytest.approx(case["attention_scaling"], rel=1e-6)
    cos, sin = rope_tables(cfg, jnp.arange(5)[None] * 1000, jnp.float32)
    angle = 4000.0 * np.asarray(case["inv_freq"], np.float32)
    np.testing.assert_allclose(cos[0, 4, :10], np.cos(angle) * case["attention_scaling"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sin[0, 4, 10:], np.sin(angle) * case["attention_scaling"], rtol=1e-4, atol=1e-5)


def test_partial_rotation_leaves_the_tail_alone():
    cfg = Qwen3NextConfig.preset("tiny")  # head_dim 32, 25%: 8 channels rotate
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 2, 32)), jnp.float32)
    y = apply_rope(x, *rope_tables(cfg, jnp.arange(3)[None], jnp.float32))
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:])
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=0, atol=0)  # position 0 rotates by nothing
    np.testing.assert_allclose(jnp.linalg.norm(y[..., :8], axis=-1), jnp.linalg.norm(x[..., :8], axis=-1), rtol=1e-6)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        Qwen3NextConfig.preset("tiny").replace(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
