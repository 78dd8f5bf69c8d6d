"""Rows moved by a partial permutation, forward and backward as gathers.

The MoE moves rows between layouts (token order, expert order, exchange slots): each row of the destination takes
at most one row of the source and each source row goes to at most one destination row. The transpose of such a
gather is the gather by the inverse map, so neither pass needs a scatter-add (which XLA serialises on contended
indices, and which cannot know that the indices are unique).
"""
import jax
import jax.numpy as jnp


def _take(x, index, valid):
    y = x[jnp.clip(index, 0, x.shape[0] - 1)]
    if valid is None:
        return y
    return jnp.where(valid.reshape(valid.shape + (1,) * (y.ndim - 1)), y, jnp.zeros((), y.dtype))


@jax.custom_vjp
def permute(x, index, inverse, valid=None, inverse_valid=None):
    """y[i] = x[index[i]] where valid[i], zero where not; x [M, ...] -> y [len(index), ...]. valid None: every row.

    inverse [M] is the inverse map: y[inverse[m]] took x[m] where inverse_valid[m] (None: every row of x was taken).
    The transpose is permute(g, inverse, index, inverse_valid, valid). Rows not taken are selected away (jnp.where),
    never multiplied by zero, so whatever they hold (even NaN) reaches no result.
    """
    return _take(x, index, valid)


def _permute_fwd(x, index, inverse, valid=None, inverse_valid=None):
    return _take(x, index, valid), (inverse, inverse_valid)


def _permute_bwd(residuals, g):
    inverse, inverse_valid = residuals
    return _take(g, inverse, inverse_valid), None, None, None, None


permute.defvjp(_permute_fwd, _permute_bwd)
