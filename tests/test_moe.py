"""The mixture of experts: every expert-MLP implementation against jax.lax.ragged_dot's, the whole block against a
dense oracle (every expert on every token, weighted by the router), the permutations' gather-only gradients, and
the tiled form's memory bound."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3next_jax import Qwen3NextConfig
from qwen3next_jax.execution import Execution
from qwen3next_jax.interface import Context
from qwen3next_jax.moe import SparseMoE, combine_from_experts, gather_to_experts, sort_by_expert
from qwen3next_kernels.moe.tiled import tiled_grouped_matmul
from qwen3next_kernels.registry import FAMILIES, Platform


@pytest.mark.parametrize("sizes", [[5, 0, 17, 1, 0, 30], [0, 0, 53, 0, 0, 0], [9, 9, 9, 9, 9, 8]])
def test_tiled_matches_ragged_dot_values_and_gradients(sizes):
    rng = np.random.default_rng(0)
    M, D, F = sum(sizes), 12, 7
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((len(sizes), D, F)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    ct = jnp.asarray(rng.standard_normal((M, F)), jnp.float32)
    # tile 4 and a block of 3 tiles: several tiles per group, partial tiles, several blocks.
    tiled = lambda x, w: tiled_grouped_matmul(x, w, gs, tile=4, block_bytes=3 * D * F * 4)
    ragged = lambda x, w: jax.lax.ragged_dot(x, w, gs)
    (y1, vjp1), (y2, vjp2) = jax.vjp(tiled, x, w), jax.vjp(ragged, x, w)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(vjp1(ct), vjp2(ct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [i.name for i in FAMILIES["moe"].impls if i.name != "pallas_gpu"])  # GPU: below
def test_expert_mlp_implementations_match_ragged_dot(impl):
    rng = np.random.default_rng(1)
    sizes = [7, 0, 30, 1, 12]
    E, D, F, M = len(sizes), 16, 8, sum(sizes)
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    ws = [jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    gs = jnp.asarray(sizes, jnp.int32)
    ct = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    got = jax.vjp(lambda *a: FAMILIES["moe"].function(impl)(*a, gs), x, *ws)
    want = jax.vjp(lambda *a: FAMILIES["moe"].function("ragged_dot")(*a, gs), x, *ws)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1](ct), want[1](ct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_permutations_have_gather_gradients():
    rng = np.random.default_rng(2)
    N, k, E, D = 11, 3, 5, 4
    top_idx = jnp.asarray(np.stack([rng.choice(E, k, replace=False) for _ in range(N)]), jnp.int32)
    order, inverse, group_sizes = sort_by_expert(top_idx, E)
    np.testing.assert_array_equal(np.asarray(top_idx).reshape(-1)[np.asarray(order)],
                                  np.sort(np.asarray(top_idx).reshape(-1)))
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(inverse)], np.arange(N * k))
    np.testing.assert_array_equal(group_sizes, np.bincount(np.asarray(top_idx).reshape(-1), minlength=E))
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((N * k, D)), jnp.float32)
    w = jnp.asarray(rng.uniform(size=(N, k)), jnp.float32)
    ct_rows = jnp.asarray(rng.standard_normal((N * k, D)), jnp.float32)
    ct_tokens = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    plain_combine = lambda y, w: jnp.einsum("nkd,nk->nd", y[inverse].reshape(N, k, D), w)
    for ours, plain, args, ct in (
            (lambda x: gather_to_experts(x, order, inverse, k), lambda x: x[order // k], (x,), ct_rows),
            (lambda y, w: combine_from_experts(y, w, order, inverse), plain_combine, (y, w), ct_tokens)):
        (a, vjp_a), (b, vjp_b) = jax.vjp(ours, *args), jax.vjp(plain, *args)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        for ga, gb in zip(vjp_a(ct), vjp_b(ct)):
            np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)
    for f, args in ((lambda x: gather_to_experts(x, order, inverse, k), (x,)),
                    (lambda y, w: combine_from_experts(y, w, order, inverse), (y, w))):
        grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(args)))))(
            *args))
        assert "scatter" not in grad_jaxpr


def _context(mask):
    return Context(rope=None, segment_ids=None, token_mask=mask)


def dense_oracle(moe, x, mask):
    """Every expert on every token, combined with the top-k weights; the router loss by its definition."""
    cfg_k, E = moe.top_k, moe.experts.gate_proj.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    probs = jax.nn.softmax(x2 @ moe.gate.kernel[...], axis=-1)
    top_w, top_idx = jax.lax.top_k(probs, cfg_k)
    top_w = top_w / top_w.sum(-1, keepdims=True)
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x2, moe.experts.gate_proj[...])) * \
        jnp.einsum("nd,edf->enf", x2, moe.experts.up_proj[...])
    every = jnp.einsum("enf,efd->end", h, moe.experts.down_proj[...])                  # [E, N, D]
    weights = jnp.sum(jax.nn.one_hot(top_idx, E) * top_w[..., None], axis=1)           # [N, E]
    routed = jnp.einsum("end,ne->nd", every, weights)
    shared = moe.shared_expert(x2)[0] * jax.nn.sigmoid(moe.shared_expert_gate(x2))
    m = mask.reshape(-1).astype(jnp.float32)
    f = jnp.sum(jax.nn.one_hot(top_idx, E) * m[:, None, None], axis=(0, 1)) / (m.sum() * cfg_k)
    P = jnp.sum(probs * m[:, None], axis=0) / m.sum()
    return (routed + shared).reshape(x.shape), E * jnp.sum(f * P)


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_moe_block_matches_the_dense_oracle(impl):
    cfg = Qwen3NextConfig.preset("tiny")
    moe = SparseMoE(cfg, rngs=nnx.Rngs(0), execution=Execution(moe=impl), platform=Platform.current())
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 33, cfg.hidden_size))
    mask = jnp.arange(33)[None, :] < jnp.array([[33], [20]])  # the second row ends in padding
    graphdef, state = nnx.split(moe)

    def ours(state, x):
        y, aux = nnx.merge(graphdef, state)(x, _context(mask))
        return y, aux.load_balancing

    def oracle(state, x):
        return dense_oracle(nnx.merge(graphdef, state), x, mask)

    (y1, lb1), vjp1 = jax.vjp(ours, state, x)
    (y2, lb2), vjp2 = jax.vjp(oracle, state, x)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lb1, lb2, rtol=1e-6)
    ct = (jax.random.normal(jax.random.PRNGKey(1), y1.shape), jnp.float32(0.7))
    for a, b in zip(jax.tree.leaves(vjp1(ct)), jax.tree.leaves(vjp2(ct))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))


def test_tiled_moe_memory_is_bounded_at_the_bench_shape():
    """One bench-1p3b MoE layer at 16K tokens, forward + backward: the dense expansion of ragged_dot off TPU
    needs over 100 GiB of temporaries; the tiled form a few."""
    cfg = Qwen3NextConfig.preset("bench-1p3b")
    execution = Execution(compute_dtype="bfloat16", moe="tiled")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: SparseMoE(cfg, rngs=nnx.Rngs(0), execution=execution,
                                                                  platform=Platform.current())))
    x = jax.ShapeDtypeStruct((8, 2048, cfg.hidden_size), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((8, 2048), bool)

    def loss(state, x, mask):
        y, aux = nnx.merge(graphdef, state)(x, _context(mask))
        return y.astype(jnp.float32).mean() + aux.load_balancing

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x, mask).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 8 * 2**30


def test_unknown_moe_impl_is_named():
    with pytest.raises(ValueError, match="unknown moe implementation 'megablox'"):
        Execution(moe="megablox")


def _expert_case(sizes, M=None, D=16, F=8, dtype=jnp.float32, seed=3):
    rng = np.random.default_rng(seed)
    E, M = len(sizes), M or sum(sizes)
    x = jnp.asarray(rng.standard_normal((M, D)), dtype)
    ws = [jnp.asarray(0.3 * rng.standard_normal(s), dtype) for s in ((E, D, F), (E, D, F), (E, F, D))]
    return x, ws, jnp.asarray(sizes, jnp.int32), jnp.asarray(rng.standard_normal((M, D)), dtype)


def test_mosaic_gpu_expert_mlp_algebra_on_cpu():
    """kernels_pallas/moe/pallas_gpu.py's custom VJP (fused gate/up, the kernels' roles for dx and the weight
    gradients, rows past the groups) with XLA's ragged_dot in the kernels' places, against the reference."""
    from qwen3next_kernels.moe import pallas_gpu
    x, ws, gs, ct = _expert_case([7, 0, 30, 1, 12], M=60)
    got = jax.vjp(lambda *a: pallas_gpu.expert_mlp(*a, gs, ops=pallas_gpu.xla_ops), x, *ws)
    want = jax.vjp(lambda *a: FAMILIES["moe"].function("ragged_dot")(*a, gs), x, *ws)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1](ct), want[1](ct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_mosaic_gpu_expert_mlp_keeps_unwritten_rows_out_of_the_weight_gradients():
    """The kernels leave rows past sum(group_sizes) unwritten: here XLA's grouped matmuls with NaN written there.
    The weight gradient is modelled as the Mosaic kernel keeps a group's rows: its lhs multiplied by a 0/1 row mask,
    its rhs not masked, so a NaN in either operand outside the groups reaches the sum. Given zero cotangents for
    those rows (the contract), the real rows' outputs and input gradients and the weight gradients are the
    reference's: nothing the kernels left behind reaches them. (Without the mask on a or on dh, NaN does.)"""
    from qwen3next_kernels.moe import pallas_gpu
    x, ws, gs, ct = _expert_case([7, 0, 30, 1, 12], M=60)
    real = int(gs.sum())
    ct = ct.at[real:].set(0)

    def unwritten_past_the_groups():
        ragged, _ = pallas_gpu.xla_ops()
        poison = lambda y: y.at[real:].set(jnp.nan)

        def weight_grad(role, lhs, rhs, group_sizes):  # [E, lhs cols, rhs cols]
            ends = jnp.cumsum(group_sizes)
            rows = jnp.arange(lhs.shape[0])
            member = ((rows >= (ends - group_sizes)[:, None]) & (rows < ends[:, None])).astype(lhs.dtype)  # [E, M]
            return jnp.einsum("emi,mj->eij", lhs[None] * member[:, :, None], rhs)

        return (lambda *a, **k: poison(ragged(*a, **k))), weight_grad

    got = jax.vjp(lambda *a: pallas_gpu.expert_mlp(*a, gs, ops=unwritten_past_the_groups), x, *ws)
    want = jax.vjp(lambda *a: FAMILIES["moe"].function("ragged_dot")(*a, gs), x, *ws)
    np.testing.assert_allclose(got[0][:real], want[0][:real], rtol=1e-5, atol=1e-5)
    (dx, *dw), (dx_want, *dw_want) = got[1](ct), want[1](ct)
    np.testing.assert_allclose(dx[:real], dx_want[:real], rtol=1e-5, atol=1e-5)
    for a, b in zip(dw, dw_want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_moe_resolution_per_platform():
    site = dict(experts=64, hidden=1024, width=256, dtype="bfloat16")
    moe = FAMILIES["moe"]
    assert moe.resolve("auto", site, Platform("gpu", "NVIDIA H200")) == "pallas_gpu"
    assert moe.resolve("auto", site, Platform("tpu", "TPU v5p")) == "ragged_dot"
    assert moe.resolve("auto", site, Platform("cpu", "cpu")) == "tiled"
    assert moe.resolve("auto", dict(site, width=200), Platform("gpu", "NVIDIA H200")) == "tiled"
    assert moe.resolve("auto", dict(site, dtype="float32"), Platform("gpu", "NVIDIA H200")) == "tiled"


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", [[300, 0, 1, 511, 129, 4], [0, 1024, 0, 0, 0, 0]])
def test_mosaic_gpu_expert_mlp_on_the_gpu(sizes):
    """The Mosaic GPU kernels in bf16 against the reference in fp32 on the same bf16 inputs: bf16 rounding of the
    products, about 1e-2 of each array's largest entry. Rows past the groups: cotangent zero (the contract), their
    output and input gradient unspecified."""
    from qwen3next_kernels.moe import pallas_gpu
    x, ws, gs, ct = _expert_case(sizes, M=sum(sizes) + 77, D=256, F=128, dtype=jnp.bfloat16)
    got = jax.jit(lambda *a: jax.vjp(lambda *b: pallas_gpu.expert_mlp(*b, gs), *a))(x, *ws)
    up = lambda a: a.astype(jnp.float32)
    want = jax.vjp(lambda *b: FAMILIES["moe"].function("ragged_dot")(*b, gs), up(x), *map(up, ws))
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
    real = sum(sizes)
    assert rel(got[0][:real], want[0][:real]) < 2e-2
    ct = ct.at[real:].set(0)
    (dx, *dw), (dx_want, *dw_want) = got[1](ct), want[1](up(ct))
    assert rel(dx[:real], dx_want[:real]) < 3e-2
    for a, b in zip(dw, dw_want):
        assert rel(a, b) < 3e-2
