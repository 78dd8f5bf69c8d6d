"""The LM head's cross entropy (the registry's "loss" family): every implementation against the definition, log
softmax of the full logits, in values and gradients."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from qwen3next_kernels.registry import FAMILIES


@pytest.mark.parametrize("impl", [i.name for i in FAMILIES["loss"].impls])
def test_matches_full_logits(impl):
    B, T, D, V = 2, 9, 8, 50
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (B, T, D))
    w = jax.random.normal(k2, (D, V))
    y = jax.random.randint(k3, (B, T), 0, V)
    linear_cross_entropy = FAMILIES["loss"].function(impl)

    def full(h, w):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]

    def ours(h, w):
        return linear_cross_entropy(h, w, y, chunk_tokens=4)[0]  # 18 tokens: the chunked form's last chunk is padded

    np.testing.assert_allclose(ours(h, w), full(h, w), rtol=1e-5, atol=1e-5)
    g_full = jax.grad(lambda h, w: full(h, w).sum(), argnums=(0, 1))(h, w)
    g_ours = jax.grad(lambda h, w: ours(h, w).sum(), argnums=(0, 1))(h, w)
    for a, b in zip(g_ours, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [i.name for i in FAMILIES["loss"].impls])
@pytest.mark.parametrize("chunk_tokens", [4, 64])
def test_objective_gradient_matches_autodiff_of_the_definition(impl, chunk_tokens):
    """With weights, (ce, lse) and the gradient of sum(ce * ce_weight + lse**2 * z_weight), formed in the forward
    pass, equal autodiff of the full-logit definition in fp32 (18 tokens: with 4 a chunk, the last is padded)."""
    B, T, D, V = 2, 9, 8, 50
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
    h = jax.random.normal(k1, (B, T, D))
    w = jax.random.normal(k2, (D, V))
    y = jax.random.randint(k3, (B, T), 0, V)
    ce_weight = jax.random.uniform(k4, (B, T)) * (jax.random.uniform(k5, (B, T)) > 0.3)  # masked tokens too
    z_weight = 0.1 * jax.random.uniform(k5, (B, T))

    def definition(h, w):
        logits = h @ w
        lse = jax.nn.logsumexp(logits, axis=-1)
        ce = lse - jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum(ce * ce_weight + lse ** 2 * z_weight), (ce, lse)

    (_, (ce_want, lse_want)), grads_want = jax.value_and_grad(definition, argnums=(0, 1), has_aux=True)(h, w)
    ce, lse, grads = FAMILIES["loss"].function(impl)(h, w, y, (ce_weight, z_weight), chunk_tokens=chunk_tokens)
    np.testing.assert_allclose(ce, ce_want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, lse_want, rtol=1e-5, atol=1e-5)
    assert grads[0].shape == h.shape and grads[1].dtype == jnp.float32
    for a, b in zip(grads, grads_want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _dot_operand_dtypes(jaxpr, vocab: int) -> set:
    """The operand dtypes of every dot_general in jaxpr (and its sub-jaxprs) with an operand of `vocab` columns."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and any(vocab in v.aval.shape for v in eqn.invars):
            found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _dot_operand_dtypes(sub, vocab)
    return found


def test_chunked_gradient_products_in_the_compute_dtype():
    """In bf16, every product of the chunked form with weights (the logits, dh and dw) takes bf16 operands: the fp32
    logits gradient is cast first. Three products, not four: the logits are formed once. Its gradients stay within
    bf16 rounding of the fp32 definition's."""
    D, V = 64, 1000
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    h = jax.random.normal(k1, (3, 50, D))
    w = jax.random.normal(k2, (D, V)) / 8
    y = jax.random.randint(k3, (3, 50), 0, V)
    weights = (jnp.full(y.shape, 1 / y.size), jnp.full(y.shape, 0.1 / y.size))
    chunked = FAMILIES["loss"].function("chunked")

    def grads(fn, dtype):
        return fn(h.astype(dtype), w.astype(dtype), y, weights)[2]

    jaxpr = jax.make_jaxpr(lambda h, w: chunked(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), y, weights,
                                                chunk_tokens=32))(h, w)
    assert _dot_operand_dtypes(jaxpr.jaxpr, V) == {("bfloat16", "bfloat16")}
    assert _count_dots(jaxpr.jaxpr, V) == 3
    got = grads(lambda *a: chunked(*a, chunk_tokens=32), jnp.bfloat16)
    want = grads(FAMILIES["loss"].function("reference"), jnp.float32)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=2e-2 * float(jnp.max(jnp.abs(b))))


def _count_dots(jaxpr, vocab: int) -> int:
    """dot_generals with an operand of `vocab` columns in jaxpr and its sub-jaxprs (a loop body counted once)."""
    return sum((eqn.primitive.name == "dot_general" and any(vocab in v.aval.shape for v in eqn.invars))
               + sum(_count_dots(sub, vocab) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)


def _model_and_inputs(vocab, B, T):
    from flax import nnx

    from qwen3next_jax import Qwen3NextForCausalLM
    from qwen3next_train.config import load_config

    cfg = load_config("configs/smoke.yaml", [f"model.vocab_size={vocab}"]).model
    graphdef, params, rest = nnx.split(Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    k1, k2 = jax.random.split(jax.random.key(1))
    h = jax.random.normal(k1, (B, T, cfg.hidden_size))
    y = jax.random.randint(k2, (B, T), 0, vocab)

    weight = jnp.linspace(0.5, 1.5, y.size).reshape(y.shape)

    def loss(params, h, y, chunk_tokens):
        """The training objective: its gradient formed in the forward pass, the weight's summed over the devices."""
        return nnx.merge(graphdef, params, rest).objective(h, y, weight, 0.1 * weight, chunk_tokens)[0]

    def definition(params, h, y, chunk_tokens):
        """The same objective from the differentiable per-token losses, by autodiff."""
        ce, lse = nnx.merge(graphdef, params, rest).cross_entropy(h, y, chunk_tokens)
        return jnp.sum(ce * weight + 0.1 * lse ** 2 * weight)

    return params, h, y, loss, definition


@pytest.mark.parametrize("axes", [dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, context=2)])
def test_model_loss_under_a_mesh_equals_one_device(axes):
    """fp32: the LM-head objective and its gradients (of the parameters and the hidden states) on 8 devices equal
    autodiff of the per-token losses on one device, with a tensor axis (over which the per-shard loss is
    replicated) and a context axis too."""
    from jax.sharding import PartitionSpec as P
    from qwen3next_jax import sharding as shd

    params, h, y, loss, definition = _model_and_inputs(vocab=300, B=8, T=24)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=3)
    want = jax.jit(jax.value_and_grad(definition, argnums=(0, 1)), static_argnums=3)(params, h, y, 16)
    mesh = shd.make_mesh(jax.devices()[:8], **axes)
    tokens = NamedSharding(mesh, shd.logical_to_spec(("batch", "seq"), y.shape, mesh))
    with jax.set_mesh(mesh):
        got = grad(jax.device_put(params, shd.state_shardings(params, mesh)), jax.device_put(h, tokens),
                   jax.device_put(y, tokens), 16)
    assert tokens.spec != P()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("chunk_tokens", [64, 16])
def test_model_loss_forms_only_its_own_rows_logits(chunk_tokens):
    """Compiled for 8 devices with the batch split over data x fsdp, each device forms the logits of its own 64 of
    the 512 tokens (rows of the [rows, V] product times the chunk loop's trips), not the whole batch's."""
    import re

    from qwen3next_jax import sharding as shd

    V, B, T = 1000, 8, 64
    params, h, y, loss, _ = _model_and_inputs(vocab=V, B=B, T=T)
    mesh = shd.make_mesh(jax.devices()[:8], data=2, fsdp=4)
    tokens = NamedSharding(mesh, shd.logical_to_spec(("batch", "seq"), y.shape, mesh))
    abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    with jax.set_mesh(mesh):
        hlo = jax.jit(loss, static_argnums=3).lower(
            jax.tree.map(abstract, params, shd.state_shardings(params, mesh)), abstract(h, tokens),
            abstract(y, tokens), chunk_tokens).compile().as_text()
    rows = [int(r) for r in re.findall(rf"= f32\[(\d+),{V}\]\S* dot\(", hlo)]
    trips = [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo)] or [1]
    assert len(rows) == 1 and rows[0] * max(trips) == B * T // 8, (rows, trips)
