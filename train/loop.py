"""The training loop: model and data set up, resume, the functional train step, evaluation, logging, saving.

The hot path is functional: the model is split once (`nnx.split` -> graph definition + parameter state), the step
is `jax.jit` of a pure function of (train state, batch) with explicit shardings and the train state donated, and
the model is merged back (`nnx.merge`) only inside the traced function.

The train state is a dict {params, opt_state, step, rng}. Step s of the loop consumes the s-th batch; the checkpoint
written after step s holds the state after s updates and the data iterator positioned at batch s + 1, so a resumed
run replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from qwen3next_jax import Qwen3NextForCausalLM
from qwen3next_jax import sharding as shd
from qwen3next_train import losses
from qwen3next_train.checkpoint import Checkpoints
from qwen3next_train.config import TrainConfig
from qwen3next_train.data import make_tokenizer, train_and_val
from qwen3next_train.metrics import MetricsLog, flops_per_token, peak_flops
from qwen3next_train.optim import make_optimizer, schedule

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


def build_model(cfg: TrainConfig, mesh) -> Qwen3NextForCausalLM:
    """A fresh model created in its shards, or a Hugging Face checkpoint to fine-tune (its config wins)."""
    if cfg.checkpoint.init_from_hf:
        from qwen3next_jax.hf import load_hf_checkpoint

        return load_hf_checkpoint(cfg.checkpoint.init_from_hf, mesh=mesh, execution=cfg.execution)
    return shd.create_sharded(lambda: Qwen3NextForCausalLM(
        cfg.model, rngs=nnx.Rngs(cfg.train.seed), execution=cfg.execution), mesh)


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, cfg: TrainConfig, lr_schedule):
    """(state, batch) -> (state, metrics). The batch [B, T] is cut into grad_accum_steps micro-batches whose
    gradients are summed by a scan; each micro-batch's loss is already scaled to its share of the batch mean."""
    A = cfg.optim.grad_accum_steps
    loss_kw = dict(mtp_weight=cfg.loss.mtp_weight, aux_coef=cfg.model.router_aux_loss_coef,
                   z_loss_coef=cfg.loss.z_loss_coef, chunk_tokens=cfg.loss.chunk_tokens, n_micro=A)

    def step(state, batch):
        params = state["params"]
        counts = losses.token_counts(batch["segment_ids"], cfg.model.mtp_num_hidden_layers)

        def micro_loss(p, micro):
            return losses.loss_and_metrics(nnx.merge(graphdef, p, rest), micro, counts, **loss_kw)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if A == 1:
            (_, metrics), grads = grad_fn(params, batch)
        else:
            # Micro-batch a takes rows a, a + A, a + 2A, ...: each one spread over all the batch's devices.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, mb):
                (_, m), g = grad_fn(params, mb)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            (_, metrics_shape), grads_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape))
            (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro)
        # The learning rate this step uses: the schedule advances only on updates apply_if_finite applied.
        lr = lr_schedule(state["step"] - state["opt_state"].total_notfinite)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        metrics.update(
            grad_norm=optax.tree.norm(grads),
            lr=lr,
            nonfinite_in_a_row=opt_state.notfinite_count)
        new_state = dict(params=optax.apply_updates(params, updates), opt_state=opt_state,
                         step=state["step"] + 1, rng=state["rng"])
        return new_state, metrics

    return step


def make_eval_step(graphdef, rest, cfg: TrainConfig):
    """params, batch -> summed next-token (and MTP) cross entropy and token counts."""

    def evaluate(params, batch):
        model = nnx.merge(graphdef, params, rest)
        (ce, _, mask), mtp, _ = losses.per_token_losses(model, batch, cfg.loss.chunk_tokens)
        sums = {"ce": jnp.sum(ce * mask), "n": jnp.sum(mask)}
        for d, (ce_d, mask_d) in enumerate(mtp, start=1):
            sums[f"mtp{d}"], sums[f"n{d}"] = jnp.sum(ce_d * mask_d), jnp.sum(mask_d)
        return sums

    return evaluate


def _global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def validation_loss(eval_fn, params, val_ds, n_batches: int, sharding, mtp_depths: int) -> dict[str, float]:
    """Mean cross entropy over the first n_batches of the (fixed) validation stream."""
    it = iter(val_ds)
    total = None
    for _ in range(n_batches):
        sums = jax.device_get(eval_fn(params, _global_batch(next(it), sharding)))
        total = sums if total is None else {k: total[k] + sums[k] for k in sums}
    it.close()
    out = {"val_loss": float(total["ce"] / max(total["n"], 1))}
    for d in range(1, mtp_depths + 1):
        out[f"val_mtp{d}"] = float(total[f"mtp{d}"] / max(total[f"n{d}"], 1))
    return out


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) the run cfg.train.out_dir/cfg.train.name; returns the last step's record."""
    run_dir = os.path.join(cfg.train.out_dir, cfg.train.name)
    os.makedirs(run_dir, exist_ok=True)
    mesh = shd.make_mesh(**dataclasses.asdict(cfg.mesh))
    model = build_model(cfg, mesh)
    cfg = dataclasses.replace(cfg, model=model.config)  # a Hugging Face checkpoint brings its own config
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(cfg.to_yaml())

    tokenizer = make_tokenizer(cfg.data.tokenizer, cfg.model.eos_token_id)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}")
    if cfg.data.batch_size % cfg.optim.grad_accum_steps:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} must be a multiple of optim.grad_accum_steps "
                         f"{cfg.optim.grad_accum_steps}")
    train_ds, val_ds = train_and_val(cfg.data, tokenizer, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    train_iter = iter(train_ds)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    total_steps = cfg.train.steps
    lr_schedule = schedule(cfg.optim, total_steps)
    tx = make_optimizer(cfg.optim, total_steps)
    # Explicit shardings for the whole state: the moments are sharded like their parameters, scalars replicated.
    replicated = NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
                                          param_shardings, transform_non_params=lambda _: replicated)
    state_shardings = dict(params=param_shardings, opt_state=opt_shardings, step=replicated, rng=replicated)
    state = dict(params=params, opt_state=jax.jit(tx.init, out_shardings=opt_shardings)(params),
                 step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                 rng=jax.device_put(jax.random.key_data(jax.random.key(cfg.train.seed)), replicated))

    ckpt = Checkpoints(os.path.join(run_dir, "checkpoints"), cfg.checkpoint)
    start = 0
    if cfg.checkpoint.resume:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = ckpt.restore_newest(abstract, train_iter)
        if restored is not None:
            start, state = restored
            log.info("resumed from step %d", start)
    metrics_log = MetricsLog(run_dir, resume_step=start if start else None)

    batch_spec = shd.logical_to_spec(("batch", "seq"), (cfg.data.batch_size, cfg.data.seq_len), mesh)
    batch_sharding = NamedSharding(mesh, batch_spec)
    # Traced with the mesh in context, so the Gated DeltaNet kernels run per shard (sharding.per_shard).
    step_fn = shd.in_mesh(mesh, jax.jit(make_train_step(graphdef, rest, tx, cfg, lr_schedule),
                                        in_shardings=(state_shardings, batch_sharding),
                                        out_shardings=(state_shardings, replicated), donate_argnums=(0,)))
    eval_fn = shd.in_mesh(mesh, jax.jit(make_eval_step(graphdef, rest, cfg),
                                        in_shardings=(state_shardings["params"], batch_sharding),
                                        out_shardings=replicated))

    flops = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    peak = peak_flops(jax.devices()[0])
    n_devices = jax.device_count()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start, disable=not cfg.train.progress, unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {}
    t_prev = time.perf_counter()

    def finish(step: int, metrics) -> None:
        """Fetch step's metrics (it has finished by now), write them, and enforce the non-finite policy."""
        nonlocal t_prev, last
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        step_time, t_prev = now - t_prev, now
        tps = tokens_per_step / step_time / n_devices
        record = {k: host[k] for k in ("loss", "ce", "mtp", "aux", "z_loss") if k in host}
        record.update(grad_norm=host["grad_norm"], lr=host["lr"], skipped=int(host["nonfinite_in_a_row"] > 0),
                      step_time=step_time, tokens_per_s_per_device=tps)
        if peak:
            record["mfu"] = flops * tps / peak
        metrics_log.write(step, record, tensorboard=step % cfg.train.log_every == 0 or step == total_steps)
        last = {"step": step, **record}
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total_steps:
            bar.set_postfix(loss=f"{record['loss']:.3f}", gnorm=f"{record['grad_norm']:.2f}",
                            tok_s=f"{tps:.0f}", refresh=False)
        if host["nonfinite_in_a_row"] >= cfg.optim.max_nonfinite_steps:
            raise NonFiniteError(f"{int(host['nonfinite_in_a_row'])} non-finite steps in a row (step {step}); "
                                 f"stopping (optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps})")

    pending = None
    try:
        for step in range(start + 1, total_steps + 1):
            batch = _global_batch(next(train_iter), batch_sharding)
            state, metrics = step_fn(state, batch)
            if pending is not None:  # fetched one step late, so the host never waits for the device to go idle
                finish(*pending)
            pending = (step, metrics)
            is_last = step == total_steps
            evaluate = cfg.train.eval_every and (step % cfg.train.eval_every == 0 or is_last)
            save = ckpt.enabled and (step % cfg.checkpoint.every == 0 or is_last)
            if evaluate or save or is_last:
                finish(*pending)
                pending = None
            if evaluate:
                val = validation_loss(eval_fn, state["params"], val_ds, cfg.train.eval_batches, batch_sharding,
                                      cfg.model.mtp_num_hidden_layers)
                metrics_log.write(step, val)
                last.update(val)
                bar.write(f"step {step}: loss {last['loss']:.4f}, val_loss {val['val_loss']:.4f}")
            if save:
                ckpt.maybe_save(step, state, train_iter, cfg.to_dict(), force=is_last)
        ckpt.wait()
    finally:
        bar.close()
        ckpt.close()
        metrics_log.close()
        train_iter.close()  # stops grain's threads and worker processes
    return last
