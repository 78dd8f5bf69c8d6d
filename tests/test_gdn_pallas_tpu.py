"""Mosaic TPU Pallas Gated DeltaNet kernel (kernels_pallas/gdn/pallas_tpu.py).

On CPU the kernels run in the Pallas interpreter and are checked against the token-by-token reference: outputs,
final state and all gradients, over lengths that are not multiples of the chunk, GVA ratios 1-3, packed documents,
strong and weak decay, fp32 and bf16. With libtpu installed, the same kernels are also lowered through Mosaic and
compiled ahead of time for real TPU chips at Qwen3-Next shapes, which catches what the interpreter lets through.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3next_kernels.gdn import gated_delta_rule, pallas_tpu


def make_inputs(seed, T, H=1, ratio=1, K=64, V=64, decay=0.1, init=False, dtype=jnp.float32):
    """Random inputs (B = 1); g uniform in [-2 * decay, 0]."""
    rng = np.random.default_rng(seed)
    HV = H * ratio
    x = dict(q=rng.normal(size=(1, T, H, K)), k=rng.normal(size=(1, T, H, K)), v=rng.normal(size=(1, T, HV, V)),
             g=-rng.uniform(0, 2 * decay, size=(1, T, HV)), beta=rng.uniform(0, 1, size=(1, T, HV)))
    x = {n: jnp.asarray(a, dtype) for n, a in x.items()}
    if init:
        x["initial_state"] = jnp.asarray(rng.normal(size=(1, HV, K, V)), jnp.float32)
    return x


def segments_from_lengths(lengths):
    return jnp.asarray(np.concatenate([np.full(n, 5 * i + 2) for i, n in enumerate(lengths)])[None], jnp.int32)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@functools.partial(jax.jit, static_argnames=("impl", "options"))
def forward_and_grads(x, segment_ids, cotangent, impl, options=()):
    """(o, final_state) and the gradients of <(o, final_state), cotangent> w.r.t. every float input."""
    f = lambda x: gated_delta_rule(**x, segment_ids=segment_ids, impl=impl, **dict(options))
    out, vjp = jax.vjp(f, x)
    return out, vjp(cotangent)[0]


def check_against_reference(x, segment_ids=None, tol=1e-5, grad_tol=1e-5, options=()):
    """Relative errors (max abs error over max abs value) of o and final_state below tol, of the gradients below
    grad_tol. In fp32 the kernel is at ~2e-7 of a float64 recurrence, strong decay included (as is the fp32
    token-by-token reference)."""
    rng = np.random.default_rng(99)
    o_shape = x["v"].shape
    s_shape = (1, o_shape[2], x["q"].shape[3], o_shape[3])
    cotangent = (jnp.asarray(rng.normal(size=o_shape), x["v"].dtype), jnp.asarray(rng.normal(size=s_shape)))
    (o, state), grads = forward_and_grads(x, segment_ids, cotangent, "pallas_tpu", options)
    # The reference gets the same (possibly bf16-rounded) inputs in fp32, so only the kernel's arithmetic differs.
    x32 = {n: a.astype(jnp.float32) for n, a in x.items()}
    cotangent32 = tuple(c.astype(jnp.float32) for c in cotangent)
    (o_ref, state_ref), grads_ref = forward_and_grads(x32, segment_ids, cotangent32, "reference", options)
    assert o.dtype == x["v"].dtype and o.shape == o_ref.shape and state.dtype == jnp.float32
    errors = {"o": rel_err(o, o_ref), "final_state": rel_err(state, state_ref)}
    for name in x:
        assert grads[name].dtype == x[name].dtype and grads[name].shape == x[name].shape, name
        errors["d" + name] = rel_err(grads[name], grads_ref[name])
    bad = {n: f"{e:.1e}" for n, e in errors.items() if not e < (grad_tol if n.startswith("d") else tol)}
    assert not bad, f"relative errors above {tol} (values) / {grad_tol} (gradients): {bad}"


# Document starts at 1 (a length-1 first document), 64 (a chunk boundary), 100 and 101 (a length-1 document).
PACKED = (1, 63, 36, 1, 49)


@pytest.mark.parametrize("T,ratio,decay,init", [
    (128, 1, 2.0, False),  # whole chunks, strong decay (exp(g) down to e^-4), no initial state
    (100, 2, 0.01, True),  # odd length, weak decay, GVA 2
    (70, 3, 0.3, True),  # GVA 3, one full chunk and a 6-token tail
])
def test_matches_reference(T, ratio, decay, init):
    check_against_reference(make_inputs(T, T, ratio=ratio, decay=decay, init=init))


@pytest.mark.parametrize("decay", [5.0, 0.01])  # g down to -10 per token / nearly no decay
def test_packed_documents(decay):
    x = make_inputs(7, sum(PACKED), ratio=2, decay=decay, init=True)
    check_against_reference(x, segments_from_lengths(PACKED))


@pytest.mark.parametrize("T,ratio,K,V", [(80, 2, 128, 128), (40, 1, 128, 64), (30, 1, 256, 256)])
def test_head_dims(T, ratio, K, V):
    """D = 128, 256 take the free [B, T, heads * D] view instead of the head-major transpose (D = 64); K != V."""
    check_against_reference(make_inputs(T, T, ratio=ratio, K=K, V=V, init=True))


@pytest.mark.parametrize("chunk_size", [32, 128])
def test_other_chunk_sizes(chunk_size):
    x = make_inputs(8, sum(PACKED), ratio=2, decay=0.3, init=True)
    check_against_reference(x, segments_from_lengths(PACKED), options=(("chunk_size", chunk_size),))


def test_without_l2norm_and_custom_scale():
    x = make_inputs(5, 90, ratio=2, init=True)
    # Unnormalised keys of norm ~8 would make the recurrence blow up: feed (nearly) unit vectors instead.
    x["q"], x["k"] = (a / jnp.linalg.norm(a, axis=-1, keepdims=True) for a in (x["q"], x["k"]))
    check_against_reference(x, options=(("use_qk_l2norm", False), ("scale", 0.3)))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 4e-2)])
def test_correlated_keys_and_weak_decay(dtype, tol):
    """Keys sharing a direction, betas near 1, almost no decay: (I + A)^-1 is far from I. A series of powers of A
    lost fp32 accuracy here (1e-4); the block-merge inverse keeps it. bf16 is bounded by its intermediates."""
    x = make_inputs(11, 100, ratio=2, decay=0.005, init=True)
    rng = np.random.default_rng(12)
    x["k"] = 0.9 * jnp.asarray(rng.normal(size=(1, 1, 1, 64)), jnp.float32) + 0.1 * x["k"]
    x["beta"] = 0.9 + 0.1 * x["beta"]
    x = {n: a.astype(dtype) if n != "initial_state" else a for n, a in x.items()}
    check_against_reference(x, segments_from_lengths((30, 70)), tol=tol, grad_tol=tol)


def test_bf16():
    x = make_inputs(6, sum(PACKED), ratio=2, init=True, dtype=jnp.bfloat16)
    x["initial_state"] = x["initial_state"].astype(jnp.float32)
    check_against_reference(x, segments_from_lengths(PACKED), tol=1e-2, grad_tol=1e-2)


def test_supports():
    from qwen3next_kernels.gdn import dispatch
    from qwen3next_kernels.registry import Platform
    tpu = Platform("tpu", "TPU v5p")
    supports = lambda q, k, v, chunk_size=64, **_: pallas_tpu.supports(tpu, dispatch.site(q, k, v, chunk_size))
    x = make_inputs(0, 8, ratio=2)
    assert supports(**x)
    assert not supports(**x, chunk_size=16)
    with pytest.raises(ValueError, match="power of two"):
        pallas_tpu.gated_delta_rule(**x, chunk_size=48)
    assert not supports(**make_inputs(0, 8, K=32))
    assert not supports(**{**x, "v": x["v"].astype(jnp.bfloat16)})
    assert not pallas_tpu.supports(Platform("cpu"), dispatch.site(x["q"], x["k"], x["v"]))


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for TPU chips (needs libtpu; no TPU). The kernels are lowered inside shard_map over the
# batch (Mosaic kernels cannot be partitioned automatically), with interpret left to its default: the mesh's TPU
# devices, not the CPU host, decide it (registry.interpret_pallas_tpu).

# Several processes on one host (pytest-xdist, a neighbour's tests) would otherwise fight over libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def compile_for_tpu(topology, B_per_chip, T, H, HV, K, V, dtype, chunk_size=64):
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = topologies.get_topology_desc(topology, "tpu").devices
    mesh = Mesh(np.array(devices), ("data",))
    B = B_per_chip * len(devices)

    def loss(q, k, v, g, beta, h0, segment_ids):
        o, state = pallas_tpu.gated_delta_rule(q, k, v, g, beta, initial_state=h0, segment_ids=segment_ids,
                                               chunk_size=chunk_size)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(state**2)

    def step(*args):  # per chip: the loss and the gradients of every float input
        return jax.value_and_grad(loss, argnums=range(6))(*args)

    batch = P("data")
    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(batch,) * 7, out_specs=(P(), (batch,) * 6),
                              check_vma=False))
    arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, batch))
    compiled = f.lower(arg((B, T, H, K), dtype), arg((B, T, H, K), dtype), arg((B, T, HV, V), dtype),
                       arg((B, T, HV), jnp.float32), arg((B, T, HV), dtype), arg((B, HV, K, V), jnp.float32),
                       arg((B, T), jnp.int32)).compile()
    # Forward, the backward's state recompute and the backward: three Mosaic kernels, and no interpreter's loop.
    hlo = compiled.as_text()
    assert hlo.count("tpu_custom_call") == 3 and " while(" not in hlo
    return compiled.memory_analysis()


# The topology names this libtpu (0.0.48.1) accepts; "v5p:1x1x1" and "v6e:1x1" are refused (not divisible by the
# default 2x2x1 chips per host).
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_aot_compiles_for_tpu_at_qwen3_next_shapes(topology):
    memory = compile_for_tpu(topology, B_per_chip=1, T=4096, H=16, HV=32, K=128, V=128, dtype=jnp.bfloat16)
    assert memory.temp_size_in_bytes < 1 << 30


def test_interpret_only_when_not_traced_for_tpu():
    """The Pallas TPU kernels' default: the platform of the mesh a computation is traced for, not the host's."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    from jax.sharding import Mesh, PartitionSpec as P
    from qwen3next_kernels.registry import interpret_pallas_tpu, traced_backend

    seen = []

    def record(x):
        seen.append((traced_backend(), interpret_pallas_tpu()))
        return x

    tpu = Mesh(np.array(topologies.get_topology_desc("v5p:2x2x1", "tpu").devices), ("data",))
    cpu = Mesh(np.array(jax.devices()[:4]), ("data",))
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    jax.jit(record).trace(x)                                              # no mesh: the host's backend
    for mesh in (tpu, cpu):
        with jax.set_mesh(mesh):
            jax.jit(record).trace(x)
        jax.jit(jax.shard_map(record, mesh=mesh, in_specs=P("data"), out_specs=P("data"))).trace(x)
    assert seen == [("cpu", True), ("tpu", False), ("tpu", False), ("cpu", True), ("cpu", True)]


@pytest.mark.parametrize("topology,K,V,dtype,chunk_size", [
    ("v5p:2x2x1", 64, 64, jnp.float32, 64),  # head-major layout, HIGHEST dots
    ("v6e:2x2", 256, 256, jnp.bfloat16, 64),
    ("v6e:2x2", 128, 64, jnp.float32, 32),
    ("v5p:2x2x1", 128, 128, jnp.bfloat16, 128),
])
def test_aot_compiles_for_tpu_other_shapes(topology, K, V, dtype, chunk_size):
    """GVA 2 and a length that is not a multiple of the chunk."""
    compile_for_tpu(topology, B_per_chip=1, T=200, H=2, HV=4, K=K, V=V, dtype=dtype, chunk_size=chunk_size)
