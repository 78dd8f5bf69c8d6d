"""Qwen3-Next's two RMSNorms.

`RMSNorm` is zero-centred: the checkpoint stores w (initialised to 0) and the scale is (1 + w), computed in fp32
and cast back. `GatedRMSNorm` closes a Gated DeltaNet layer: not zero-centred (w initialised to 1, shared by all
value heads), normalised in fp32, scaled in the input dtype, then gated by silu(z) in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax.layers import param


def _normalize(x_f32: jax.Array, eps: float) -> jax.Array:
    return x_f32 * jax.lax.rsqrt(jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = param(None, (dim,), param_dtype, ("norm",), init="zeros", weight_decay=False)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _normalize(x.astype(jnp.float32), self.eps)
        return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = param(None, (dim,), param_dtype, ("norm",), init="ones", weight_decay=False)
        self.eps = eps

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        h = _normalize(x.astype(jnp.float32), self.eps).astype(x.dtype)
        h = self.weight[...].astype(x.dtype) * h
        return (h * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)
