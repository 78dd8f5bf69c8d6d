"""The one entry point of the Gated DeltaNet op; the registry (qwen3next_kernels.registry, family "gdn") picks the
implementation: the Pallas kernels where their tests cover the call, else the chunked pure-JAX form (slower, never
wrong), or the token-by-token reference when asked for by name.
"""
import jax.numpy as jnp

from qwen3next_kernels.registry import FAMILIES


def site(q, k, v, chunk_size=64) -> dict:
    """The facts the registry resolves an implementation from, for q, k [B, T, H, K] and v [B, T, HV, V]."""
    dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
    return dict(key_heads=q.shape[2], value_heads=v.shape[2], key_dim=q.shape[3], value_dim=v.shape[3],
                dtype=dtypes.pop() if len(dtypes) == 1 else "mixed", chunk_size=chunk_size)


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


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None, use_qk_l2norm=True, scale=None,
                     impl="auto", chunk_size=64):
    """Gated DeltaNet, per (batch, value head) with fp32 state S [K, V]:
        S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t

    q, k [B, T, H, K]; v [B, T, HV, V] with HV a multiple of H (value head j uses key head j // (HV // H));
    g (log decay, <= 0) and beta [B, T, HV]; initial_state [B, HV, K, V]. q and k are L2-normalised in fp32
    (if use_qk_l2norm), then q is multiplied by scale (default K**-0.5). segment_ids [B, T]: the state restarts
    from zero wherever the id differs from the previous position's; initial_state belongs to position 0's document.
    impl: "auto" or a name in the registry's "gdn" family (pallas_tpu, pallas_gpu, reference, chunked).
    Returns o [B, T, HV, V] in v's dtype and the fp32 state after the last position [B, HV, K, V].
    """
    _check_shapes(q, k, v, g, beta, initial_state, segment_ids, chunk_size)
    return FAMILIES["gdn"].call(impl, site(q, k, v, chunk_size), q, k, v, g, beta, initial_state=initial_state,
                                segment_ids=segment_ids, use_qk_l2norm=use_qk_l2norm, scale=scale,
                                chunk_size=chunk_size)
