"""Partial rotary position embedding, the non-interleaved (`rotate_half`) convention.

Only the first `rotary_dim = int(head_dim * partial_rotary_factor)` channels of each head rotate; the rest pass
through. Plain RoPE has inv_freq = theta^(-arange(0, rot, 2) / rot); the scaled variants transformers defines for
this model ("linear", "yarn", "llama3") reshape those frequencies, and yarn also scales cos and sin.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qwen3next_jax.config import Qwen3NextConfig, rope_type

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def inverse_frequencies(cfg: Qwen3NextConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [rot/2] fp32, attention_factor), computed on the host in fp32 as transformers computes them."""
    rot = cfg.rotary_dim
    exponents = np.arange(0, rot, 2, dtype=np.float32) / np.float32(rot)
    base_freqs = np.float32(cfg.rope_theta) ** exponents           # theta^(i / rot)
    inv_freq = np.float32(1.0) / base_freqs
    kind, s = rope_type(cfg.rope_scaling), cfg.rope_scaling or {}
    original_max = s.get("original_max_position_embeddings", cfg.max_position_embeddings)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / np.float32(s["factor"]), 1.0
    if kind == "yarn":
        return _yarn(base_freqs, rot, cfg.rope_theta, s, original_max, cfg.max_position_embeddings)
    if kind == "llama3":
        return _llama3(inv_freq, s, original_max), 1.0
    raise ValueError(f"rope type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


def _yarn(base_freqs, rot, theta, s, original_max, max_positions):
    """YaRN (arXiv 2309.00071): interpolate low frequencies by `factor`, keep high ones, ramp between."""
    factor = s.get("factor") or max_positions / original_max

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over original_max
        return rot * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rot // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolate = np.float32(1) - ramp
    inv_freq = (np.float32(1) / (np.float32(factor) * base_freqs)) * (1 - extrapolate) + \
        (np.float32(1) / base_freqs) * extrapolate
    return inv_freq.astype(np.float32), float(attention_factor)


def _llama3(inv_freq, s, original_max):
    """Llama 3.1: divide long wavelengths by `factor`, keep short ones, blend smoothly between."""
    factor, low_ff, high_ff = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    low_wavelen, high_wavelen = original_max / low_ff, original_max / high_ff
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (original_max / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: Qwen3NextConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] for integer positions [B, T], cast to the activation dtype as transformers does."""
    inv_freq, attention_factor = inverse_frequencies(cfg)
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, rot/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, rot]
    return (jnp.cos(emb) * attention_factor).astype(dtype), (jnp.sin(emb) * attention_factor).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, head_dim]; cos, sin [B, T, rot]."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
