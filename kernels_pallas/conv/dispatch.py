"""The one entry point of the Gated DeltaNet input conv and the choice of implementation behind it."""
import jax

from qwen3next_kernels.conv.reference import check_shapes, reference_split_conv

IMPLS = ("auto", "xla", "pallas_gpu")


def _pallas_gpu():
    from qwen3next_kernels.conv import pallas_gpu
    return pallas_gpu


def split_conv(qkvz, kernel, segment_ids=None, *, key_heads, key_dim, value_heads, value_dim, impl="auto"):
    """Split in_proj_qkvz's output [B, T, nk, 2 dk + 2 r dv] into q, k [B, T, nk, dk] and v, z [B, T, nv, dv],
    with q, k, v through the causal depthwise conv (kernel [W, channels of cat(q, k, v)]) and SiLU; the conv
    window restarts at each document of segment_ids [B, T]. See reference.py.

    impl: "xla" (plain JAX), "pallas_gpu" (Mosaic GPU kernels, Hopper) or "auto": the kernels where their tests
    cover the call, else plain JAX."""
    dims = dict(key_heads=key_heads, key_dim=key_dim, value_heads=value_heads, value_dim=value_dim)
    check_shapes(qkvz, kernel, segment_ids, **dims)
    if impl == "xla":
        fn = reference_split_conv
    elif impl == "pallas_gpu":
        fn = _pallas_gpu().split_conv
    elif impl == "auto":
        fn = reference_split_conv
        if jax.default_backend() == "gpu" and _pallas_gpu().supports(qkvz, kernel, segment_ids, **dims):
            fn = _pallas_gpu().split_conv
    else:
        raise ValueError(f"unknown impl {impl!r}; choose one of {list(IMPLS)}")
    return fn(qkvz, kernel, segment_ids, **dims)
