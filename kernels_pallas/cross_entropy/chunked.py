"""reference.linear_cross_entropy over chunks of `chunk_tokens` tokens, in plain JAX.

Each chunk's fp32 logits [C, V] are formed, reduced to (logsumexp, target logit) and dropped; the backward pass
recomputes them (jax.checkpoint). At a 150K vocabulary this keeps C * V fp32 values alive instead of N * V.
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

    @jax.checkpoint  # the backward recomputes this chunk's logits rather than storing them
    def one_chunk(h_c, y_c):
        logits = jnp.dot(h_c, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        return lse - target_logit, lse

    ce, lse = jax.lax.map(lambda args: one_chunk(*args), (h, y))
    return ce.reshape(-1)[:n].reshape(shape), lse.reshape(-1)[:n].reshape(shape)
