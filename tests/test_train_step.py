"""The functional train step: gradient accumulation over micro-batches gives the step of the whole batch, and no
weight decay reaches norms, biases, A_log or dt_bias."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qwen3next_jax import Qwen3NextForCausalLM
from qwen3next_jax.config import PRESETS, Qwen3NextConfig
from qwen3next_train.config import ConfigError, load_config
from qwen3next_train.loop import make_train_step
from qwen3next_train.optim import decay_mask, make_optimizer, schedule
from qwen3next_train.state import TrainState


def test_grad_accumulation_matches_one_batch():
    """Two micro-batches and one batch give the same losses and the same gradient. The router balance loss is
    measured per micro-batch (a batch statistic), so it is left out of the gradient comparison; plain SGD with
    rate 1 makes the new parameters params - grad."""
    overrides = ["data.batch_size=4", "model.router_aux_loss_coef=0"]
    cfg = load_config("configs/smoke.yaml", overrides)
    model = Qwen3NextForCausalLM(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    seg = np.repeat(np.array([[1] * 20 + [2] * 12]), 4, axis=0).astype(np.int32)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 257, (4, 32)), jnp.int32), "segment_ids": jnp.asarray(seg),
             "positions": jnp.asarray(np.where(seg == 1, np.arange(32), np.arange(32) - 20), jnp.int32)}
    tx = optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=1)
    results = []
    for accum in (1, 2):
        c = load_config("configs/smoke.yaml", overrides + [f"optim.grad_accum_steps={accum}"])
        state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                           rng=jax.random.key_data(jax.random.key(0)))
        new_state, metrics = jax.jit(make_train_step(graphdef, rest, tx, c, schedule(c.optim, 10)))(state, batch)
        results.append((new_state.params, metrics))
    (p1, m1), (p2, m2) = results
    for key in ("loss", "ce", "mtp", "grad_norm"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_weight_decay_on_norms_biases_and_decay_parameters():
    cfg = load_config("configs/smoke.yaml")
    params = nnx.state(nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)
    mask = decay_mask(params)
    exempt = {jax.tree_util.keystr(p) for p, decays in jax.tree_util.tree_leaves_with_path(mask) if not decays}
    decayed = {jax.tree_util.keystr(p) for p, decays in jax.tree_util.tree_leaves_with_path(mask) if decays}
    assert any("A_log" in p for p in exempt) and any("dt_bias" in p for p in exempt)
    assert any("q_norm" in p for p in exempt) and any("pre_fc_norm_hidden" in p for p in exempt)
    assert not any("norm" in p or "A_log" in p or "dt_bias" in p for p in decayed)
    assert any("q_proj" in p for p in decayed) and any("experts" in p for p in decayed)


def _name_based_decays(path) -> bool:
    """The trainer's earlier rule, kept here as the oracle: no decay where a name on the path is A_log, dt_bias or
    bias, or contains "norm"."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return not any(n in ("A_log", "dt_bias", "bias") or "norm" in n for n in names)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_weight_decay_mask_from_metadata_equals_the_name_rule(preset):
    cfg = Qwen3NextConfig.preset(preset)
    params = nnx.state(nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    mask = {jax.tree_util.keystr(p): bool(d) for p, d in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    names = {jax.tree_util.keystr(p): _name_based_decays(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert mask == names
    assert any(mask.values()) and not all(mask.values())


@pytest.mark.parametrize("param_dtype,mu_dtype", [("float32", "bfloat16"), ("bfloat16", None)])
def test_moment_dtypes_and_steps(param_dtype, mu_dtype):
    """optim.mu_dtype sets AdamW's first moment; the second follows the parameters (optax has no nu_dtype). Three
    steps with those dtypes (bf16 master weights included) keep every parameter and moment in its dtype, and the loss
    stays finite and falls on one batch repeated."""
    overrides = [f"execution.param_dtype={param_dtype}", f"optim.mu_dtype={mu_dtype or 'null'}", "optim.lr=1e-2",
                 "optim.warmup_steps=0"]
    cfg = load_config("configs/smoke.yaml", overrides)
    model = Qwen3NextForCausalLM(cfg.model, rngs=nnx.Rngs(0), execution=cfg.execution)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg.optim, 10)
    state = TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                       rng=jax.random.key_data(jax.random.key(0)))
    adam = state.opt_state.inner_state[1][0]  # apply_if_finite(chain(clip, adamw)): adamw's scale_by_adam state
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(mu_dtype or param_dtype)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(param_dtype)}
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 257, (4, 32)), jnp.int32),
             "segment_ids": jnp.ones((4, 32), jnp.int32), "positions": jnp.tile(jnp.arange(32, dtype=jnp.int32), (4, 1))}
    step = jax.jit(make_train_step(graphdef, rest, tx, cfg, schedule(cfg.optim, 10)))
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(param_dtype)}
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(params))
    assert {x.dtype for x in jax.tree.leaves(state.opt_state.inner_state[1][0].mu)} == {jnp.dtype(mu_dtype or param_dtype)}


def test_first_moment_wider_than_the_parameters_is_refused():
    with pytest.raises(ConfigError, match="optim.mu_dtype float32 is wider than execution.param_dtype bfloat16"):
        load_config("configs/smoke.yaml", ["execution.param_dtype=bfloat16", "optim.mu_dtype=float32"])


def test_every_part_of_the_step_is_named_for_the_profile():
    """`benchmarks/train_step.py --profile` attributes device time to parts of the model through the op names of
    the compiled step: every part and the optimizer must reach them, forward and backward (the LM head's loss forward
    only), and the decoder stack's parts in their rematerialised form too."""
    from benchmarks.train_step import PARTS, hlo_op_names, part_of
    from qwen3next_train.loop import abstract_training, lower_train_step, make_mesh

    cfg = load_config("configs/smoke.yaml", ["execution.remat=dots"])
    mesh = make_mesh(cfg, jax.devices()[:1])
    compiled = lower_train_step(cfg, mesh, abstract_training(cfg, mesh)).compile()
    found = {part_of(op_name) for op_name in hlo_op_names(compiled.as_text()).values()}
    assert {part for part, _ in found} == set(PARTS) - {"mlp"} | {"other"}  # the smoke model has no dense MLP
    for part in ("moe", "gated_deltanet", "attention"):
        assert {(part, phase) for phase in ("forward", "backward", "recompute")} <= found, part
    for part in ("embed", "mtp"):
        assert {(part, "forward"), (part, "backward")} <= found, part
    assert ("lm_head_loss", "forward") in found  # its gradient is formed in the forward pass
    assert ("optimizer", "forward") in found


def test_profile_attribution_rules():
    """attribute(): the trace's op name first; then our and JAX's kernels by name; then a GEMM by the one part
    (besides "other") of the named kernels in its command buffer; anything else stays unattributed, under its kernel
    name."""
    from benchmarks.train_step import attribute

    op = "jit(step)/transpose(jvp(lm_head_loss))/while/body/convert_element_type"
    kernels = [dict(name="loop_convert_fusion", hlo_op="command_buffer_1", op_name=op, ms=3.0),
               dict(name="loop_add_fusion", hlo_op="command_buffer_1", op_name="jit(step)/jvp()/while/body/add",
                    ms=0.25),
               dict(name="nvjet_sm90_tss_128x160_NNT", hlo_op="command_buffer_1", op_name="", ms=5.0),
               dict(name="gdn_chunk_bwd_mosaic_gpu_kernel", hlo_op="command_buffer_2", op_name="", ms=1.5),
               dict(name="body_mosaic_gpu_kernel", hlo_op="command_buffer_2", op_name="", ms=2.0),
               dict(name="loop_select_fusion", hlo_op="command_buffer_2",
                    op_name="jit(step)/jvp()/while/body/checkpoint/moe/select", ms=1.0),
               dict(name="loop_add_fusion", hlo_op="command_buffer_2",
                    op_name="jit(step)/jvp()/while/body/checkpoint/gated_deltanet/add", ms=0.5),
               dict(name="nvjet_sm90_tst_256x128_TNT", hlo_op="command_buffer_2", op_name="", ms=4.0)]
    split = attribute(kernels)
    assert split["parts_ms"] == {
        "lm_head_loss (GEMM in its command buffer)": 5.0, "unattributed: nvjet_sm90_tst": 4.0,
        "lm_head_loss backward": 3.0, "moe (kernel name)": 2.0, "gated_deltanet (kernel name)": 1.5,
        "moe forward": 1.0, "gated_deltanet forward": 0.5, "other forward": 0.25}
    assert split["device_ms"] == 17.25 and split["unattributed"] == 4.0 / 17.25
