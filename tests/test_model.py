"""Model-level behaviour beyond HF parity: packed documents, MTP wiring, remat, sharding, config schema."""
import numpy as np
import pytest
import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax import Qwen3NextConfig, Qwen3NextForCausalLM
from qwen3next_jax.decoder import layer_period
from qwen3next_jax.execution import Execution
from qwen3next_jax.interface import Context

SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=8, linear_value_head_dim=6, num_experts=6, num_experts_per_tok=2,
             moe_intermediate_size=16, shared_expert_intermediate_size=20, partial_rotary_factor=0.5,
             bos_token_id=None, eos_token_id=None)


def perturbed_model(cfg, seed=0, **kw):
    """A model with every parameter drawn at random (so zero-centred norms, gates and A_log all matter).

    Built abstractly and filled from numpy: initialising eagerly costs a compiled RNG kernel per parameter shape.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(seed), **kw)))
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


forward = nnx.jit(lambda model, ids, seg=None: model(ids, segment_ids=seg))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def model():
    return perturbed_model(Qwen3NextConfig.from_dict(dict(SMALL)))


def test_packed_documents_match_separate_runs(model):
    """Attention, the conv window and the recurrent state all restart at a document boundary."""
    lengths = [7, 1, 30, 12]
    ids = jax.random.randint(jax.random.PRNGKey(3), (1, sum(lengths)), 1, 97)
    seg = jnp.concatenate([jnp.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    packed = forward(model, ids, seg)
    start = 0
    for n in lengths:
        alone = forward(model, ids[:, start:start + n])
        assert rel_err(packed[:, start:start + n], alone) < 1e-5
        start += n


def test_mtp_matches_definition(model):
    """h'_t = fc(cat[norm_e(embed(x_{t+1})), norm_h(h_t)]) -> mtp layer -> mtp norm -> lm_head, written out by hand."""
    cfg = model.config
    ids = jax.random.randint(jax.random.PRNGKey(4), (2, 21), 0, 97)
    @nnx.jit
    def run(model, ids):
        hidden, _ = model.hidden_states(ids)
        (mtp_hidden, _), = model.mtp_hidden_states(hidden, ids)
        return hidden, model.logits(mtp_hidden)

    hidden, mtp_logits = run(model, ids)

    p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.mtp)))
    norm = lambda x, w: x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * (1 + w)
    emb = np.asarray(model.model.embed_tokens.embedding[...])[np.asarray(ids)[:, 1:]]  # x_{t+1}, t < T-1
    h = np.asarray(hidden)[:, :-1]
    x = np.concatenate([norm(emb, p["pre_fc_norm_embedding"]["weight"]),
                        norm(h, p["pre_fc_norm_hidden"]["weight"])], -1) @ p["fc"]["kernel"]
    T = x.shape[1]
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    from qwen3next_jax.rope import rope_tables
    ctx = Context(rope_tables(cfg, positions, jnp.float32), None, jnp.ones((2, T), bool))
    x, _ = nnx.jit(lambda layer, x: layer(x, ctx))(model.mtp.layers[0], jnp.asarray(x, jnp.float32))
    ref_logits = norm(np.asarray(x), p["norm"]["weight"]) @ np.asarray(model.lm_head.kernel[...])
    assert rel_err(mtp_logits[:, :-1], ref_logits) < 1e-5


def test_remat_policies_give_the_same_gradients():
    # Two layers repeated twice: the scan over repeats and the checkpointed layer call are both exercised.
    cfg = Qwen3NextConfig.from_dict(dict(SMALL, num_hidden_layers=4, full_attention_interval=2,
                                         mtp_num_hidden_layers=0))
    ids = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, 97)
    grads = []
    for remat in ("none", "full", "dots"):
        graphdef, state = nnx.split(perturbed_model(cfg, execution=Execution(remat=remat)))
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(ids) ** 2)
        grads.append(jax.jit(jax.grad(loss))(state))
    # Recomputation changes how XLA fuses and orders the sums over tokens (the conv kernel's gradient sums 32 of
    # them): entries that cancel to ~1e-4 of their array's scale differ by fp32 rounding, so atol follows the scale.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.max(np.abs(b)))
    for g in grads[1:]:
        jax.tree.map(close, grads[0], g)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_the_moe_routing(remat):
    """Under remat the backward pass recomputes each layer but not its routing (execution.ROUTING): the step's
    jaxpr holds the router's top-k and the sort by expert once per MoE layer, in the forward pass only."""
    cfg = Qwen3NextConfig.from_dict(dict(SMALL, num_hidden_layers=2, full_attention_interval=2,
                                         mtp_num_hidden_layers=0))
    ids = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, 97)
    graphdef, state = nnx.split(perturbed_model(cfg, execution=Execution(remat=remat)))
    jaxpr = jax.make_jaxpr(jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(ids) ** 2)))(state)

    def count(jaxpr, name):
        return sum((e.primitive.name == name) + sum(count(sub, name) for sub in jax.extend.core.jaxprs_in_params(
            e.params)) for e in jaxpr.eqns)

    # One scan body of two layers, each with an MoE: two top-k's and two stable sorts (argsort).
    assert count(jaxpr.jaxpr, "top_k") == 2 and count(jaxpr.jaxpr, "sort") == 2


def test_sharded_forward_matches_single_device(model):
    from qwen3next_jax.sharding import create_sharded, make_mesh
    cfg = model.config
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = create_sharded(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
    nnx.update(sharded, jax.tree.map(lambda s, x: jax.device_put(x, s.sharding), nnx.state(sharded),
                                     nnx.state(model)))
    spec = nnx.state(sharded)["model"]["layers"]["blocks"][0]["mlp"]["experts"]["gate_proj"][...].sharding.spec
    assert spec[2] == "fsdp" and spec[3] == "tensor"
    ids = jax.random.randint(jax.random.PRNGKey(6), (4, 19), 0, 97)
    out = nnx.jit(lambda m, i: m(i))(sharded, jax.device_put(ids, jax.NamedSharding(mesh, jax.P("data"))))
    assert rel_err(out, forward(model, ids)) < 1e-5


def test_mesh_context_runs_the_mixer_per_shard_with_the_same_values(model):
    """Under jax.set_mesh the Gated DeltaNet conv and op run per shard (shard_map: XLA cannot partition Pallas
    kernels), with packed documents; outputs and parameter gradients match one device."""
    from qwen3next_jax.sharding import create_sharded, make_mesh
    cfg = model.config
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = create_sharded(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
    nnx.update(sharded, jax.tree.map(lambda s, x: jax.device_put(x, s.sharding), nnx.state(sharded),
                                     nnx.state(model)))
    ids = jax.random.randint(jax.random.PRNGKey(7), (4, 19), 0, 97)
    seg = jnp.repeat(jnp.array([[1] * 8 + [2] * 3 + [3] * 8]), 4, axis=0)

    def loss(m, ids, seg):
        return jnp.mean(m(ids, segment_ids=seg) ** 2)

    grad = nnx.jit(nnx.value_and_grad(loss))
    want_loss, want = grad(model, ids, seg)
    batch = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(lambda i, s: loss(sharded, i, s))(ids, seg))
        got_loss, got = grad(sharded, jax.device_put(ids, batch), jax.device_put(seg, batch))
    assert "shard_map" in jaxpr and "shard_map" not in str(jax.make_jaxpr(lambda i, s: loss(model, i, s))(ids, seg))
    assert rel_err(got_loss, want_loss) < 1e-5
    # Gradients differ from one device's by fp32 rounding of sums split across devices, carried through the
    # layers: up to ~8e-5 of an array's largest entry here (XLA's own partitioning, without the mesh context, gives
    # ~5e-5). A shard holding the wrong heads or rows would be off by O(1).
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-4 * np.max(np.abs(b)))


def test_layer_period_scans_repeating_blocks():
    base = Qwen3NextConfig.from_dict(dict(SMALL))
    assert layer_period(base.replace(num_hidden_layers=12)) == 4
    assert layer_period(base.replace(num_hidden_layers=12, full_attention_interval=3)) == 3
    assert layer_period(base.replace(num_hidden_layers=12, mlp_only_layers=[5])) == 12
    assert layer_period(base.replace(num_hidden_layers=6)) == 6  # 4 does not divide 6: one block of all


def test_config_errors_name_the_key():
    with pytest.raises(KeyError, match="hidden_sise.*did you mean 'hidden_size'"):
        Qwen3NextConfig.from_dict({"hidden_sise": 8})
    with pytest.raises(ValueError, match="model_type 'llama'"):
        Qwen3NextConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="multiple of linear_num_key_heads"):
        Qwen3NextConfig.from_dict(dict(SMALL, linear_num_value_heads=5))
    with pytest.raises(KeyError, match="unknown preset"):
        Qwen3NextConfig.preset("qwen3-next-1b")


@pytest.mark.parametrize("layout", ["5", "4.57"])
def test_config_json_round_trip(layout):
    cfg = Qwen3NextConfig.preset("qwen3-next-80b-a3b").replace(rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf = cfg.to_hf_dict(layout)
    assert ("rope_parameters" in hf) == (layout == "5") and ("rope_theta" in hf) == (layout == "4.57")
    assert Qwen3NextConfig.from_hf_dict(hf) == cfg


def test_presets_describe_the_documented_models():
    real = Qwen3NextConfig.preset("qwen3-next-80b-a3b")
    assert real.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    assert (real.rope_theta, real.partial_rotary_factor, real.rotary_dim) == (1e7, 0.25, 64)
    shapes = jax.eval_shape(lambda: nnx.state(Qwen3NextForCausalLM(Qwen3NextConfig.preset("bench-1p3b"),
                                                                   rngs=nnx.Rngs(0))))
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert 1.25e9 < n < 1.30e9  # ANCHORS.md: 1.27B with MTP
