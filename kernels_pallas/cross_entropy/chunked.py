"""reference.linear_cross_entropy over chunks of `chunk_tokens` tokens, in plain JAX.

Each chunk's fp32 logits [C, V] are formed, used and dropped: at a 150K vocabulary this keeps C * V fp32 values
alive instead of N * V.

With weights, the objective's gradient is computed in the same pass, from the chunk's logits while they are live:
    d logits = softmax * (ce_weight + 2 * z_weight * lse) - onehot(target) * ce_weight      (ce = lse - target logit)
    d hidden = d logits @ w.T,    d w = sum over chunks of hidden.T @ d logits  (fp32)
Its cost is three products a chunk. A backward pass given the cotangents of per-token (ce, lse) would need four: it
would have to form the logits again, since [N, V] of them cannot be kept. d logits is formed in fp32 and cast to the
compute dtype before its two products: in fp32 they would run at the GPU's TF32 rate, half the bf16 rate. In fp32
compute the cast does nothing and the result is exact.

Without weights (evaluation) only the logits' product runs; autodiff through it is correct but not fast.
"""
import jax
import jax.numpy as jnp


def linear_cross_entropy(hidden, w, targets, weights=None, *, chunk_tokens=2048):
    shape = targets.shape
    n = targets.size
    chunk = min(chunk_tokens, n)
    pad = -n % chunk

    def chunks(x):  # [*shape, ...] -> [chunks, C, ...], padded with zeros (zero weight: no part in the objective)
        x = x.reshape(n, *x.shape[len(shape):])
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:])

    def unchunk(x):  # [chunks, C, ...] -> [*shape, ...]
        return x.reshape(-1, *x.shape[2:])[:n].reshape(*shape, *x.shape[2:])

    h, y = chunks(hidden), chunks(targets)                                           # [chunks, C, D], [chunks, C]
    if weights is None:
        ce, lse = jax.lax.map(lambda args: _losses(_logits(args[0], w), args[1])[:2], (h, y))
        return unchunk(ce), unchunk(lse)

    def one_chunk(d_w, args):
        h_c, y_c, ce_weight, z_weight = args
        logits = _logits(h_c, w)                                                     # [C, V] fp32
        ce, lse, is_target = _losses(logits, y_c)
        d_logits = (jnp.exp(logits - lse[:, None]) * (ce_weight + 2 * z_weight * lse)[:, None]
                    - jnp.where(is_target, ce_weight[:, None], 0.0)).astype(h.dtype)
        d_h = jnp.dot(d_logits, w.T, preferred_element_type=jnp.float32).astype(h.dtype)
        return d_w + jnp.dot(h_c.T, d_logits, preferred_element_type=jnp.float32), (ce, lse, d_h)

    ce_weight, z_weight = (chunks(x.astype(jnp.float32)) for x in weights)
    d_w, (ce, lse, d_h) = jax.lax.scan(one_chunk, jnp.zeros(w.shape, jnp.float32), (h, y, ce_weight, z_weight))
    return unchunk(ce), unchunk(lse), (unchunk(d_h), d_w)


def _logits(h_c, w):
    return jnp.dot(h_c, w, preferred_element_type=jnp.float32)                      # [C, V] fp32


def _losses(logits, y_c):
    """(ce [C], lse [C], is_target [C, V]) of a chunk's fp32 logits."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    is_target = jnp.arange(logits.shape[1]) == y_c[:, None]
    return lse - jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0], lse, is_target
