"""Context parallelism: the three token-mixing ops on a sequence split into contiguous shards over a mesh axis.

Each function runs inside shard_map (sharding.per_shard with sequence=True), on shard i of n holding tokens
[i T, (i + 1) T) of every row, and gives exactly what the op gives those tokens on the whole sequence, packed
documents included (a document is a maximal run of equal segment ids, wherever the shard boundaries fall). Every
other layer (projections, norms, the MoE, the loss) is token-wise and needs nothing. docs/context_parallel.md
gives the communication per layer and what the tests check.

- The Gated DeltaNet input conv reads W - 1 tokens back: the previous shard's last W - 1 rows (and their segment
  ids) arrive as a halo (one ppermute).
- The gated delta rule is linear in (v, S_in) for fixed q, k, g, beta, so one call of the op per shard, on
  values [v | 0] from the state [0 | I], gives at once its outputs and final state from a zero incoming state and
  their linear maps from the incoming state. Only those maps' small [K, K + V] summaries cross devices (one
  all-gather); each device composes its own incoming state from them (n small products) and corrects its outputs
  with one [T, K] x [K, V] product per head. No pass over the tokens waits for another device.
- Attention gathers K, V and the key segment ids of the whole sequence (all-gather) and masks with the queries'
  global positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def previous_rows(x: jax.Array, rows: int, axis) -> jax.Array:
    """x[:, -rows:] of the previous shard over `axis` (zeros on the first shard)."""
    n = jax.lax.axis_size(axis)
    return jax.lax.ppermute(x[:, -rows:], axis, [(i, i + 1) for i in range(n - 1)])


def split_conv_over_shards(split_conv, qkvz, kernel, segment_ids, *, axis, **dims):
    """`split_conv` (an implementation of the "conv" family) on this shard's rows of the sequence. qkvz [B, T, nk, P]
    with the previous shard's last W - 1 rows prepended: on the first shard those are zeros, which is what the conv
    reads before a sequence's first token (under segment id 0 if given, so they are masked unless the first token
    is padding, whose taps then read zeros all the same)."""
    halo = kernel.shape[0] - 1
    if halo == 0:
        return split_conv(qkvz, kernel, segment_ids, **dims)
    if qkvz.shape[1] < halo:
        raise ValueError(f"context parallelism: each shard holds {qkvz.shape[1]} tokens, fewer than the conv's "
                         f"{halo} tokens of history; use fewer context shards or longer sequences")
    x = jnp.concatenate([previous_rows(qkvz, halo, axis), qkvz], axis=1)            # [B, halo + T, nk, P]
    seg = None if segment_ids is None else jnp.concatenate(
        [previous_rows(segment_ids, halo, axis), segment_ids], axis=1)
    return tuple(y[:, halo:] for y in split_conv(x, kernel, seg, **dims))


def gated_delta_rule_over_shards(rule, q, k, v, g, beta, *, axis, initial_state=None, segment_ids=None, **kw):
    """`rule` (an implementation of the "gdn" family, with its contract) on this shard's tokens of the sequence.

    Per (batch, value head) the op maps its incoming state S_in [K, V] to outputs o_t = o0_t + S_in^T p_t and final
    state A S_in + S0 (A [K, K]; A and p vanish past a document start in the shard). With values [v | 0] and the
    incoming state [0 | I] (value dim V + K) one call returns o0 and p as its outputs' two column blocks, S0 and A
    as its final state's. Shard j's incoming state is initial_state for j = 0, zero when its first token starts a
    document, else A_{j-1} S_in(j-1) + S0_{j-1}; every device runs that recursion over the gathered (A, S0).

    Returns (o [B, T, HV, V] of this shard, the state after the sequence's last token [B, HV, K, V], the same on
    every shard), as rule returns for the whole sequence. The values' dtype carries p: in bf16 the correction
    S_in^T p is rounded once more than on one device."""
    B, T, HV, V = v.shape
    K = q.shape[-1]
    wide_v = jnp.concatenate([v, jnp.zeros((B, T, HV, K), v.dtype)], axis=-1)            # [B, T, HV, V + K]
    identity = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, HV, K, K))
    wide_state = jnp.concatenate([jnp.zeros((B, HV, K, V), jnp.float32), identity], axis=-1)
    wide_o, wide_final = rule(q, k, wide_v, g, beta, initial_state=wide_state, segment_ids=segment_ids, **kw)
    o0, p = wide_o[..., :V], wide_o[..., V:]                     # [B, T, HV, V], [B, T, HV, K]
    s0, a = wide_final[..., :V], wide_final[..., V:]             # [B, HV, K, V], [B, HV, K, K]

    n, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    if segment_ids is None:
        starts = jnp.zeros((n, B), bool)
    else:
        edges = jax.lax.all_gather(jnp.stack([segment_ids[:, 0], segment_ids[:, -1]]), axis)      # [n, 2, B]
        starts = jnp.concatenate([jnp.zeros((1, B), bool), edges[1:, 0] != edges[:-1, 1]])        # [n, B]

    def step(carry, shard):
        state, mine = carry
        j, a_j, s0_j, start_j = shard
        state = jnp.where(start_j[:, None, None, None], 0.0, state)                  # shard j's incoming state
        mine = jnp.where(j == me, state, mine)
        return (jnp.einsum("bhij,bhjv->bhiv", a_j, state, precision=HIGHEST) + s0_j, mine), None

    state = jnp.zeros((B, HV, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    gathered = (jnp.arange(n), jax.lax.all_gather(a, axis), jax.lax.all_gather(s0, axis), starts)
    (final, incoming), _ = jax.lax.scan(step, (state, jnp.zeros_like(state)), gathered)
    o = o0.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", p.astype(jnp.float32), incoming, precision=HIGHEST)
    return o.astype(v.dtype), final


def attention_over_shards(attend, q, k, v, segment_ids, *, axis, scale):
    """`attend` (an implementation of the "attention" family) for this shard's queries over the keys and values
    of the whole sequence, gathered from every shard."""
    def gather(x):
        return jax.lax.all_gather(x, axis, axis=1, tiled=True)

    return attend(q, gather(k), gather(v), segment_ids, scale=scale, q_offset=jax.lax.axis_index(axis) * q.shape[1],
                  kv_segment_ids=None if segment_ids is None else gather(segment_ids))
