"""Targets respect documents."""
import jax.numpy as jnp
import numpy as np

from qwen3next_train.losses import shifted_targets


def test_targets_stay_inside_documents():
    ids = jnp.array([[10, 11, 12, 20, 21, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    targets, mask = shifted_targets(ids, seg, 1)
    np.testing.assert_array_equal(targets, [[11, 12, 20, 21, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 0, 0]])  # no target across the boundary, none for padding
    targets, mask = shifted_targets(ids, seg, 2)  # MTP depth 1 predicts x_{t+2}
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 0, 0]])
