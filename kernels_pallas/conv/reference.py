"""The Gated DeltaNet input conv in plain JAX: the definition the kernels are tested against, and the form every
backend without a kernel runs.

in_proj_qkvz's output is laid out per key head, [q (dk) | k (dk) | v (r heads x dv) | z (r heads x dv)]. The
mixer splits it, runs a causal depthwise conv with SiLU over the channels cat(q, k, v) (torch's conv1d order) and
passes z through. With packed documents the conv window restarts at each document: a tap that would read a token
of an earlier document reads zero instead. A document is a maximal run of equal segment ids, as for the Gated
DeltaNet op (a recurring id after another document starts a new one).
"""
import jax
import jax.numpy as jnp


def check_shapes(qkvz, kernel, segment_ids, *, key_heads, key_dim, value_heads, value_dim):
    if value_heads % key_heads:
        raise ValueError(f"value_heads = {value_heads} must be a multiple of key_heads = {key_heads}")
    r = value_heads // key_heads
    width = 2 * key_dim + 2 * r * value_dim
    if qkvz.ndim != 4 or qkvz.shape[2:] != (key_heads, width):
        raise ValueError(f"qkvz must be [B, T, {key_heads}, {width}] (key heads, 2 dk + 2 r dv); got {qkvz.shape}")
    channels = 2 * key_heads * key_dim + value_heads * value_dim
    if kernel.ndim != 2 or kernel.shape[1] != channels or kernel.shape[0] < 1:
        raise ValueError(f"conv kernel must be [W, {channels}] (taps, channels of cat(q, k, v)); got {kernel.shape}")
    if segment_ids is not None and segment_ids.shape != qkvz.shape[:2]:
        raise ValueError(f"segment_ids must be [B, T] = {qkvz.shape[:2]}; got {segment_ids.shape}")


def tap_masks(segment_ids, batch, length, taps, padded_length=None):
    """[B, taps - 1, padded_length] bool: entry (b, d - 1, t) says whether token t reads token t - d, i.e. t - d
    is a token (t >= d, t < length) of t's document."""
    padded_length = length if padded_length is None else padded_length
    t = jnp.arange(padded_length)
    if segment_ids is None:
        run = jnp.zeros((batch, padded_length), jnp.int32)
    else:
        starts = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32),
                                  (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], axis=1)
        run = jnp.pad(jnp.cumsum(starts, axis=1), ((0, 0), (0, padded_length - length)))
    masks = []
    for d in range(1, taps):
        same = run == jnp.pad(run, ((0, 0), (d, 0)), constant_values=-1)[:, :padded_length]
        masks.append(same & (t >= d) & (t < length))
    return jnp.stack(masks, axis=1) if masks else jnp.zeros((batch, 0, padded_length), bool)


def split(qkvz, *, key_heads, key_dim, value_heads, value_dim):
    """q, k [B, T, nk, dk], v, z [B, T, nv, dv]: the pieces of in_proj_qkvz's output."""
    B, T = qkvz.shape[:2]
    dk, r, dv = key_dim, value_heads // key_heads, value_dim
    q, k = qkvz[..., :dk], qkvz[..., dk:2 * dk]
    v = qkvz[..., 2 * dk:2 * dk + r * dv].reshape(B, T, value_heads, dv)   # value head j = key head j // r
    z = qkvz[..., 2 * dk + r * dv:].reshape(B, T, value_heads, dv)
    return q, k, v, z


def reference_split_conv(qkvz, kernel, segment_ids=None, *, key_heads, key_dim, value_heads, value_dim):
    """q, k, v = SiLU(causal depthwise conv(cat(q, k, v))) split back, z as is; in qkvz's dtype (the conv in it).

    out[t] = sum_j kernel[j] * x[t - (W - 1 - j)] over the taps that stay inside t's document."""
    q, k, v, z = split(qkvz, key_heads=key_heads, key_dim=key_dim, value_heads=value_heads, value_dim=value_dim)
    B, T = qkvz.shape[:2]
    W = kernel.shape[0]
    nq = key_heads * key_dim
    x = jnp.concatenate([q.reshape(B, T, nq), k.reshape(B, T, nq), v.reshape(B, T, -1)], axis=-1)
    kernel = kernel.astype(x.dtype)
    masks = tap_masks(segment_ids, B, T, W)
    x_pad = jnp.pad(x, ((0, 0), (W - 1, 0), (0, 0)))
    out = jnp.zeros_like(x)
    for j in range(W):
        d = W - 1 - j
        tap = x_pad[:, j:j + T] * kernel[j]
        if d:
            tap = jnp.where(masks[:, d - 1, :, None], tap, 0)
        out = out + tap
    y = jax.nn.silu(out)
    q = y[..., :nq].reshape(q.shape)
    k = y[..., nq:2 * nq].reshape(k.shape)
    v = y[..., 2 * nq:].reshape(v.shape)
    return q, k, v, z
