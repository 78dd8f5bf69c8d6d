"""The Gated DeltaNet mixer (arXiv 2412.06464) as Qwen3-Next wires it.

in_proj_qkvz is laid out per key head: [q (dk) | k (dk) | v (r heads x dv) | z (r heads x dv)] with r value heads per
key head; in_proj_ba likewise [b (r) | a (r)]. Value head j belongs to key head j // r. A causal depthwise conv with
SiLU runs over the channels cat(q, k, v); then the gated delta rule (qwen3next_kernels.gdn) and a gated RMSNorm with z.
With packed documents both the conv window and the recurrent state restart at each document. The conv and the
rule are the registry's "conv" and "gdn" families. Under a mesh they run per shard of the batch, the key heads and
the sequence (context parallelism: qwen3next_jax.context_parallel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax import context_parallel as cp
from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import Execution
from qwen3next_jax.interface import Aux, Context
from qwen3next_jax.layers import Linear, param
from qwen3next_jax.norms import GatedRMSNorm
from qwen3next_jax.sharding import per_shard
from qwen3next_kernels.registry import FAMILIES, Platform


class CausalConv1d(nnx.Module):
    """The taps of the depthwise conv over cat(q, k, v): kernel [W, C], torch's conv1d weight [C, 1, W] transposed.
    qwen3next_kernels.conv.split_conv runs the conv."""

    def __init__(self, kernel_size: int, channels: int, *, rngs: nnx.Rngs, param_dtype, std: float):
        self.kernel = param(rngs, (kernel_size, channels), param_dtype, ("conv", "gdn_heads"), std=std)


def gdn_sites(cfg: Qwen3NextConfig, dtype) -> dict[str, dict]:
    """The registry's facts for the mixer's two kernel call sites."""
    heads = dict(key_heads=cfg.linear_num_key_heads, key_dim=cfg.linear_key_head_dim,
                 value_heads=cfg.linear_num_value_heads, value_dim=cfg.linear_value_head_dim,
                 dtype=jnp.dtype(dtype).name)
    return {"conv": dict(heads, taps=cfg.linear_conv_kernel_dim), "gdn": dict(heads, chunk_size=64)}


def context_parallel_gdn_site(cfg: Qwen3NextConfig, dtype) -> dict:
    """The op's site under context parallelism: it runs on values [v | 0], value dim V + K."""
    site = gdn_sites(cfg, dtype)["gdn"]
    return dict(site, value_dim=site["value_dim"] + site["key_dim"])


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, execution: Execution, platform: Platform):
        D = cfg.hidden_size
        dtype, param_dtype = execution.dtype, execution.params
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.r = self.nv // self.nk
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=cfg.initializer_range)
        self.in_proj_qkvz = Linear(D, 2 * self.nk * self.dk + 2 * self.nv * self.dv, ("embed", "gdn_heads"), **kw)
        self.in_proj_ba = Linear(D, 2 * self.nv, ("embed", "gdn_heads"), **kw)
        channels = 2 * self.nk * self.dk + self.nv * self.dv
        self.conv1d = CausalConv1d(cfg.linear_conv_kernel_dim, channels, rngs=rngs, param_dtype=param_dtype,
                                   std=cfg.initializer_range)
        self.dt_bias = param(None, (self.nv,), param_dtype, ("gdn_value_heads",), init="ones",
                             weight_decay=False)
        # A ~ U(0.01, 16) as transformers initialises it; A_log = log(A), the decay rate is exp(A_log).
        A = jax.random.uniform(rngs.params(), (self.nv,), jnp.float32, 0.01, 16.0)
        self.A_log = nnx.Param(jnp.log(A).astype(param_dtype), logical_axes=("gdn_value_heads",),
                               weight_decay=False)
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.out_proj = Linear(self.nv * self.dv, D, ("gdn_heads", "embed"), **kw)
        self.dtype = dtype
        self.kernels = {family: execution.resolve(family, site, platform)
                        for family, site in gdn_sites(cfg, dtype).items()}
        # The op's implementation for the wider call context parallelism makes (a kernel may not take V + K).
        self.context_parallel_gdn = execution.resolve("gdn", context_parallel_gdn_site(cfg, dtype), platform)

    def __call__(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, Aux]:
        B, T, _ = x.shape
        segment_ids = ctx.segment_ids
        nk, nv, dk, dv, r = self.nk, self.nv, self.dk, self.dv, self.r
        qkvz = self.in_proj_qkvz(x).reshape(B, T, nk, 2 * dk + 2 * r * dv)
        kernel = self.conv1d.kernel[...]                                     # [W, cat(q, k, v) channels]
        W, nq = kernel.shape[0], nk * dk
        taps = (kernel[:, :nq].reshape(W, nk, dk), kernel[:, nq:2 * nq].reshape(W, nk, dk),
                kernel[:, 2 * nq:].reshape(W, nk, r * dv))                   # per key head, as the shards split them
        ba = self.in_proj_ba(x).reshape(B, T, nk, 2 * r)
        b, a = ba[..., :r], ba[..., r:]               # [B, T, nk, r]: value head j = key head j // r

        beta = jax.nn.sigmoid(b)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32).reshape(nk, r)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32).reshape(nk, r))  # log decay <= 0
        # The conv and the op are Pallas kernels where they run: under a mesh, each device runs them on its own
        # batch rows, key heads (every head axis here has nk entries, so all of them split alike) and tokens.
        heads = ("batch", "seq", "gdn_heads", None)
        o, z = per_shard(self._conv_and_rule, in_axes=(heads, (("conv", "gdn_heads", None),) * 3, heads, heads,
                                                       None if segment_ids is None else ("batch", "seq")),
                         out_axes=(heads + (None,),) * 2, sequence=True)(qkvz, taps, g, beta, segment_ids)
        o = self.norm(o.reshape(B, T, nv, dv).astype(self.dtype), z.reshape(B, T, nv, dv))   # [B, T, nv, dv]
        return self.out_proj(o.reshape(B, T, nv * dv)), Aux.zero()

    def _conv_and_rule(self, qkvz, taps, g, beta, segment_ids, *, seq_axis):
        """o and z [B, T, nk, r, dv] for the key heads of qkvz [B, T, nk, 2 dk + 2 r dv] (a shard's, under a mesh;
        seq_axis: the mesh axis the sequence is split over, None for whole sequences)."""
        B, T, nk = qkvz.shape[:3]
        dk, dv, r = self.dk, self.dv, self.r
        # Cast here, not before: the taps' gradient is summed over the batch shards in the parameter's dtype.
        kernel = jnp.concatenate([t.reshape(t.shape[0], -1) for t in taps], axis=1).astype(qkvz.dtype)
        split_conv = FAMILIES["conv"].function(self.kernels["conv"])
        dims = dict(key_heads=nk, key_dim=dk, value_heads=nk * r, value_dim=dv)
        op = dict(segment_ids=segment_ids, use_qk_l2norm=True, scale=None, chunk_size=64, initial_state=None)
        g, beta = g.reshape(B, T, nk * r), beta.reshape(B, T, nk * r)
        if seq_axis is None:
            q, k, v, z = split_conv(qkvz, kernel, segment_ids, **dims)
            o, _ = FAMILIES["gdn"].function(self.kernels["gdn"])(q, k, v, g, beta, **op)
        else:
            q, k, v, z = cp.split_conv_over_shards(split_conv, qkvz, kernel, segment_ids, axis=seq_axis, **dims)
            o, _ = cp.gated_delta_rule_over_shards(FAMILIES["gdn"].function(self.context_parallel_gdn),
                                                   q, k, v, g, beta, axis=seq_axis, **op)
        return o.reshape(B, T, nk, r, dv), z.reshape(B, T, nk, r, dv)
