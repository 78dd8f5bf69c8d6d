"""The LM head's cross entropy with every logit materialised in fp32: the definition.

hidden [..., D] and w [D, V] in the compute dtype, targets [...] (int). The product accumulates in fp32. Returns
(cross entropy, logsumexp), both fp32 [...]. chunk_tokens is the chunked form's and is ignored here.
"""
import jax
import jax.numpy as jnp


def linear_cross_entropy(hidden, w, targets, *, chunk_tokens=None):
    del chunk_tokens
    logits = jnp.dot(hidden, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], lse
