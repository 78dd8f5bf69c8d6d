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

    # Through the logsumexp output too (the z-loss's), with a weight per token as the masked mean gives.
    weights = jax.random.uniform(k3, (B, T))

    def with_lse(fn):
        def loss(h, w):
            ce, lse = fn(h, w)
            return jnp.sum(ce * weights) + 0.1 * jnp.sum(lse ** 2 * weights)
        return loss

    reference = FAMILIES["loss"].function("reference")
    g_ref = jax.grad(with_lse(lambda h, w: reference(h, w, y)), argnums=(0, 1))(h, w)
    g_ours = jax.grad(with_lse(lambda h, w: linear_cross_entropy(h, w, y, chunk_tokens=4)), argnums=(0, 1))(h, w)
    for a, b in zip(g_ours, g_ref):
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


def test_chunked_backward_products_in_the_compute_dtype():
    """In bf16, every product of the chunked form (forward, and the backward's dh and dw) takes bf16 operands: the
    fp32 logits gradient is cast first. Its gradients stay within bf16 rounding of the fp32 definition's."""
    D, V = 64, 1000
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    h = jax.random.normal(k1, (3, 50, D))
    w = jax.random.normal(k2, (D, V)) / 8
    y = jax.random.randint(k3, (3, 50), 0, V)
    chunked = FAMILIES["loss"].function("chunked")

    def loss(fn, dtype):
        def f(h, w):
            ce, lse = fn(h.astype(dtype), w.astype(dtype), y)
            return jnp.mean(ce) + 0.1 * jnp.mean(lse ** 2)
        return jax.grad(f, argnums=(0, 1))

    jaxpr = jax.make_jaxpr(lambda h, w: loss(lambda *a: chunked(*a, chunk_tokens=32), jnp.bfloat16)(h, w))(h, w)
    assert _dot_operand_dtypes(jaxpr.jaxpr, V) == {("bfloat16", "bfloat16")}
    got = loss(lambda *a: chunked(*a, chunk_tokens=32), jnp.bfloat16)(h, w)
    want = loss(FAMILIES["loss"].function("reference"), jnp.float32)(h, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-2 * float(jnp.max(jnp.abs(b))))


def _model_and_inputs(vocab, B, T):
    from flax import nnx

    from qwen3next_jax import Qwen3NextForCausalLM
    from qwen3next_train.config import load_config

    cfg = load_config("configs/smoke.yaml", [f"model.vocab_size={vocab}"]).model
    graphdef, params, rest = nnx.split(Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    k1, k2 = jax.random.split(jax.random.key(1))
    h = jax.random.normal(k1, (B, T, cfg.hidden_size))
    y = jax.random.randint(k2, (B, T), 0, vocab)

    def loss(params, h, y, chunk_tokens):
        ce, lse = nnx.merge(graphdef, params, rest).cross_entropy(h, y, chunk_tokens)
        return jnp.sum(ce) + 0.1 * jnp.sum(lse ** 2)

    return params, h, y, loss


@pytest.mark.parametrize("axes", [dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, context=2)])
def test_model_loss_under_a_mesh_equals_one_device(axes):
    """fp32: the LM-head loss and its gradients (of the parameters and the hidden states) on 8 devices equal one
    device's, with a tensor axis (over which the per-shard loss is replicated) and a context axis too."""
    from jax.sharding import PartitionSpec as P
    from qwen3next_jax import sharding as shd

    params, h, y, loss = _model_and_inputs(vocab=300, B=8, T=24)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=3)
    want = grad(params, h, y, 16)
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
    params, h, y, loss = _model_and_inputs(vocab=V, B=B, T=T)
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
