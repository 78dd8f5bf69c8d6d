"""The two parameterised primitives every module is built from: a linear map and an embedding table.

Parameters live in `param_dtype` (fp32 master weights when training) and are cast to the compute `dtype` at use.
Each parameter records its logical axis names (`logical_axes`), which `qwen3next_jax.sharding` maps to mesh axes,
and whether weight decay applies to it (`weight_decay`: not to norms, biases and the Gated DeltaNet decay), which
the optimizer reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape, dtype, axes: tuple[str | None, ...], init: str = "normal", std=0.02,
          weight_decay: bool = True):
    """A parameter with logical axis names. init: 'normal' (std), 'zeros' or 'ones'."""
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), logical_axes=axes, weight_decay=weight_decay)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (the transpose of torch's weight)."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
                 bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, std: float = 0.02):
        self.kernel = param(rngs, (in_features, out_features), param_dtype, axes, std=std)
        self.bias = param(rngs, (out_features,), param_dtype, axes[1:], init="zeros",
                          weight_decay=False) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table [vocab, hidden]; also the output projection when embeddings are tied."""

    def __init__(self, vocab_size: int, hidden_size: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, std: float = 0.02):
        self.embedding = param(rngs, (vocab_size, hidden_size), param_dtype, ("vocab", "embed"), std=std)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
