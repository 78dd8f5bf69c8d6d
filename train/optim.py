"""The Optax optimizer: AdamW with warmup and cosine / linear decay, global-norm clipping, and no weight decay on
norms, biases, A_log and dt_bias; wrapped in `optax.apply_if_finite`, which skips a step whose gradient is not
finite (parameters and moments unchanged) and counts such steps in a row, so the loop can stop after N."""

from __future__ import annotations

import jax
import optax

from qwen3next_train.config import OptimConfig

# A parameter is exempt from weight decay when any name on its path matches: every norm of the model (RMSNorm and
# gated RMSNorm weights, q_norm / k_norm, MTP norms), biases, and the Gated DeltaNet decay parameters.
NO_DECAY_NAMES = ("A_log", "dt_bias", "bias")


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decays(path) -> bool:
    names = _path_names(path)
    return not any(n in NO_DECAY_NAMES or "norm" in n for n in names)


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


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


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    # Every non-finite update is rejected (the limit is never reached); the loop stops after
    # cfg.max_nonfinite_steps of them in a row, reading the count from this wrapper's state.
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2**31 - 1)
