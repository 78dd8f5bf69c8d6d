"""Partial rotary position embedding, the non-interleaved (`rotate_half`) convention.

Only the first `rotary_dim = int(head_dim * partial_rotary_factor)` channels of each head rotate; the rest pass
through. inv_freq = theta^(-arange(0, rot, 2) / rot); "linear" rope scaling divides positions by its factor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3next_jax.config import Qwen3NextConfig, rope_type


def rope_tables(cfg: Qwen3NextConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] for integer positions [B, T], cast to the activation dtype as transformers does."""
    rot = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))
    if rope_type(cfg.rope_scaling) == "linear":
        inv_freq = inv_freq / cfg.rope_scaling["factor"]
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, rot/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, rot]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, head_dim]; cos, sin [B, T, rot]."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
