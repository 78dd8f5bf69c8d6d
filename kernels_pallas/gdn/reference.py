"""The Gated DeltaNet recurrence token by token: the definition every other form is tested against.

Also holds what all forms share: the input normalisation (fp32 cast, GVA repeat, q/k L2 norm, q scale) and the
document-start flags derived from segment_ids.
"""
import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def l2norm(x, eps=1e-6):
    """x * rsqrt(sum(x^2) + eps) over the last axis (HF's convention: eps inside the root)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def prepare_inputs(q, k, v, g, beta, initial_state, *, use_qk_l2norm, scale):
    """Cast to fp32, repeat q/k to the value heads, normalise and scale.

    Returns q, k [B, T, HV, K]; v [B, T, HV, V]; g, beta [B, T, HV]; state [B, HV, K, V], all fp32.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[-2:]
    q, k, v, g, beta = (x.astype(jnp.float32) for x in (q, k, v, g, beta))
    # Value head j reads key head j // (HV // H): repeat each key head HV // H times, in place.
    q = jnp.repeat(q, HV // H, axis=2)
    k = jnp.repeat(k, HV // H, axis=2)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * (K**-0.5 if scale is None else scale)
    if initial_state is None:
        state = jnp.zeros((B, HV, K, V), jnp.float32)
    else:
        state = initial_state.astype(jnp.float32)
    return q, k, v, g, beta, state


def document_starts(segment_ids, batch, length):
    """[B, T] bool, True where a new document starts, so the state is zeroed before that token.

    Position 0 is never a start: the initial state belongs to the first document.
    """
    if segment_ids is None:
        return jnp.zeros((batch, length), bool)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(changed, ((0, 0), (1, 0)))


def reference_gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None, use_qk_l2norm=True,
                               scale=None, chunk_size=None):
    """Token-by-token lax.scan of S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = S^T q.

    chunk_size is accepted for a uniform signature and ignored.
    """
    del chunk_size
    B, T = q.shape[:2]
    out_dtype = v.dtype
    q, k, v, g, beta, state = prepare_inputs(q, k, v, g, beta, initial_state, use_qk_l2norm=use_qk_l2norm,
                                             scale=scale)
    starts = document_starts(segment_ids, B, T)

    def step(S, x):  # S [B, HV, K, V]
        q_t, k_t, v_t, g_t, beta_t, start_t = x  # q_t, k_t [B, HV, K]; v_t [B, HV, V]; g_t, beta_t [B, HV]; start_t [B]
        S = jnp.where(start_t[:, None, None, None], 0.0, S) * jnp.exp(g_t)[..., None, None]
        predicted = jnp.einsum("bhk,bhkv->bhv", k_t, S, precision=HIGHEST)
        delta = beta_t[..., None] * (v_t - predicted)
        S = S + k_t[..., :, None] * delta[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S, precision=HIGHEST)

    time_major = [jnp.swapaxes(x, 0, 1) for x in (q, k, v, g, beta, starts)]
    state, o = jax.lax.scan(step, state, time_major)  # o [T, B, HV, V]
    return jnp.swapaxes(o, 0, 1).astype(out_dtype), state
