"""The Gated DeltaNet mixer (arXiv 2412.06464) as Qwen3-Next wires it.

in_proj_qkvz is laid out per key head: [q (dk) | k (dk) | v (r heads x dv) | z (r heads x dv)] with r value heads per
key head; in_proj_ba likewise [b (r) | a (r)]. Value head j belongs to key head j // r. A causal depthwise conv with
SiLU runs over the channels cat(q, k, v); then the gated delta rule (kernels_pallas.gdn) and a gated RMSNorm with z.
With packed documents both the conv window and the recurrent state restart at each document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.gdn import gated_delta_rule
from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.layers import Linear, param
from qwen3next_jax.norms import GatedRMSNorm


class CausalConv1d(nnx.Module):
    """Causal depthwise conv: out[t] = sum_j kernel[j] * x[t - (K-1-j)], dropping taps that reach an earlier document.

    kernel [K, C] is torch's conv1d weight [C, 1, K] transposed.
    """

    def __init__(self, kernel_size: int, channels: int, *, rngs: nnx.Rngs, param_dtype, std: float):
        self.kernel = param(rngs, (kernel_size, channels), param_dtype, ("conv", "gdn_heads"), std=std)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """x [B, T, C], segment_ids [B, T] or None."""
        K, T = self.kernel.shape[0], x.shape[1]
        kernel = self.kernel[...].astype(x.dtype)
        x_pad = jnp.pad(x, ((0, 0), (K - 1, 0), (0, 0)))
        if segment_ids is not None:
            seg_pad = jnp.pad(segment_ids, ((0, 0), (K - 1, 0)), constant_values=-1)
        out = jnp.zeros_like(x)
        for j in range(K):
            tap = x_pad[:, j:j + T] * kernel[j]
            if segment_ids is not None and j < K - 1:
                tap = jnp.where((seg_pad[:, j:j + T] == segment_ids)[..., None], tap, 0)
            out = out + tap
        return out


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 gdn_impl: str = "auto"):
        D = cfg.hidden_size
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.r = self.nv // self.nk
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=cfg.initializer_range)
        self.in_proj_qkvz = Linear(D, 2 * self.nk * self.dk + 2 * self.nv * self.dv, ("embed", "gdn_heads"), **kw)
        self.in_proj_ba = Linear(D, 2 * self.nv, ("embed", "gdn_heads"), **kw)
        channels = 2 * self.nk * self.dk + self.nv * self.dv
        self.conv1d = CausalConv1d(cfg.linear_conv_kernel_dim, channels, rngs=rngs, param_dtype=param_dtype,
                                   std=cfg.initializer_range)
        self.dt_bias = param(None, (self.nv,), param_dtype, ("gdn_value_heads",), init="ones")
        # A ~ U(0.01, 16) as transformers initialises it; A_log = log(A), the decay rate is exp(A_log).
        A = jax.random.uniform(rngs.params(), (self.nv,), jnp.float32, 0.01, 16.0)
        self.A_log = nnx.Param(jnp.log(A).astype(param_dtype), logical_axes=("gdn_value_heads",))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.out_proj = Linear(self.nv * self.dv, D, ("gdn_heads", "embed"), **kw)
        self.dtype = dtype
        self.gdn_impl = gdn_impl

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        B, T, _ = x.shape
        nk, nv, dk, dv, r = self.nk, self.nv, self.dk, self.dv, self.r
        qkvz = self.in_proj_qkvz(x).reshape(B, T, nk, 2 * dk + 2 * r * dv)
        q, k = qkvz[..., :dk], qkvz[..., dk:2 * dk]                      # [B, T, nk, dk]
        v = qkvz[..., 2 * dk:2 * dk + r * dv].reshape(B, T, nv, dv)      # value head j = key head j // r
        z = qkvz[..., 2 * dk + r * dv:].reshape(B, T, nv, dv)
        ba = self.in_proj_ba(x).reshape(B, T, nk, 2 * r)
        b, a = ba[..., :r].reshape(B, T, nv), ba[..., r:].reshape(B, T, nv)

        mixed = jnp.concatenate([q.reshape(B, T, nk * dk), k.reshape(B, T, nk * dk), v.reshape(B, T, nv * dv)], -1)
        mixed = jax.nn.silu(self.conv1d(mixed, segment_ids))
        q = mixed[..., :nk * dk].reshape(B, T, nk, dk)
        k = mixed[..., nk * dk:2 * nk * dk].reshape(B, T, nk, dk)
        v = mixed[..., 2 * nk * dk:].reshape(B, T, nv, dv)

        beta = jax.nn.sigmoid(b)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))  # log decay <= 0
        o, _ = gated_delta_rule(q, k, v, g, beta, segment_ids=segment_ids, use_qk_l2norm=True, impl=self.gdn_impl)
        o = self.norm(o.astype(self.dtype), z)                           # [B, T, nv, dv]
        return self.out_proj(o.reshape(B, T, nv * dv))
