"""The LM head's cross entropy with every logit materialised in fp32: the definition.

hidden [..., D] and w [D, V] in the compute dtype, targets [...] (int). The product accumulates in fp32. Returns
(cross entropy, logsumexp), both fp32 [...], differentiable.

weights: None, or (ce_weight, z_weight), fp32 [...] each. With them, it also returns the gradient of the training
objective  sum(ce * ce_weight + lse**2 * z_weight)  as (d hidden [..., D] in hidden's dtype, d w [D, V] fp32): the
form the model trains with, whose implementations compute the gradient in their forward pass (chunked.py says why).
chunk_tokens is the chunked form's and is ignored here.
"""
import jax
import jax.numpy as jnp


def linear_cross_entropy(hidden, w, targets, weights=None, *, chunk_tokens=None):
    del chunk_tokens

    def losses(hidden, w):
        logits = jnp.dot(hidden, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], lse

    if weights is None:
        return losses(hidden, w)
    ce_weight, z_weight = weights

    def objective(hidden, w):
        ce, lse = losses(hidden, w)
        return jnp.sum(ce * ce_weight + lse ** 2 * z_weight), (ce, lse)

    (_, (ce, lse)), (d_hidden, d_w) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(hidden, w)
    return ce, lse, (d_hidden, d_w.astype(jnp.float32))
