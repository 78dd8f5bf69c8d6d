"""The one entry point of the Gated DeltaNet op and the choice of implementation behind it.

Pallas kernels plug in through KERNELS: an entry names the kernel's module (imported lazily, only when chosen)
and the backend it runs on. The module defines
    supports(q, k, v, g, beta, *, initial_state, segment_ids, use_qk_l2norm, scale, chunk_size) -> bool
        True only for calls its tests cover (shapes, dtypes, options), and
    gated_delta_rule(q, k, v, g, beta, *, initial_state, segment_ids, use_qk_l2norm, scale, chunk_size)
        with this module's semantics and return value.
impl="auto" takes the first kernel whose backend is jax.default_backend(), whose module imports and whose
supports() accepts the call; otherwise the chunked pure-JAX form (slower, never wrong).
"""
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen3next_kernels.gdn.chunked import chunked_gated_delta_rule
from qwen3next_kernels.gdn.reference import reference_gated_delta_rule


class Kernel(NamedTuple):
    module: str  # importable module defining supports() and gated_delta_rule()
    backend: str  # the jax.default_backend() it runs on


KERNELS = {  # in order of preference for impl="auto"
    "pallas_tpu": Kernel("qwen3next_kernels.gdn.pallas_tpu", "tpu"),
    "pallas_gpu": Kernel("qwen3next_kernels.gdn.pallas_gpu", "gpu"),
}
PURE_JAX = {"reference": reference_gated_delta_rule, "chunked": chunked_gated_delta_rule}


def _check_shapes(q, k, v, g, beta, initial_state, segment_ids, chunk_size):
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got q {q.shape}, k {k.shape}")
    B, T, H, K = q.shape
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, HV, V] with q's B, T = {B}, {T}; got {v.shape}")
    HV, V = v.shape[2:]
    if HV % H:
        raise ValueError(f"value heads HV = {HV} must be a multiple of key heads H = {H}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}; got {x.shape}")
    if initial_state is not None and initial_state.shape != (B, HV, K, V):
        raise ValueError(f"initial_state must be [B, HV, K, V] = {(B, HV, K, V)}; got {initial_state.shape}")
    if segment_ids is not None:
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids must be [B, T] = {(B, T)}; got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers; got {segment_ids.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


def _load(name):
    module = importlib.import_module(KERNELS[name].module)
    return module.supports, module.gated_delta_rule


def _auto(args, options):
    for name, kernel in KERNELS.items():
        if kernel.backend != jax.default_backend():
            continue
        try:
            supports, fn = _load(name)
        except ImportError:  # kernel not built for this install (or not written yet)
            continue
        if supports(*args, **options):
            return fn
    return chunked_gated_delta_rule


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None, use_qk_l2norm=True, scale=None,
                     impl="auto", chunk_size=64):
    """Gated DeltaNet, per (batch, value head) with fp32 state S [K, V]:
        S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t

    q, k [B, T, H, K]; v [B, T, HV, V] with HV a multiple of H (value head j uses key head j // (HV // H));
    g (log decay, <= 0) and beta [B, T, HV]; initial_state [B, HV, K, V]. q and k are L2-normalised in fp32
    (if use_qk_l2norm), then q is multiplied by scale (default K**-0.5). segment_ids [B, T]: the state restarts
    from zero wherever the id differs from the previous position's; initial_state belongs to position 0's document.
    impl: "auto", "reference", "chunked" or a name in KERNELS.
    Returns o [B, T, HV, V] in v's dtype and the fp32 state after the last position [B, HV, K, V].
    """
    _check_shapes(q, k, v, g, beta, initial_state, segment_ids, chunk_size)
    args = (q, k, v, g, beta)
    options = dict(initial_state=initial_state, segment_ids=segment_ids, use_qk_l2norm=use_qk_l2norm, scale=scale,
                   chunk_size=chunk_size)
    if impl == "auto":
        fn = _auto(args, options)
    elif impl in PURE_JAX:
        fn = PURE_JAX[impl]
    elif impl in KERNELS:
        fn = _load(impl)[1]
    else:
        raise ValueError(f"unknown impl {impl!r}; choose one of {['auto', *PURE_JAX, *KERNELS]}")
    return fn(*args, **options)
