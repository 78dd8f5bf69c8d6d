"""Context parallelism (qwen3next_jax.context_parallel) on fake CPU devices, in fp32, against one device: the Gated
DeltaNet op, the conv and attention each on their own (values and gradients), then the whole model's training loss
and every parameter's gradient, with packed documents that cross the shard boundaries.

The packing (T = 64, shards of 32 or 16 tokens) has a document spanning a boundary (tokens 10..19 across 16), one
ending at a boundary and the next starting exactly on it (32), a length-1 document (token 32 alone), documents
spanning two and three shards, and padding (segment id 0) at a row's end.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwen3next_jax import Qwen3NextConfig, Qwen3NextForCausalLM
from qwen3next_jax import context_parallel as cp
from qwen3next_jax.execution import Execution
from qwen3next_jax.model import positions_from_segments
from qwen3next_jax.sharding import create_sharded, make_mesh
from qwen3next_kernels.registry import FAMILIES
from qwen3next_train import losses
from test_model import SMALL, perturbed_model

T = 64
SEGMENTS = np.stack([np.repeat([1, 2, 3, 4, 5], [10, 10, 12, 1, 31]),
                     np.repeat([6, 7, 0], [40, 20, 4])]).astype(np.int32)          # [2, 64]
EXECUTION = Execution(gdn="chunked", conv="xla", attention="xla")


def context_mesh(n):
    return make_mesh(jax.devices()[:n], context=n)


def over_shards(fn, mesh, in_specs, out_specs):
    """fn on each device's shard, the sequence axis (dim 1 of per-token arrays) split over context."""
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False))


def assert_close(got, want, tol, what):
    """Every array of got within tol of its largest entry in want."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (what, i)
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err < tol, f"{what}[{i}]: error {err:.2e} of the largest entry"


# ---------------------------------------------------------------------------------------------------------------
# The ops on their own


def gdn_inputs(K, V, seed=0, H=2, ratio=2, B=2):
    rng = np.random.default_rng(seed)
    HV = H * ratio
    x = dict(q=rng.normal(size=(B, T, H, K)), k=rng.normal(size=(B, T, H, K)), v=rng.normal(size=(B, T, HV, V)),
             g=-rng.uniform(0, 0.2, size=(B, T, HV)), beta=rng.uniform(0, 1, size=(B, T, HV)),
             initial_state=rng.normal(size=(B, HV, K, V)))
    return {n: jnp.asarray(a, jnp.float32) for n, a in x.items()}


def gdn_loss_and_grads(run, x, seg):
    """(o, final state) and the gradients of a random linear function of both w.r.t. every input."""
    rng = np.random.default_rng(1)
    o_shape, s_shape = x["v"].shape, x["initial_state"].shape
    wo, ws = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (o_shape, s_shape))

    def loss(x):
        o, s = run(x, seg)
        return jnp.sum(o * wo) + jnp.sum(s * ws), (o, s)

    (_, outs), grads = jax.value_and_grad(loss, has_aux=True)(x)
    return outs, grads


# The chunked op at small dims; the Mosaic TPU kernel (in the Pallas interpreter, slow) once, at its smallest head dims.
@pytest.mark.parametrize("impl, K, V, n, packed", [("chunked", 16, 8, n, packed) for n in (2, 4) for packed in
                                                   (True, False)] + [("pallas_tpu", 64, 64, 4, True)])
def test_gated_delta_rule_over_shards_matches_one_device(impl, K, V, n, packed):
    """Outputs, the final state and the gradients of every input, initial state included (it belongs to the
    sequence's first token, on the first shard)."""
    rule = FAMILIES["gdn"].function(impl)
    x = gdn_inputs(K, V)
    seg = jnp.asarray(SEGMENTS) if packed else None
    kw = dict(chunk_size=32)

    def whole(x, seg):
        return rule(**x, segment_ids=seg, **kw)

    tok, state = P(None, "context"), P()
    specs = dict(q=tok, k=tok, v=tok, g=tok, beta=tok, initial_state=state)
    sharded = over_shards(lambda x, seg: cp.gated_delta_rule_over_shards(rule, **x, segment_ids=seg, axis="context",
                                                                          **kw),
                          context_mesh(n), (specs, None if seg is None else tok), (tok, state))
    got = gdn_loss_and_grads(sharded, x, seg)
    want = gdn_loss_and_grads(jax.jit(whole), x, seg)
    assert_close(got, want, 1e-5, "gdn")


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("packed", [True, False])
def test_conv_over_shards_matches_one_device(n, packed):
    """q, k, v, z and the gradients w.r.t. in_proj_qkvz's output and the taps (W = 4: a 3-token halo)."""
    nk, dk, nv, dv, W = 2, 8, 4, 6, 4
    key = jax.random.split(jax.random.key(0), 3)
    qkvz = jax.random.normal(key[0], (2, T, nk, 2 * dk + 2 * (nv // nk) * dv))
    kernel = jax.random.normal(key[1], (W, 2 * nk * dk + nv * dv))
    seg = jnp.asarray(SEGMENTS) if packed else None
    dims = dict(key_heads=nk, key_dim=dk, value_heads=nv, value_dim=dv)
    split_conv = FAMILIES["conv"].function("xla")
    weights = [jax.random.normal(jax.random.key(i), s.shape) for i, s in
               enumerate(jax.eval_shape(lambda: split_conv(qkvz, kernel, seg, **dims)))]

    def outputs_and_grads(run):
        def loss(qkvz, kernel):
            outs = run(qkvz, kernel, seg)
            return sum(jnp.sum(o * w) for o, w in zip(outs, weights)), outs
        (_, outs), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(qkvz, kernel)
        return outs, grads

    tok = P(None, "context")
    sharded = over_shards(lambda x, w, s: cp.split_conv_over_shards(split_conv, x, w, s, axis="context", **dims),
                          context_mesh(n), (tok, P(), None if seg is None else tok), (tok,) * 4)
    want = outputs_and_grads(jax.jit(lambda x, w, s: split_conv(x, w, s, **dims)))
    assert_close(outputs_and_grads(sharded), want, 1e-6, "conv")


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("packed", [True, False])
def test_attention_over_shards_matches_one_device(n, packed):
    """GQA (4 query heads on 2 key-value heads); outputs and the gradients w.r.t. q, k, v."""
    key = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(key[0], (2, T, 4, 8))
    k, v = (jax.random.normal(kk, (2, T, 2, 8)) for kk in key[1:3])
    w = jax.random.normal(key[3], q.shape)
    seg = jnp.asarray(SEGMENTS) if packed else None
    attend = FAMILIES["attention"].function("xla")

    def outputs_and_grads(run):
        def loss(q, k, v):
            out = run(q, k, v, seg)
            return jnp.sum(out * w), out
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    tok = P(None, "context")
    sharded = over_shards(lambda q, k, v, s: cp.attention_over_shards(attend, q, k, v, s, axis="context", scale=0.3),
                          context_mesh(n), (tok, tok, tok, None if seg is None else tok), tok)
    want = outputs_and_grads(jax.jit(lambda q, k, v, s: attend(q, k, v, s, scale=0.3)))
    assert_close(outputs_and_grads(sharded), want, 1e-5, "attention")


def test_conv_halo_needs_enough_tokens_per_shard():
    split_conv = FAMILIES["conv"].function("xla")
    dims = dict(key_heads=1, key_dim=2, value_heads=1, value_dim=2)
    run = over_shards(lambda x, w: cp.split_conv_over_shards(split_conv, x, w, None, axis="context", **dims),
                      context_mesh(8), (P(None, "context"), P()), (P(None, "context"),) * 4)
    with pytest.raises(ValueError, match="each shard holds 2 tokens, fewer than the conv's 3"):
        run(jnp.zeros((1, 16, 1, 8)), jnp.zeros((4, 6)))


# ---------------------------------------------------------------------------------------------------------------
# The whole model


@pytest.fixture(scope="module")
def model():
    return perturbed_model(Qwen3NextConfig.from_dict(dict(SMALL)), execution=EXECUTION)


@pytest.fixture(scope="module")
def batch():
    seg = jnp.asarray(SEGMENTS)
    ids = jax.random.randint(jax.random.PRNGKey(0), seg.shape, 1, SMALL["vocab_size"])
    return dict(input_ids=ids, segment_ids=seg, positions=positions_from_segments(seg))


def training_loss(model, batch):
    """The trainer's loss: next-token cross entropy, MTP, router load balancing and z-loss."""
    counts = losses.token_counts(batch["segment_ids"], model.config.mtp_num_hidden_layers)
    return losses.loss_and_metrics(model, batch, counts, mtp_weight=0.3, aux_coef=0.01, z_loss_coef=1e-3,
                                   chunk_tokens=32, n_micro=1)[0]


loss_and_grads = nnx.jit(nnx.value_and_grad(training_loss))


@pytest.fixture(scope="module")
def one_device(model, batch):
    return loss_and_grads(model, batch)


@pytest.mark.parametrize("axes", [dict(context=4), dict(data=2, context=2)], ids=["context4", "data2-context2"])
def test_model_loss_and_gradients_match_one_device(model, batch, one_device, axes):
    """Every Gated DeltaNet and attention layer (MTP's included) splits the sequence: the conv's halo, the state
    passing and the K/V gather all run (their collectives are in the program), and the loss and every parameter's
    gradient equal one device's."""
    mesh = make_mesh(jax.devices()[:int(np.prod(list(axes.values())))], **axes)
    cfg = model.config
    sharded = create_sharded(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0), execution=EXECUTION), mesh)
    nnx.update(sharded, jax.tree.map(lambda s, x: jax.device_put(x, s.sharding), nnx.state(sharded),
                                     nnx.state(model)))
    rows_and_tokens = jax.NamedSharding(mesh, P("data", "context"))
    placed = jax.tree.map(lambda x: jax.device_put(x, rows_and_tokens), batch)
    with jax.set_mesh(mesh):
        program = str(jax.make_jaxpr(lambda b: training_loss(sharded, b))(placed))
        got_loss, got = loss_and_grads(sharded, placed)
    for collective in ("ppermute", "all_gather"):
        assert collective in program
    want_loss, want = one_device
    assert abs(float(got_loss) - float(want_loss)) < 1e-5
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-4 * np.max(np.abs(b)), err_msg=jax.tree_util.keystr(path[0]))


@pytest.mark.parametrize("dims, want", [((128, 128), "pallas_tpu"), ((256, 256), "chunked")])
def test_the_wider_op_call_resolves_as_its_own_site(dims, want):
    """Under context parallelism the op runs at value dim V + K; auto takes a kernel only where it covers that
    width (the Mosaic TPU kernel: 64/128/256), else the chunked op."""
    from qwen3next_jax.gated_deltanet import context_parallel_gdn_site
    from qwen3next_kernels.registry import Platform
    K, V = dims
    cfg = Qwen3NextConfig.preset("qwen3-next-80b-a3b").replace(linear_key_head_dim=K, linear_value_head_dim=V)
    site = context_parallel_gdn_site(cfg, jnp.bfloat16)
    assert site["value_dim"] == K + V
    tpu = Platform("tpu", "TPU v5p")
    assert Execution().resolve("gdn", site, tpu) == want
    assert Execution().resolve("gdn", dict(site, value_dim=V), tpu) == "pallas_tpu"


# Several processes on one host would otherwise fight over libtpu's lock file (as in test_gdn_pallas_tpu.py).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def test_aot_compiles_for_tpu_at_qwen3_next_shapes():
    """The state passing around the Mosaic TPU kernel (interpret=False, value dim 128 + 128) with its gradients,
    over a context axis of 4 TPU v5p chips, compiled ahead of time from this host (needs libtpu, no TPU): forward,
    the backward's state recompute and the backward, and the all-gather of the states."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    from qwen3next_kernels.gdn import pallas_tpu

    mesh = jax.sharding.Mesh(np.array(topologies.get_topology_desc("v5p:2x2x1", "tpu").devices), ("context",))
    rule = functools.partial(pallas_tpu.gated_delta_rule, interpret=False)
    B, T, H, HV, K = 1, 4 * 2048, 16, 32, 128

    def loss(q, k, v, g, beta, seg):
        o, state = cp.gated_delta_rule_over_shards(rule, q, k, v, g, beta, segment_ids=seg, axis="context")
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(state ** 2)

    tok = P(None, "context")
    step = jax.jit(jax.shard_map(jax.value_and_grad(loss, argnums=range(5)), mesh=mesh, in_specs=(tok,) * 6,
                                 out_specs=(P(), (tok,) * 5), check_vma=False))
    arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=jax.NamedSharding(mesh, tok))
    compiled = step.lower(arg((B, T, H, K), jnp.bfloat16), arg((B, T, H, K), jnp.bfloat16),
                          arg((B, T, HV, K), jnp.bfloat16), arg((B, T, HV), jnp.float32),
                          arg((B, T, HV), jnp.bfloat16), arg((B, T), jnp.int32)).compile()
    text = compiled.as_text()
    assert text.count("tpu_custom_call") == 3 and "all-gather" in text
