"""reference.linear_cross_entropy over chunks of `chunk_tokens` tokens, in plain JAX, with its own backward pass.

Forward: each chunk's fp32 logits [C, V] are formed, reduced to (logsumexp, target logit) and dropped; at a 150K
vocabulary this keeps C * V fp32 values alive instead of N * V. Backward, chunk by chunk: the logits are formed
again, and their gradient
    d logits = softmax * (g_ce + g_lse) - onehot(target) * g_ce        (ce = lse - target logit)
is computed in fp32 and cast to the compute dtype before the two products that need it (dh = d logits @ w.T, and
dw += h.T @ d logits, summed over chunks in fp32). Differentiating the forward instead would run those products on
the fp32 gradient, which the GPU does at its fp32 (TF32) rate: half the bf16 rate for 2/3 of the loss's FLOPs. In
fp32 compute the cast does nothing and the result is exact.
"""
import jax
import jax.numpy as jnp


def linear_cross_entropy(hidden, w, targets, *, chunk_tokens=2048):
    shape, D = targets.shape, hidden.shape[-1]
    n = targets.size
    chunk = min(chunk_tokens, n)
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, D), ((0, pad), (0, 0))).reshape(-1, chunk, D)     # [chunks, C, D]
    y = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)                    # [chunks, C]
    ce, lse = _chunked(h, w, y)                                                     # [chunks, C] each
    return ce.reshape(-1)[:n].reshape(shape), lse.reshape(-1)[:n].reshape(shape)


def _chunk_logits(h_c, w):
    return jnp.dot(h_c, w, preferred_element_type=jnp.float32)                      # [C, V] fp32


@jax.custom_vjp
def _chunked(h, w, y):
    def one_chunk(args):
        h_c, y_c = args
        logits = _chunk_logits(h_c, w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return lse - jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0], lse

    return jax.lax.map(one_chunk, (h, y))


def _forward(h, w, y):
    ce, lse = _chunked(h, w, y)
    return (ce, lse), (h, w, y, lse)


def _backward(residuals, cotangents):
    h, w, y, lse = residuals
    g_ce, g_lse = cotangents

    def one_chunk(dw, args):
        h_c, y_c, lse_c, g_ce_c, g_lse_c = args
        softmax = jnp.exp(_chunk_logits(h_c, w) - lse_c[:, None])
        is_target = jnp.arange(w.shape[1]) == y_c[:, None]
        d_logits = softmax * (g_ce_c + g_lse_c)[:, None] - jnp.where(is_target, g_ce_c[:, None], 0.0)
        d_logits = d_logits.astype(h.dtype)
        dh_c = jnp.dot(d_logits, w.T, preferred_element_type=jnp.float32).astype(h.dtype)
        return dw + jnp.dot(h_c.T, d_logits, preferred_element_type=jnp.float32), dh_c

    dw, dh = jax.lax.scan(one_chunk, jnp.zeros(w.shape, jnp.float32), (h, y, lse, g_ce, g_lse))
    return dh, dw.astype(w.dtype), None


_chunked.defvjp(_forward, _backward)
