"""The chunked (UT-transform) form of the gated delta rule in pure JAX: runs on any backend, differentiable.

Within a chunk of C positions, with the state S0 carried in and gc the in-chunk cumulative sum of g, unrolling
the recurrence gives, for the delta-rule updates u_j = beta_j (v_j - S_{j-}^T k_j) (S_{j-} = state just before
the rank-one update of token j):

    (I + A) u = beta v - (beta exp(gc) k) S0,   A[i, j] = beta_i (k_i . k_j) exp(gc_i - gc_j)  for j < i
    o_i       = exp(gc_i) S0^T q_i + sum_{j <= i} exp(gc_i - gc_j) (q_i . k_j) u_j
    S_C       = exp(gc_last) S0 + sum_j exp(gc_last - gc_j) k_j u_j^T

so u = U - W S0 with U, W from one unit-lower-triangular solve per chunk, and only the S0 terms are sequential.

Packed documents: a document start zeroes the state, i.e. no decay path crosses it. With doc_i the number of
starts in the chunk up to and including i, every exp(...) factor above is kept only when no start lies between
its two ends: pairs (i, j) with doc_i == doc_j, the carried-in state for doc_i == 0, the contribution of j to the
chunk's final state for doc_j == doc_last, and the carried-in state into the final state for doc_last == 0.
"""
import jax
import jax.numpy as jnp

from qwen3next_kernels.gdn.reference import HIGHEST, document_starts, prepare_inputs


def _masked_exp(x, keep):
    """exp(x) where keep, else 0; masks before the exp too, so a dropped (positive) x neither overflows nor
    sends a NaN gradient through the unselected branch."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, x, 0.0)), 0.0)


def chunked_gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None, use_qk_l2norm=True,
                             scale=None, chunk_size=64):
    """Same contract as gated_delta_rule (dispatch.py); lax.scan over chunks of chunk_size tokens."""
    B, T = q.shape[:2]
    HV, V = v.shape[-2:]
    C = chunk_size
    out_dtype = v.dtype
    q, k, v, g, beta, state = prepare_inputs(q, k, v, g, beta, initial_state, use_qk_l2norm=use_qk_l2norm,
                                             scale=scale)
    starts = document_starts(segment_ids, B, T)

    # Pad T up to a multiple of C with k = 0, beta = 0, g = 0 and no document start: padded tokens write nothing
    # and decay nothing, so the final state is the state after position T - 1.
    pad = -T % C
    N = (T + pad) // C

    def to_chunks(x):  # [B, T, HV, ...] -> [B, HV, N, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, N, C, *x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    # q, k [B, HV, N, C, K]; v [B, HV, N, C, V]; g, beta [B, HV, N, C]
    q, k, v, g, beta = (to_chunks(x) for x in (q, k, v, g, beta))
    doc = jnp.cumsum(jnp.pad(starts, ((0, 0), (0, pad))).reshape(B, 1, N, C), axis=-1)  # [B, 1, N, C]
    doc_last = doc[..., -1:]  # [B, 1, N, 1]

    gc = jnp.cumsum(g, axis=-1)  # [B, HV, N, C]
    gc_last = gc[..., -1:]
    causal = jnp.tril(jnp.ones((C, C), bool))
    pair_keep = causal & (doc[..., :, None] == doc[..., None, :])  # [B, 1, N, C, C], i sees j
    decay = _masked_exp(gc[..., :, None] - gc[..., None, :], pair_keep)  # [B, HV, N, C, C]
    from_start = _masked_exp(gc, doc == 0)  # [B, HV, N, C]: decay of the carried-in state up to i
    to_end = _masked_exp(gc_last - gc, doc == doc_last)  # [B, HV, N, C]: decay from j to the chunk's end
    carry = _masked_exp(gc_last[..., 0], doc_last[..., 0] == 0)  # [B, HV, N]: decay of S0 over the whole chunk

    kb = k * beta[..., None]
    A = jnp.einsum("...ik,...jk->...ij", kb, k, precision=HIGHEST) * decay
    A = jnp.where(jnp.tril(causal, -1), A, 0.0)
    # One solve for both right-hand sides: U = (I + A)^-1 (beta v), W = (I + A)^-1 (beta exp(gc) k).
    rhs = jnp.concatenate([v * beta[..., None], kb * from_start[..., None]], axis=-1)  # [B, HV, N, C, V + K]
    uw = jax.scipy.linalg.solve_triangular(A + jnp.eye(C), rhs, lower=True, unit_diagonal=True)
    U, W = uw[..., :V], uw[..., V:]
    attn = jnp.einsum("...ik,...jk->...ij", q, k, precision=HIGHEST) * decay  # [B, HV, N, C, C], incl. diagonal
    q_start = q * from_start[..., None]
    k_end = k * to_end[..., None]

    def step(S, x):  # S [B, HV, K, V]
        q_start, k_end, U, W, attn, carry = x
        u = U - jnp.einsum("bhck,bhkv->bhcv", W, S, precision=HIGHEST)  # [B, HV, C, V]
        o = (jnp.einsum("bhck,bhkv->bhcv", q_start, S, precision=HIGHEST)
             + jnp.einsum("bhij,bhjv->bhiv", attn, u, precision=HIGHEST))
        S = carry[..., None, None] * S + jnp.einsum("bhck,bhcv->bhkv", k_end, u, precision=HIGHEST)
        return S, o

    chunk_major = [jnp.moveaxis(x, 2, 0) for x in (q_start, k_end, U, W, attn, carry)]
    state, o = jax.lax.scan(step, state, chunk_major)  # o [N, B, HV, C, V]
    o = o.transpose(1, 0, 3, 2, 4).reshape(B, N * C, HV, V)[:, :T]  # [B, N, C, HV, V] -> [B, T, HV, V]
    return o.astype(out_dtype), state
