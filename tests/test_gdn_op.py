"""Gated DeltaNet op: the reference against an explicit numpy loop, the chunked form against the reference
(values, gradients, packed documents, bf16), and the dispatch."""
import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3next_kernels import registry
from qwen3next_kernels.gdn import dispatch, gated_delta_rule

K_DIM = V_DIM = 16


def make_inputs(seed, T, H=2, ratio=1, B=2, decay=0.1, init=False, dtype=jnp.float32):
    """Random inputs; g uniform in [-2 * decay, 0] (mean -decay)."""
    rng = np.random.default_rng(seed)
    HV = H * ratio
    x = dict(q=rng.normal(size=(B, T, H, K_DIM)), k=rng.normal(size=(B, T, H, K_DIM)),
             v=rng.normal(size=(B, T, HV, V_DIM)), g=-rng.uniform(0, 2 * decay, size=(B, T, HV)),
             beta=rng.uniform(0, 1, size=(B, T, HV)))
    x = {n: jnp.asarray(a, dtype) for n, a in x.items()}
    if init:
        x["initial_state"] = jnp.asarray(rng.normal(size=(B, HV, K_DIM, V_DIM)), jnp.float32)
    return x


def segments_from_lengths(lengths, B=2):
    ids = np.concatenate([np.full(n, 7 * i + 3) for i, n in enumerate(lengths)])  # arbitrary distinct ints
    return jnp.asarray(np.tile(ids, (B, 1)), jnp.int32)


# Starts at 1 (so a length-1 first document), 64 (a chunk boundary), 100 and 101 (a length-1 document).
PACKED = (1, 63, 36, 1, 49)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def run(x, impl, chunk_size=64):
    return gated_delta_rule(**x, impl=impl, chunk_size=chunk_size)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def assert_close(got, want, tol):
    for a, b, name in zip(got, want, ("o", "final_state")):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.2e}"


def numpy_loop(q, k, v, g, beta, initial_state, segment_ids, scale=None):
    """The recurrence spelled out per batch, head and token in float64, straight from the definition."""
    q, k, v, g, beta = (np.asarray(a, np.float64) for a in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    scale = K**-0.5 if scale is None else scale
    o = np.zeros((B, T, HV, V))
    final = np.zeros((B, HV, K, V))
    for b in range(B):
        for h in range(HV):
            S = np.array(initial_state[b, h], np.float64)
            kh = h // (HV // H)
            for t in range(T):
                if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    S = np.zeros((K, V))
                qt = q[b, t, kh] / np.sqrt(np.sum(q[b, t, kh] ** 2) + 1e-6) * scale
                kt = k[b, t, kh] / np.sqrt(np.sum(k[b, t, kh] ** 2) + 1e-6)
                S = np.exp(g[b, t, h]) * S
                S = S + np.outer(kt, beta[b, t, h] * (v[b, t, h] - S.T @ kt))
                o[b, t, h] = S.T @ qt
            final[b, h] = S
    return o, final


def test_reference_matches_numpy_loop():
    x = make_inputs(0, T=12, ratio=3, init=True, decay=0.3)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2, 2, 5, 0, 0], [4] * 12])
    want = numpy_loop(**x, segment_ids=np.asarray(seg))
    got = gated_delta_rule(**x, segment_ids=seg, impl="reference")
    assert_close(got, want, 1e-5)


def test_reference_without_l2norm_and_custom_scale():
    x = make_inputs(1, T=9, ratio=2, init=True)
    # With the inputs pre-normalised, use_qk_l2norm=False must give the same as the loop (which normalises).
    unit = lambda a: a / jnp.sqrt(jnp.sum(a * a, -1, keepdims=True) + 1e-6)
    want = numpy_loop(**x, segment_ids=np.zeros((2, 9)), scale=0.7)
    got = gated_delta_rule(**{**x, "q": unit(x["q"]), "k": unit(x["k"])}, use_qk_l2norm=False, scale=0.7,
                           impl="reference")
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("T", [1, 63, 65, 150])
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_chunked_matches_reference_lengths_and_gva(T, ratio):
    x = make_inputs(T + ratio, T=T, ratio=ratio, init=True)
    assert_close(run(x, "chunked"), run(x, "reference"), 1e-5)


@pytest.mark.parametrize("decay", [5.0, 0.01])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_matches_reference_decay_state_packing(decay, init, packed):
    x = make_inputs(3, T=sum(PACKED), ratio=2, decay=decay, init=init)
    if packed:
        x["segment_ids"] = segments_from_lengths(PACKED)
    assert_close(run(x, "chunked"), run(x, "reference"), 1e-5)


def test_chunked_other_chunk_size():
    x = make_inputs(4, T=sum(PACKED), ratio=2, init=True)
    x["segment_ids"] = segments_from_lengths(PACKED)
    assert_close(run(x, "chunked", chunk_size=16), run(x, "reference"), 1e-5)


def test_constant_segment_ids_change_nothing():
    x = make_inputs(5, T=70, init=True)
    plain = run(x, "chunked")
    assert_close(run({**x, "segment_ids": jnp.full((2, 70), 9)}, "chunked"), plain, 1e-7)


@pytest.mark.parametrize("T,lengths,decay", [(65, None, 0.5), (sum(PACKED), PACKED, 0.5), (sum(PACKED), PACKED, 5.0)])
def test_chunked_gradients_match_reference(T, lengths, decay):
    x = make_inputs(6, T=T, ratio=2, init=True, decay=decay)
    segment_ids = None if lengths is None else segments_from_lengths(lengths)
    rng = np.random.default_rng(7)
    o_shape, s_shape = x["v"].shape, x["initial_state"].shape
    cotangent = (jnp.asarray(rng.normal(size=o_shape), jnp.float32),
                 jnp.asarray(rng.normal(size=s_shape), jnp.float32))

    @functools.partial(jax.jit, static_argnames="impl")
    def grads(x, impl):
        f = lambda x: gated_delta_rule(**x, segment_ids=segment_ids, impl=impl)
        return jax.vjp(f, x)[1](cotangent)[0]

    got, want = grads(x, "chunked"), grads(x, "reference")
    for name in x:
        assert np.all(np.isfinite(got[name])), name
        assert rel_err(got[name], want[name]) < 2e-5, f"d{name}: relative error {rel_err(got[name], want[name]):.2e}"


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_packed_equals_documents_run_separately(impl):
    x = make_inputs(8, T=sum(PACKED), ratio=2, init=True)
    packed_o, packed_state = run({**x, "segment_ids": segments_from_lengths(PACKED)}, impl)
    bounds = np.cumsum((0,) + PACKED)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        doc = {n: x[n][:, a:b] for n in ("q", "k", "v", "g", "beta")}
        if i == 0:
            doc["initial_state"] = x["initial_state"]
        o, state = run(doc, impl)
        assert rel_err(packed_o[:, a:b], o) < 1e-5, f"document {i}"
    assert rel_err(packed_state, state) < 1e-5


def test_bf16_inputs():
    x = make_inputs(9, T=sum(PACKED), ratio=2, dtype=jnp.bfloat16)
    x["initial_state"] = make_inputs(9, T=1, ratio=2, init=True)["initial_state"]
    x["segment_ids"] = segments_from_lengths(PACKED)
    o, state = run(x, "chunked")
    assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    want = run({n: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for n, a in x.items()}, "reference")
    assert_close((o, state), want, 1e-2)


def test_auto_is_chunked_on_cpu():
    x = make_inputs(10, T=70, ratio=2, init=True)
    got, want = run(x, "auto"), run(x, "chunked")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_auto_takes_a_registered_kernel_only_where_it_supports_the_call(monkeypatch):
    calls = []
    fake = types.ModuleType("fake_gdn_kernel")
    fake.supports = lambda platform, site: site["dtype"] == "float32"
    fake.gated_delta_rule = lambda *args, **kw: calls.append(kw) or ("kernel", None)
    monkeypatch.setitem(sys.modules, "fake_gdn_kernel", fake)
    family = registry.Family("gdn", (registry.Impl("fake", "fake_gdn_kernel:gated_delta_rule"),
                                     registry.Impl("missing", "no_such_module_xyz:gated_delta_rule", auto=False),
                                     *registry.FAMILIES["gdn"].impls[-1:]))
    monkeypatch.setitem(registry.FAMILIES, "gdn", family)
    x = make_inputs(11, T=5)
    assert gated_delta_rule(**x)[0] == "kernel"
    assert calls[0]["chunk_size"] == 64
    o, _ = gated_delta_rule(**make_inputs(11, T=5, dtype=jnp.bfloat16))
    assert o.shape == x["v"].shape and len(calls) == 1
    with pytest.raises(ImportError):
        gated_delta_rule(**x, impl="missing")


def test_resolution_is_a_function_of_platform_and_site():
    """What auto becomes for the model's sites on every backend, decided on this (CPU) host."""
    site = dispatch.site(*(jnp.zeros((1, 8, 16, 128), jnp.bfloat16),) * 2, jnp.zeros((1, 8, 32, 128), jnp.bfloat16))
    gdn = registry.FAMILIES["gdn"]
    assert gdn.resolve("auto", site, registry.Platform("gpu", "NVIDIA H200")) == "pallas_gpu"
    assert gdn.resolve("auto", site, registry.Platform("gpu", "NVIDIA A100-SXM4-80GB")) == "chunked"
    assert gdn.resolve("auto", site, registry.Platform("tpu", "TPU v5p")) == "pallas_tpu"
    assert gdn.resolve("auto", site, registry.Platform("cpu", "cpu")) == "chunked"
    assert gdn.resolve("auto", dict(site, key_dim=96), registry.Platform("gpu", "NVIDIA H200")) == "chunked"
    assert gdn.resolve("auto", dict(site, dtype="float32"), registry.Platform("gpu", "NVIDIA H200")) == "chunked"
    assert gdn.resolve("reference", site, registry.Platform("gpu", "NVIDIA H200")) == "reference"


@pytest.mark.parametrize("change,match", [
    (dict(impl="fast"), "unknown gdn implementation 'fast'.*chunked"),
    (dict(v=jnp.zeros((2, 5, 3, V_DIM))), "multiple of key heads"),
    (dict(g=jnp.zeros((2, 5, 3))), r"g must be \[B, T, HV\]"),
    (dict(beta=jnp.zeros((2, 4, 2))), r"beta must be \[B, T, HV\]"),
    (dict(initial_state=jnp.zeros((2, 2, K_DIM, 3))), "initial_state must be"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), "segment_ids must be"),
    (dict(segment_ids=jnp.zeros((2, 5))), "must be integers"),
    (dict(k=jnp.zeros((2, 5, 2, 8))), "q and k must both be"),
])
def test_errors(change, match):
    with pytest.raises(ValueError, match=match):
        gated_delta_rule(**{**make_inputs(12, T=5), **change})
