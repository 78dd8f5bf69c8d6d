"""The trainer in two parts, each read top to bottom: `setup(cfg)` makes a Run, `loop(run)` trains it.

setup does everything that can fail on bad input before anything is computed or written: the mesh and the batch's
fit on it, the tokenizer and the data sources, the model's config (an init source's own), the abstract model and
train state; then the resume decision (train/checkpoint.py: stored config compared, damaged checkpoints set aside,
the newest restored, state first and data position second), or a fresh state; only then config.yaml, the metrics
log and the compiled step with its compile report.

The hot path is functional: the model is split once (`nnx.split` -> graph definition + parameter state), the step
is `jax.jit` of a pure function of (TrainState, batch) with explicit shardings and the state donated, and the model
is merged back (`nnx.merge`) only inside the traced function.

Step s of the loop consumes the s-th batch; the checkpoint written after step s holds the state after s updates and
the data iterator positioned at batch s + 1, so a resumed run replays exactly what the uninterrupted run would have
done. No checkpoint is written while the non-finite streak is above zero (a save that falls due then waits for the
next finite step), so every checkpoint is healthy. SIGTERM (how SLURM and TPU pods preempt) finishes the current
step, saves it and ends the loop with `run.preempted` set; with several processes, all of them at the same step
(train/distributed.py).

With several processes every process runs setup and loop alike; only process 0 writes config.yaml, the metrics and
the progress bar, and logs the kernels and the compile report. The run directory is an etils.epath path: local, or
a bucket (gs://...) that every host reaches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from qwen3next_jax import Qwen3NextForCausalLM
from qwen3next_jax import sharding as shd
from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import kernel_summary, resolved_kernels
from qwen3next_kernels.registry import Platform
from qwen3next_train import losses, rundir
from qwen3next_train.checkpoint import CheckpointSaveError, Checkpoints
from qwen3next_train.compile_report import compile_report, format_compile_report
from qwen3next_train.config import ConfigError, TrainConfig
from qwen3next_train.data import make_tokenizer, train_and_val
from qwen3next_train.distributed import StopRequest, is_lead
from qwen3next_train.metrics import MetricsLog, flops_per_token, peak_flops
from qwen3next_train.optim import learning_rate, make_optimizer, schedule
from qwen3next_train.state import TrainState, abstract_state, init_state, state_shardings

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "segment_ids", "positions")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


# ------------------------------------------------------------------------------------------------------ the step

def make_train_step(graphdef, rest, tx: optax.GradientTransformation, cfg: TrainConfig, lr_schedule):
    """(state, batch) -> (state, metrics). The batch [B, T] is cut into grad_accum_steps micro-batches whose
    gradients are summed by a scan; each micro-batch's loss is already scaled to its share of the batch mean."""
    A = cfg.optim.grad_accum_steps
    loss_kw = dict(mtp_weight=cfg.loss.mtp_weight, aux_coef=cfg.model.router_aux_loss_coef,
                   z_loss_coef=cfg.loss.z_loss_coef, chunk_tokens=cfg.loss.chunk_tokens, n_micro=A)

    def step(state: TrainState, batch):
        counts = losses.token_counts(batch["segment_ids"], cfg.model.mtp_num_hidden_layers)

        def micro_loss(p, micro):
            return losses.loss_and_metrics(nnx.merge(graphdef, p, rest), micro, counts, **loss_kw)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if A == 1:
            (_, metrics), grads = grad_fn(state.params, batch)
        else:
            # Micro-batch a takes rows a, a + A, a + 2A, ...: each one spread over all the batch's devices.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, mb):
                (_, m), g = grad_fn(state.params, mb)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            (_, metrics_shape), grads_shape = jax.eval_shape(grad_fn, state.params,
                                                             jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape))
            (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro)
        with jax.named_scope("optimizer"):  # the profile's name for this part (benchmarks/train_step.py)
            lr = learning_rate(lr_schedule, state.step, state.opt_state)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            metrics.update(grad_norm=optax.tree.norm(grads), lr=lr, nonfinite_in_a_row=opt_state.notfinite_count)
            params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return step


def make_eval_step(graphdef, rest, cfg: TrainConfig):
    """params, batch -> summed next-token (and MTP) cross entropy and token counts."""

    def evaluate(params, batch):
        model = nnx.merge(graphdef, params, rest)
        (ce, _, mask), mtp, _, _ = losses.per_token_losses(model, batch, cfg.loss.chunk_tokens)
        sums = {"ce": jnp.sum(ce * mask), "n": jnp.sum(mask)}
        for d, (ce_d, mask_d) in enumerate(mtp, start=1):
            sums[f"mtp{d}"], sums[f"n{d}"] = jnp.sum(ce_d * mask_d), jnp.sum(mask_d)
        return sums

    return evaluate


def _global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """The global batch, which every process holds whole (data.py), as arrays: each process places the rows of its
    own devices, wherever the mesh put them."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index]) for k, v in batch.items()}


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


# ------------------------------------------------------------------------------------------------------ setup

def make_mesh(cfg: TrainConfig, devices=None):
    """The device mesh over `devices` (default: all processes' devices); a layout the devices cannot form, or a
    batch it cannot split, is a ConfigError."""
    try:
        mesh = shd.make_mesh(devices, **dataclasses.asdict(cfg.mesh))
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    rows = cfg.data.batch_size // cfg.optim.grad_accum_steps
    if rows % shards:
        raise ConfigError(
            f"data.batch_size {cfg.data.batch_size} / optim.grad_accum_steps {cfg.optim.grad_accum_steps} = {rows} "
            f"rows per micro-batch do not split over the mesh's data x fsdp x expert = {mesh.shape['data']} x "
            f"{mesh.shape['fsdp']} x {mesh.shape['expert']} = {shards} batch shards")
    return mesh


def model_config(cfg: TrainConfig) -> Qwen3NextConfig:
    """The model's config: the init source's own (read from its config.json, no weights) where there is one."""
    if cfg.checkpoint.init_from_hf:
        from qwen3next_jax.hf import read_hf_config
        from qwen3next_jax.hf.safetensors import SafetensorsReader

        try:
            reader = SafetensorsReader(cfg.checkpoint.init_from_hf)
            try:
                return read_hf_config(cfg.checkpoint.init_from_hf, reader.names())
            finally:
                reader.close()
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"checkpoint.init_from_hf: {e}") from None
    if cfg.checkpoint.init_from_params:
        try:
            config = epath.Path(cfg.checkpoint.init_from_params) / "config.json"
            return Qwen3NextConfig.from_hf_dict(json.loads(config.read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"checkpoint.init_from_params: {e}") from None
    return cfg.model


def initial_params(cfg: TrainConfig, mesh) -> nnx.State:
    """Step 0's parameters, each created (or read) in its shard: fresh, a Hugging Face checkpoint's, or an Orbax
    params checkpoint's."""
    if cfg.checkpoint.init_from_hf:
        from qwen3next_jax.hf import load_hf_checkpoint

        model = load_hf_checkpoint(cfg.checkpoint.init_from_hf, mesh=mesh, execution=cfg.execution)
    elif cfg.checkpoint.init_from_params:
        from qwen3next_jax.orbax_io import load_orbax_params

        model = load_orbax_params(cfg.checkpoint.init_from_params, mesh=mesh, execution=cfg.execution)
    else:
        model = shd.create_sharded(lambda: Qwen3NextForCausalLM(
            cfg.model, rngs=nnx.Rngs(cfg.train.seed), execution=cfg.execution), mesh)
    return nnx.state(model, nnx.Param)


def _sites(kernels: dict[str, dict[str, str]]) -> list[str]:
    return [f"{site or 'model'}: " + ", ".join(f"{family}={impl}" for family, impl in sorted(chosen.items()))
            for site, chosen in sorted(kernels.items())]


def config_text(cfg: TrainConfig, kernels: dict[str, dict[str, str]]) -> str:
    """config.yaml: the resolved config, headed by comments (which the loader ignores) saying what each kernel
    family's choice became at each call site on this machine."""
    lines = ["# The resolved config of this run: `qwen3next-train --config` this file to run it again.",
             f"# The kernels execution.* resolved to on this machine ({Platform.current()}), per call site:"]
    return "\n".join(lines + [f"#   {site}" for site in _sites(kernels)]) + "\n" + cfg.to_yaml()


@dataclasses.dataclass(frozen=True)
class AbstractTraining:
    """The model and the train state as shapes and shardings on a mesh, before any value exists."""
    model: Qwen3NextForCausalLM  # from nnx.eval_shape: its kernels resolved, no parameter values
    graphdef: Any
    rest: nnx.State  # the model's non-parameter state
    tx: optax.GradientTransformation
    shardings: TrainState
    state: TrainState  # ShapeDtypeStructs carrying `shardings`


def abstract_training(cfg: TrainConfig, mesh, platform: Platform | None = None) -> AbstractTraining:
    """platform: the one the model's kernels are resolved for; default the running one (Platform.current()),
    another to compile ahead of time for other chips."""
    model = nnx.eval_shape(lambda: Qwen3NextForCausalLM(
        cfg.model, rngs=nnx.Rngs(cfg.train.seed), execution=cfg.execution, platform=platform))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    shardings = state_shardings(shd.state_shardings(params, mesh), tx, params, mesh)
    return AbstractTraining(model, graphdef, rest, tx, shardings, abstract_state(tx, params, shardings))


def make_batch_sharding(cfg: TrainConfig, mesh) -> NamedSharding:
    return NamedSharding(mesh, shd.logical_to_spec(("batch", "seq"), (cfg.data.batch_size, cfg.data.seq_len), mesh))


def lower_train_step(cfg: TrainConfig, mesh, a: AbstractTraining) -> jax.stages.Lowered:
    """The train step jitted with its shardings (the state donated) and lowered for a batch of cfg's shape: what
    setup compiles, and what scripts/aot_compile.py compiles for TPU topologies from a CPU host."""
    batch_sharding = make_batch_sharding(cfg, mesh)
    step_jit = jax.jit(make_train_step(a.graphdef, a.rest, a.tx, cfg, schedule(cfg.optim, cfg.train.steps)),
                       in_shardings=(a.shardings, batch_sharding),
                       out_shardings=(a.shardings, NamedSharding(mesh, P())), donate_argnums=(0,))
    batch = {k: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), jnp.int32, sharding=batch_sharding)
             for k in BATCH_KEYS}
    # Traced with the mesh in context, so the kernels run per shard (sharding.per_shard) and the Pallas TPU
    # kernels see which chips they are traced for (registry.interpret_pallas_tpu).
    with jax.set_mesh(mesh):
        return step_jit.lower(a.state, batch)


@dataclasses.dataclass
class Run:
    """A run ready to train: what setup() made, what loop() needs."""
    cfg: TrainConfig
    run_dir: epath.Path
    state: TrainState
    start: int  # the step the state is at
    train_iter: Any
    val_ds: Any
    ckpt: Checkpoints
    metrics_log: MetricsLog
    step_fn: Any  # None when no step is left to run
    eval_fn: Any
    batch_sharding: NamedSharding
    preempted: bool = False  # set by loop() when SIGTERM stopped it


def setup(cfg: TrainConfig) -> Run:
    """Everything before the first step, in the order the module docstring gives; bad input raises ConfigError
    before the model's parameters exist or anything in the run directory is written."""
    run_dir = epath.Path(cfg.train.out_dir) / cfg.train.name
    lead = is_lead()
    mesh = make_mesh(cfg)
    cfg = dataclasses.replace(cfg, model=model_config(cfg))
    tokenizer = make_tokenizer(cfg.data.tokenizer, cfg.model.eos_token_id)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}")
    train_ds, val_ds = train_and_val(cfg.data, tokenizer)

    a = abstract_training(cfg, mesh)

    ckpt = Checkpoints(run_dir / "checkpoints", cfg.checkpoint)
    train_iter = None
    try:
        restored = resume(cfg, ckpt, a.state, lambda: iter(train_ds))
        if restored is not None:
            state, start, train_iter = restored.state, restored.step, restored.data_iter
            log.info("resumed from step %d", start)
        else:
            state, start = init_state(initial_params(cfg, mesh), a.tx, cfg.train.seed, a.shardings), 0
            train_iter = iter(train_ds)

        if lead:
            kernels = resolved_kernels(a.model)
            log.info("kernels (call sites per implementation): %s", "; ".join(
                f"{family}: " + ", ".join(f"{impl} x{n}" for impl, n in impls.items())
                for family, impls in kernel_summary(a.model).items()))
            log.info("kernels per call site: %s", "; ".join(_sites(kernels)))
            kept = rundir.write_versioned(run_dir / "config.yaml", config_text(cfg, kernels))
            if kept:
                log.info("config.yaml changed; the earlier one is kept as %s", kept.name)

        replicated = NamedSharding(mesh, P())
        batch_sharding = make_batch_sharding(cfg, mesh)
        step_fn = eval_fn = None
        if start < cfg.train.steps:
            t0 = time.perf_counter()
            lowered = lower_train_step(cfg, mesh, a)
            t1 = time.perf_counter()
            step_fn = lowered.compile()
            if lead:
                log.info("train step compiled in %.1f s (traced in %.1f s): %s", time.perf_counter() - t1, t1 - t0,
                         format_compile_report(compile_report(step_fn)))
            eval_fn = shd.in_mesh(mesh, jax.jit(make_eval_step(a.graphdef, a.rest, cfg), out_shardings=replicated,
                                                in_shardings=(a.shardings.params, batch_sharding)))
        metrics_log = MetricsLog(run_dir, resume_step=start, writer=lead)
    except BaseException:
        ckpt.close()
        if train_iter is not None:
            train_iter.close()
        raise
    return Run(cfg, run_dir, state, start, train_iter, val_ds, ckpt, metrics_log, step_fn, eval_fn, batch_sharding)


def resume(cfg: TrainConfig, ckpt: Checkpoints, abstract: TrainState, new_iterator):
    """The restored newest checkpoint (checkpoint.Restored), or None to start at step 0."""
    if cfg.checkpoint.resume:
        return ckpt.restore_newest(abstract, new_iterator, cfg.to_dict())
    if ckpt.steps():
        raise ConfigError(f"checkpoint.resume is false but {ckpt.directory} holds checkpoints (steps "
                          f"{ckpt.steps()}); a new run there would collide with them: resume it, or choose another "
                          "train.name")
    return None


# ------------------------------------------------------------------------------------------------------ loop

def loop(run: Run) -> dict[str, Any]:
    """Trains run from run.start to cfg.train.steps; returns the last step's record."""
    cfg, ckpt, total = run.cfg, run.ckpt, run.cfg.train.steps
    flops = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    peak = peak_flops(jax.devices()[0])
    n_devices = jax.device_count()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    healthy = run.start if run.start else None  # the newest checkpoint written or restored: all are healthy

    from tqdm import tqdm

    bar = tqdm(total=total, initial=run.start, disable=not (cfg.train.progress and is_lead()), unit="step",
               dynamic_ncols=True)
    last: dict[str, Any] = {}
    streak = 0
    t_prev = time.perf_counter()

    def finish(step: int, metrics) -> None:
        """Fetch step's metrics (it has finished by now), write them, and enforce the non-finite policy."""
        nonlocal t_prev, last, streak
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        step_time, t_prev = now - t_prev, now
        tps = tokens_per_step / step_time / n_devices
        record = {k: host[k] for k in ("loss", "ce", "mtp", "aux", "z_loss", "expert_load_max", "dropped")
                  if k in host}
        streak = int(host["nonfinite_in_a_row"])
        record.update(grad_norm=host["grad_norm"], lr=host["lr"], skipped=int(streak > 0), step_time=step_time,
                      tokens_per_s_per_device=tps)
        if peak:
            record["mfu"] = flops * tps / peak
        run.metrics_log.write(step, record, tensorboard=step % cfg.train.log_every == 0 or step == total)
        last = {"step": step, **record}
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total:
            bar.set_postfix(loss=f"{record['loss']:.3f}", gnorm=f"{record['grad_norm']:.2f}",
                            tok_s=f"{tps:.0f}", refresh=False)
        if streak >= cfg.optim.max_nonfinite_steps:
            raise NonFiniteError(f"{streak} non-finite steps in a row (step {step}); stopping "
                                 f"(optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps})")

    stop = StopRequest()
    pending, save_due = None, False
    try:
        for step in range(run.start + 1, total + 1):
            batch = _global_batch(next(run.train_iter), run.batch_sharding)
            run.state, metrics = run.step_fn(run.state, batch)
            stopping = stop.due(step)
            if pending is not None:  # fetched one step late, so the host never waits for the device to go idle
                finish(*pending)
            pending = (step, metrics)
            is_last = step == total
            evaluate = cfg.train.eval_every and (step % cfg.train.eval_every == 0 or is_last)
            save_due = save_due or (ckpt.enabled and (step % cfg.checkpoint.every == 0 or is_last))
            if evaluate or save_due or is_last or stopping:
                finish(*pending)
                pending = None
            if evaluate:
                val = validation_loss(run.eval_fn, run.state.params, run.val_ds, cfg.train.eval_batches,
                                      run.batch_sharding, cfg.model.mtp_num_hidden_layers)
                run.metrics_log.write(step, val)
                last.update(val)
                if is_lead():
                    bar.write(f"step {step}: loss {last['loss']:.4f}, val_loss {val['val_loss']:.4f}")
            if (save_due or stopping) and ckpt.enabled:
                if streak:
                    log.warning("step %d: not saving during a run of %d non-finite steps; the save waits for the "
                                "next finite step", step, streak)
                else:
                    run.metrics_log.flush()  # the records up to a checkpoint are kept with it
                    ckpt.save(step, run.state, run.train_iter, cfg.to_dict())
                    healthy, save_due = step, False
            if stopping:
                run.preempted = True
                log.warning("SIGTERM: stopping after step %d; the newest checkpoint is %s", step,
                            _checkpoint_text(ckpt, healthy))
                break
        ckpt.wait()
    except NonFiniteError as e:
        _wait_reporting(ckpt)
        raise NonFiniteError(f"{e}. The last healthy checkpoint is {_checkpoint_text(ckpt, healthy)}: resume from "
                             "it (e.g. with a lower optim.lr)") from None
    except BaseException:
        _wait_reporting(ckpt)
        raise
    finally:
        stop.close()
        bar.close()
        ckpt.close()
        run.metrics_log.close()
        run.train_iter.close()  # stops grain's threads and worker processes
    return last


def _checkpoint_text(ckpt: Checkpoints, step: int | None) -> str:
    return f"step {step} ({ckpt.path(step)})" if step is not None else "none (no checkpoint was written)"


def _wait_reporting(ckpt: Checkpoints) -> None:
    """Waits for the saves in flight while another error propagates: a failed save is logged, not raised over it."""
    try:
        ckpt.wait()
    except CheckpointSaveError as e:
        log.error("%s", e)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) the run cfg.train.out_dir/cfg.train.name; returns the last step's record."""
    return loop(setup(cfg))
