"""The Optax optimizer: AdamW with warmup and cosine / linear decay, global-norm clipping, and weight decay only on
the parameters the model declares decayed; wrapped in `optax.apply_if_finite`, which skips a step whose gradient is
not finite (parameters and moments unchanged) and counts such steps in a row, so the loop can stop after N."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwen3next_train.config import OptimConfig


def decay_mask(params: nnx.State) -> nnx.State:
    """True where weight decay applies: each parameter's own `weight_decay` metadata (qwen3next_jax.layers.param;
    False on norms, biases, A_log and dt_bias). A parameter that does not declare it is an error."""
    def decays(path, variable: nnx.Variable) -> nnx.Variable:
        metadata = variable.get_metadata()
        if "weight_decay" not in metadata:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} has no weight_decay metadata")
        return variable.replace(bool(metadata["weight_decay"]))

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(cfg.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def learning_rate(lr_schedule: optax.Schedule, step: jax.Array, opt_state) -> jax.Array:
    """The rate the update after `step` steps applies. The schedule counts applied updates, so a step that
    apply_if_finite skipped (its `total_notfinite`) does not advance it."""
    return lr_schedule(step - opt_state.total_notfinite)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    # Clipping is always in the chain (clip_norm 0: an infinite bound), so its state, and so a checkpoint's tree,
    # does not depend on optim.clip_norm: it can change when a run resumes.
    clip = cfg.clip_norm if cfg.clip_norm > 0 else jnp.inf
    chain = optax.chain(optax.clip_by_global_norm(clip),
                        optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                    weight_decay=cfg.weight_decay, mask=decay_mask, mu_dtype=cfg.mu_dtype))
    # Every non-finite update is rejected (the limit is never reached); the loop stops after
    # cfg.max_nonfinite_steps of them in a row, reading the count from this wrapper's state.
    return optax.apply_if_finite(chain, max_consecutive_errors=2**31 - 1)
