"""The one entry point of the Gated DeltaNet input conv; the registry (qwen3next_kernels.registry, family "conv")
picks the implementation: the Mosaic GPU kernels where their tests cover the call, else plain JAX."""
import jax.numpy as jnp

from qwen3next_kernels.conv.reference import check_shapes
from qwen3next_kernels.registry import FAMILIES


def site(qkvz, kernel, *, key_heads, key_dim, value_heads, value_dim) -> dict:
    """The facts the registry resolves an implementation from."""
    return dict(key_heads=key_heads, key_dim=key_dim, value_heads=value_heads, value_dim=value_dim,
                taps=kernel.shape[0], dtype=jnp.dtype(qkvz.dtype).name)


def split_conv(qkvz, kernel, segment_ids=None, *, key_heads, key_dim, value_heads, value_dim, impl="auto"):
    """Split in_proj_qkvz's output [B, T, nk, 2 dk + 2 r dv] into q, k [B, T, nk, dk] and v, z [B, T, nv, dv],
    with q, k, v through the causal depthwise conv (kernel [W, channels of cat(q, k, v)]) and SiLU; the conv
    window restarts at each document of segment_ids [B, T]. See reference.py.

    impl: "auto" or a name in the registry's "conv" family: "xla" (plain JAX), "pallas_gpu" (Mosaic GPU kernels,
    Hopper)."""
    dims = dict(key_heads=key_heads, key_dim=key_dim, value_heads=value_heads, value_dim=value_dim)
    check_shapes(qkvz, kernel, segment_ids, **dims)
    return FAMILIES["conv"].call(impl, site(qkvz, kernel, **dims), qkvz, kernel, segment_ids, **dims)
