"""Expert parallelism (qwen3next_jax/moe.py, the registry's "exchange" family), on 8 fake CPU devices in fp32.

- The whole model (both MoE layers, MTP's included) on meshes with expert 2, 4 and 8, alone and with data and fsdp:
  the loss and every parameter gradient against one device.
- One MoE layer: its compiled step exchanges rows by all-to-all and all-gathers / all-reduces no token buffer and no
  expert weight over the expert axis; expert weights' bytes per device fall as 1/EP; temporaries stay flat as the
  global batch grows at fixed tokens per device; tensor parallelism of the experts' width.
- The capacity: what it drops, against a dense oracle with those assignments removed, and the count in Aux.dropped.
- The exchanges' contract directly, the ragged one through an emulation of ragged_all_to_all's documented semantics
  (XLA:CPU does not implement the op), and compiled ahead of time for TPU v5p with its HLO inspected.
- The expert-MLP family's contract for rows past sum(group_sizes).
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from qwen3next_jax import Qwen3NextConfig, Qwen3NextForCausalLM
from qwen3next_jax import sharding as shd
from qwen3next_jax.execution import Execution
from qwen3next_jax.interface import Context
from qwen3next_jax.moe import SparseMoE
from qwen3next_kernels.registry import FAMILIES, Platform
from qwen3next_train import losses

# Small enough that every weight has fewer entries than one device's token buffer [T_loc, D] (the HLO check tells
# them apart by size), eight experts so that the expert axis can take all 8 devices.
MOE = dict(hidden_size=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=8,
           shared_expert_intermediate_size=8)
MODEL = dict(vocab_size=61, intermediate_size=32, num_hidden_layers=2, full_attention_interval=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=8, linear_num_key_heads=1,
             linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, mtp_num_hidden_layers=1)


def mesh_of(**axes):
    return shd.make_mesh(jax.devices()[:math.prod(axes.values())], **axes)


def put(arrays, mesh, axes_of):
    """Each array laid out over `mesh` as its logical axes name."""
    return tuple(jax.device_put(a, NamedSharding(mesh, shd.logical_to_spec(axes, a.shape, mesh)))
                 for a, axes in zip(arrays, axes_of))


def run(fn, mesh, *args):
    """fn jitted and called with `mesh` as the context mesh (as the trainer traces its step)."""
    return shd.in_mesh(mesh, jax.jit(fn))(*args)


def compiled(fn, mesh, *args):
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile()


def assert_close_tree(got, want, tol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        scale = float(np.max(np.abs(np.asarray(b))))
        assert err <= tol * scale, f"{jax.tree_util.keystr(path)}: {err:.2e} > {tol} x {scale:.2e}"


# ------------------------------------------------------------------------------------------------ the whole model

@pytest.fixture(scope="module")
def model_case():
    cfg = Qwen3NextConfig.preset("tiny").replace(**MOE, **MODEL)
    model = Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0), execution=Execution())
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    B, T = 8, 16
    rng = np.random.default_rng(0)
    seg = np.repeat(np.arange(1, 5), 4)[None].repeat(B, 0)
    seg[1, 11:] = 0  # padding
    batch = {"input_ids": jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32),
             "segment_ids": jnp.asarray(seg, jnp.int32),
             "positions": jnp.asarray(np.tile(np.arange(4), 4)[None].repeat(B, 0), jnp.int32)}
    counts = losses.token_counts(batch["segment_ids"], cfg.mtp_num_hidden_layers)

    def loss(params, batch):
        model = nnx.merge(graphdef, params, rest)
        # aux_coef 1: the load-balancing loss's gradient is as large as the others.
        return losses.loss_and_metrics(model, batch, counts, mtp_weight=0.3, aux_coef=1.0, z_loss_coef=0.0,
                                       chunk_tokens=64, n_micro=1)

    want = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch)
    return loss, params, batch, want


def ids(axes):
    return ",".join(f"{k}{v}" for k, v in axes.items())


# Every expert-axis size alone and beside data and fsdp is covered by the MoE-layer test below; the whole model (its
# compile is most of this file's time) on two of them.
@pytest.mark.parametrize("axes", [dict(expert=8), dict(data=2, fsdp=2, expert=2)], ids=ids)
def test_model_loss_and_gradients_match_one_device(model_case, axes):
    loss, params, batch, ((want_loss, want_metrics), want_grads) = model_case
    mesh = mesh_of(**axes)
    params = jax.device_put(params, shd.state_shardings(params, mesh))
    batch = {k: jax.device_put(v, NamedSharding(mesh, shd.logical_to_spec(("batch", "seq"), v.shape, mesh)))
             for k, v in batch.items()}
    (got_loss, metrics), grads = run(jax.value_and_grad(loss, has_aux=True), mesh, params, batch)
    assert abs(float(got_loss) - float(want_loss)) <= 1e-5
    for key in ("aux", "expert_load_max"):  # the router statistics are those of the global batch
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-6)
    assert float(metrics["dropped"]) == 0
    assert_close_tree(grads, want_grads, 2e-4)


# ----------------------------------------------------------------------------------------------- one MoE layer

def make_layer(execution=Execution(), **cfg_overrides):
    cfg = Qwen3NextConfig.preset("tiny").replace(**{**MOE, **cfg_overrides})
    layer = SparseMoE(cfg, rngs=nnx.Rngs(1), execution=execution, platform=Platform.current())
    return nnx.split(layer)


def layer_inputs(B, T, D, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (B, T, D))
    mask = jnp.arange(T)[None, :] < jnp.asarray([T - (i % 3) * 5 for i in range(B)])[:, None]  # some padding
    cotangent = jax.random.normal(jax.random.PRNGKey(seed + 1), (B, T, D))
    return x, mask, cotangent


def layer_loss(graphdef):
    """<y, cotangent> + the load-balancing loss, and the statistics."""
    def loss(state, x, mask, cotangent):
        y, aux = nnx.merge(graphdef, state)(x, Context(rope=None, segment_ids=None, token_mask=mask))
        return jnp.sum(y * cotangent) + aux.load_balancing, aux
    return loss


def sharded_layer_args(state, x, mask, cotangent, mesh):
    state = jax.device_put(state, shd.state_shardings(state, mesh))
    return (state, *put((x, mask, cotangent), mesh, (("batch", "seq", None), ("batch", "seq"), ("batch", "seq", None))))


LAYER_MESHES = [dict(expert=2), dict(expert=4), dict(expert=8), dict(data=2, expert=4), dict(fsdp=2, expert=4),
                dict(data=2, fsdp=2, expert=2), dict(data=2, expert=2, tensor=2)]


@pytest.fixture(scope="module")
def layer_case():
    """A layer, inputs of 8 rows x 16 tokens, and its loss, statistics and gradients on one device."""
    graphdef, state = make_layer()
    args = (state, *layer_inputs(8, 16, MOE["hidden_size"]))
    step = jax.value_and_grad(layer_loss(graphdef), argnums=(0, 1), has_aux=True)
    return step, args, jax.jit(step)(*args)


@pytest.mark.parametrize("axes", LAYER_MESHES, ids=ids)
def test_layer_matches_one_device(layer_case, axes):
    step, args, ((want, want_aux), want_grads) = layer_case
    mesh = mesh_of(**axes)
    (got, aux), grads = run(step, mesh, *sharded_layer_args(*args, mesh))
    assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))
    np.testing.assert_allclose(aux.load_balancing, want_aux.load_balancing, rtol=1e-6)
    np.testing.assert_allclose(aux.load_max_over_mean, want_aux.load_max_over_mean, rtol=1e-6)
    assert float(aux.dropped) == 0
    assert_close_tree(grads, want_grads, 2e-4)


COLLECTIVE = re.compile(r"= (\(.*?\)|\S+) (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
                        r"(?:-start)?\(.*replica_groups=(\S+)(?: \{([^}]*)\})?")


def collectives(hlo: str, devices: int):
    """[(kind, [result shapes], devices per group)] of every collective in compiled HLO text."""
    out = []
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if not m:
            continue
        shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", m.group(1))]
        groups, named = m.group(3), m.group(4)
        if groups.startswith("mesh["):  # mesh['data'=1,'fsdp'=2,...] {'fsdp','expert'}
            sizes = dict((k, int(v)) for k, v in re.findall(r"'(\w+)'=(\d+)", groups))
            size = math.prod(sizes[a] for a in re.findall(r"'(\w+)'", named or ""))
        elif groups.startswith("["):  # [groups,size]<=[...]
            size = int(re.match(r"\[(\d+),(\d+)\]", groups).group(2))
        elif groups.startswith("{{"):
            size = len(groups[2:].split("}")[0].split(","))
        else:  # {}: one group of every device
            size = devices
        out.append((m.group(2), shapes, size))
    return out


@pytest.mark.parametrize("axes", [dict(expert=8), dict(data=2, expert=4), dict(fsdp=2, expert=4)], ids=ids)
def test_compiled_step_exchanges_rows_and_gathers_no_tokens_or_expert_weights(axes):
    graphdef, state = make_layer()
    B, T, D, E = 8, 128, MOE["hidden_size"], MOE["num_experts"]
    mesh = mesh_of(**axes)
    step = jax.value_and_grad(layer_loss(graphdef), argnums=(0, 1), has_aux=True)
    hlo = compiled(step, mesh, *sharded_layer_args(state, *layer_inputs(B, T, D), mesh)).as_text()
    found = collectives(hlo, mesh.size)
    tokens_per_device = B * T // mesh.size
    token_buffer = tokens_per_device * D
    weights = [math.prod(v.shape) for v in jax.tree.leaves(state)]
    assert max(weights) < token_buffer  # so that size tells a token buffer from a weight
    n_ep, L, k = axes["expert"], E // axes["expert"], MOE["num_experts_per_tok"]
    capacity = tokens_per_device * min(k, L)
    # The rows go out and come back, forward and backward: all-to-alls of [capacity, D] blocks, one per device.
    row_exchanges = [s for kind, shapes, n in found if kind == "all-to-all" and n == n_ep
                     for s in shapes if math.prod(s) == capacity * D]
    assert len(row_exchanges) >= 4 * n_ep, found
    for kind, shapes, n in found:
        if kind == "all-to-all" or n == 1:  # a group of one device moves nothing
            continue
        for shape in shapes:
            assert math.prod(shape) < token_buffer, f"{kind} of a token buffer {shape} over {n} devices"
            assert shape[:1] != (E,) or len(shape) < 3, f"{kind} of whole expert weights {shape}"


def test_expert_weight_bytes_fall_as_one_over_ep_and_temporaries_do_not_grow_with_the_batch():
    graphdef, state = make_layer()
    D = MOE["hidden_size"]
    tokens_per_device = 64
    experts = nnx.state(nnx.merge(graphdef, state).experts)
    expert_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(experts))
    step = jax.value_and_grad(layer_loss(graphdef), argnums=(0, 1), has_aux=True)

    def memory(**axes):
        mesh = mesh_of(**axes)
        args = sharded_layer_args(state, *layer_inputs(mesh.size, tokens_per_device, D), mesh)
        return compiled(step, mesh, *args).memory_analysis()

    # The whole batch axis on the devices (data x expert = 8), the expert weights split over expert only.
    others = {n: memory(data=8 // n, expert=n).argument_size_in_bytes - expert_bytes // n for n in (2, 4, 8)}
    assert len(set(others.values())) == 1, others  # the rest (tokens per device, router, shared expert) is fixed
    temps = [memory(data=d, expert=2).temp_size_in_bytes for d in (1, 2, 4)]  # 2, 4, 8 devices; global batch x4
    assert temps[1] == temps[0] and temps[2] == temps[0], temps


# --------------------------------------------------------------------------------------------------- exchanges

def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name, axis_index_groups=None):
    """jax.lax.ragged_all_to_all as its documentation defines it, built from all_gathers (XLA:CPU does not
    implement the op): source i's rows operand_i[input_offsets_i[j] : + send_sizes_i[j]] land in device j's output
    at output_offsets_i[j]; recv_sizes_j[i] says how many arrive from i (a mismatch turns the output into NaN)."""
    assert axis_index_groups is None
    me = jax.lax.axis_index(axis_name)
    gathered = lambda v: jax.lax.all_gather(v, axis_name)
    operands = gathered(operand)
    starts, sizes, lands = (gathered(v)[:, me] for v in (input_offsets, send_sizes, output_offsets))
    r = jnp.arange(output.shape[0])
    for i in range(operands.shape[0]):
        inside = (r >= lands[i]) & (r < lands[i] + recv_sizes[i])
        rows = operands[i][jnp.clip(starts[i] + r - lands[i], 0, operand.shape[0] - 1)]
        output = jnp.where(inside[:, None], rows, output)
    return jnp.where(jnp.all(sizes == recv_sizes), output, jnp.nan)


@pytest.fixture
def ragged_on_cpu(monkeypatch):
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)


@pytest.mark.parametrize("impl", ["padded", "ragged"])
def test_exchange_contract(impl, ragged_on_cpu):
    """received: source i's first min(size, C) rows for this device in slot block i, zeros after; back(): each
    sent row gets its slot's row, unsent rows zeros, and nothing from empty slots (filled with 1e6 here)."""
    n, R, D, C = 4, 12, 3, 3
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, R, D)).astype(np.float32)
    sizes = np.array([[0, 5, 2, 3], [3, 3, 3, 3], [1, 0, 0, 0], [4, 0, 4, 0]], np.int32)  # [source, destination]
    exchange = FAMILIES["exchange"].function(impl)
    mesh = mesh_of(expert=n)

    def per_device(rows, sizes):
        received, back = exchange(rows[0], sizes[0], capacity=C, axis_name="expert", axis_size=n)
        filled = jnp.arange(n * C) % C < jnp.minimum(jax.lax.all_to_all(sizes[0], "expert", 0, 0, tiled=True), C
                                                     ).repeat(C)
        home = back(jnp.where(filled[:, None], 3 * received, 1e6))
        return received[None], home[None]

    received, home = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"),
                                           check_vma=False))(jnp.asarray(rows), jnp.asarray(sizes))
    starts = np.cumsum(sizes, 1) - sizes
    for j in range(n):
        for i in range(n):
            m = min(sizes[i, j], C)
            want = np.zeros((C, D), np.float32)
            want[:m] = rows[i, starts[i, j]:starts[i, j] + m]
            np.testing.assert_array_equal(received[j, i * C:(i + 1) * C], want)
    for i in range(n):
        want = np.zeros((R, D), np.float32)
        for j in range(n):
            m = min(sizes[i, j], C)
            want[starts[i, j]:starts[i, j] + m] = 3 * rows[i, starts[i, j]:starts[i, j] + m]
        np.testing.assert_allclose(home[i], want, rtol=1e-6)


def test_ragged_exchange_layer_matches_one_device(layer_case, ragged_on_cpu):
    """The ragged exchange's offsets, forward and backward, through the emulated op."""
    step, (state, *inputs), ((want, _), want_grads) = layer_case
    graphdef = nnx.split(nnx.merge(*make_layer(Execution(exchange="ragged"))))[0]
    step = jax.value_and_grad(layer_loss(graphdef), argnums=(0, 1), has_aux=True)
    mesh = mesh_of(data=2, expert=4)
    (got, _), grads = run(step, mesh, *sharded_layer_args(state, *inputs, mesh))
    assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))
    assert_close_tree(grads, want_grads, 2e-4)


# ---------------------------------------------------------------------------------------------------- capacity

def kept_assignments(top_idx, shards, n_ep, local_experts, capacity):
    """[N, k] bool: the assignments that the capacity rule keeps. Shard s holds tokens [s*T, (s+1)*T); its
    assignments, sorted by expert (stably: token, then slot), go to device expert // L of its expert group, and each
    destination keeps the first `capacity`."""
    N, k = top_idx.shape
    T = N // shards
    keep = np.zeros(N * k, bool)
    for s in range(shards):
        flat = top_idx[s * T:(s + 1) * T].reshape(-1)
        order = np.argsort(flat, kind="stable")
        for j in range(n_ep):
            to_j = order[flat[order] // local_experts == j]
            keep[s * T * k + to_j[:capacity]] = True
    return keep.reshape(N, k)


def dense_with_drops(layer, x2, keep):
    """Every expert on every token, weighted by the (renormalised) top-k weights of the kept assignments only."""
    probs, top_w, top_idx = layer.route(x2, layer.gate)
    gate, up, down = layer.experts.weights()
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x2, gate)) * jnp.einsum("nd,edf->enf", x2, up)
    every = jnp.einsum("enf,efd->end", h, down)
    weights = jnp.sum(jax.nn.one_hot(top_idx, gate.shape[0]) * (top_w * keep)[..., None], axis=1)   # [N, E]
    shared = layer.shared_expert(x2)[0] * jax.nn.sigmoid(layer.shared_expert_gate(x2))
    return jnp.einsum("end,ne->nd", every, weights) + shared


@pytest.mark.parametrize("impl", ["padded", "ragged"])
def test_capacity_drops_by_its_rule_and_counts_the_drops(impl, ragged_on_cpu):
    factor, axes = 1.0, dict(data=2, expert=4)
    graphdef, state = make_layer(Execution(exchange=impl, moe_capacity_factor=factor))
    B, T, D = 8, 16, MOE["hidden_size"]
    x, mask, ct = layer_inputs(B, T, D, seed=3)
    mask = jnp.ones_like(mask)  # the count covers every routed token; keep them all real here
    mesh = mesh_of(**axes)
    layer = nnx.merge(graphdef, state)
    top_idx = np.asarray(layer.route(x.reshape(B * T, D), layer.gate)[2])
    n_ep, k, E = axes["expert"], MOE["num_experts_per_tok"], MOE["num_experts"]
    capacity = math.ceil(factor * (B * T // mesh.size) * k / n_ep)
    keep = kept_assignments(top_idx, mesh.size, n_ep, E // n_ep, capacity)
    assert 0 < (~keep).sum() < keep.size / 4  # the rule bites, but not everywhere

    def ours(state, x):
        y, aux = nnx.merge(graphdef, state)(x, Context(rope=None, segment_ids=None, token_mask=mask))
        return jnp.sum(y * ct), aux.dropped

    def oracle(state, x):
        return jnp.sum(dense_with_drops(nnx.merge(graphdef, state), x.reshape(B * T, D), keep) * ct.reshape(-1, D))

    (got, dropped), grads = run(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True), mesh,
                                *sharded_layer_args(state, x, mask, ct, mesh)[:2])
    want, want_grads = jax.jit(jax.value_and_grad(oracle, argnums=(0, 1)))(state, x)
    assert float(dropped) == (~keep).sum()
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    assert_close_tree(grads, want_grads, 2e-4)


def test_capacity_above_the_worst_case_is_dropless(layer_case):
    step, (state, *inputs), ((want, _), _) = layer_case
    graphdef = make_layer(Execution(moe_capacity_factor=100.0))[0]
    step = jax.value_and_grad(layer_loss(graphdef), argnums=(0, 1), has_aux=True)
    mesh = mesh_of(expert=8)
    (got, aux), _ = run(step, mesh, *sharded_layer_args(state, *inputs, mesh))
    assert float(aux.dropped) == 0 and abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))


# ------------------------------------------------------------------------------------------------------ errors

def test_bad_layouts_are_named():
    graphdef, state = make_layer(num_experts=6)
    with pytest.raises(ValueError, match=r"num_experts \(6\) divisible by 4"):
        mesh = mesh_of(expert=4)
        run(layer_loss(graphdef), mesh, *sharded_layer_args(state, *layer_inputs(4, 8, 16), mesh))
    graphdef, state = make_layer()
    with pytest.raises(ValueError, match="tokens .* multiple of 8"):
        run(layer_loss(graphdef), mesh_of(data=2, expert=4), state, *layer_inputs(1, 9, 16))
    with pytest.raises(ValueError, match="moe_capacity_factor must be >= 0"):
        Execution(moe_capacity_factor=-1.0)


# ------------------------------------------------------------------------------------- the expert-MLP contract

@pytest.mark.parametrize("impl", [i.name for i in FAMILIES["moe"].impls])
def test_rows_past_the_groups_reach_nothing(impl):
    """moe/reference.py: with finite garbage in the rows past sum(group_sizes) and zero cotangents there, the real
    rows' outputs and gradients and the weight gradients are those of the real rows alone."""
    rng = np.random.default_rng(5)
    sizes, pad, D, F = [4, 0, 9, 3], 7, 8, 6
    E, M = len(sizes), sum(sizes)
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    garbage = jnp.asarray(1e3 * rng.standard_normal((pad, D)), jnp.float32)
    ws = [jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    gs = jnp.asarray(sizes, jnp.int32)
    ct = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    expert_mlp = FAMILIES["moe"].function(impl)
    if impl == "pallas_gpu" and jax.default_backend() != "gpu":  # its algebra, with XLA's grouped matmuls
        from qwen3next_kernels.moe import pallas_gpu
        expert_mlp = lambda *a: pallas_gpu.expert_mlp(*a, ops=pallas_gpu.xla_ops)
    want, want_vjp = jax.vjp(lambda x, *w: expert_mlp(x, *w, gs), x, *ws)
    got, got_vjp = jax.vjp(lambda x, *w: expert_mlp(jnp.concatenate([x, garbage]), *w, gs)[:M], x, *ws)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_vjp(ct), want_vjp(ct)):  # the slice gives the garbage rows zero cotangents
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- TPU, ahead of time

@pytest.mark.parametrize("topology, expert", [("v5p:2x2x2", 8), ("v6e:2x2", 4)])
def test_ragged_exchange_compiles_for_tpu(topology, expert):
    """A narrow 80B-A3B MoE layer (the full width: benchmarks/moe_ep_aot.py, docs/moe.md) on 8 v5p / 4 v6e chips,
    experts over all of them: "auto" takes the ragged exchange and ragged_dot (TPU's grouped matmul) there, and the
    step moves rows by ragged-all-to-all, out and back, forward and backward, gathering nothing."""
    pytest.importorskip("libtpu")
    from benchmarks.moe_ep_aot import collective_counts, compile_moe_layer

    compiled, kernels = compile_moe_layer(topology, expert=expert, tokens_per_chip=256, hidden_size=256,
                                          num_experts=64, num_experts_per_tok=4, moe_intermediate_size=128,
                                          shared_expert_intermediate_size=128)
    assert kernels == {"exchange": "ragged", "moe": "ragged_dot"}
    counts = collective_counts(compiled.as_text())
    assert counts.get("ragged-all-to-all") == 4 and "all-gather" not in counts, counts
