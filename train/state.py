"""The train state: what one optimizer step reads and writes, and what a checkpoint's `state` item holds.

A flax.struct dataclass is a pytree whose fields Orbax writes under their names, so the checkpoint tree is
{params, opt_state, step, rng}: the same tree the trainer's earlier dict state wrote, and those checkpoints restore.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@struct.dataclass
class TrainState:
    params: nnx.State  # the model's nnx.Param variables (the master weights, execution.param_dtype)
    opt_state: Any  # optax state of make_optimizer's transformation
    step: jax.Array  # int32 []: optimizer steps taken, skipped non-finite ones included
    rng: jax.Array  # uint32 [2]: key data of the step RNG


def state_shardings(params_shardings: nnx.State, tx: optax.GradientTransformation, abstract_params: nnx.State,
              mesh: Mesh) -> TrainState:
    """The state's shardings: moments sharded like their parameters, every other leaf replicated."""
    replicated = NamedSharding(mesh, P())
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, abstract_params),
                                params_shardings, transform_non_params=lambda _: replicated)
    return TrainState(params=params_shardings, opt_state=opt, step=replicated, rng=replicated)


def abstract_state(tx: optax.GradientTransformation, abstract_params: nnx.State, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying `shardings`: what a checkpoint is restored into."""
    shapes = TrainState(params=abstract_params, opt_state=jax.eval_shape(tx.init, abstract_params),
                        step=jax.ShapeDtypeStruct((), jnp.int32),
                        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int, shardings: TrainState
               ) -> TrainState:
    """Step 0: the given parameters, fresh optimizer moments, the RNG of `seed`."""
    return TrainState(params=params,
                      opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                      step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                      rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng))
