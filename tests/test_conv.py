"""The Gated DeltaNet input conv (qwen3next_kernels.conv): the plain-JAX form against a per-channel loop written from
the definition, and the Mosaic GPU kernels, forward and gradients, against the plain-JAX form: in the GPU
interpreter on CPU (logic) and on an H100 (marked gpu)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3next_kernels.conv import reference_split_conv, split_conv
from qwen3next_kernels.conv.reference import split
from qwen3next_kernels.registry import Platform

HOPPER = Platform("gpu", "NVIDIA H100 80GB HBM3")

W = 4


def make(B, T, nk, dk, nv, dv, *, seed=0, docs=True, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 3)
    r = nv // nk
    qkvz = jax.random.normal(ks[0], (B, T, nk, 2 * dk + 2 * r * dv)).astype(dtype)
    kernel = (0.5 * jax.random.normal(ks[1], (W, 2 * nk * dk + nv * dv))).astype(dtype)
    seg = None
    if docs:  # documents of random lengths, some shorter than the window, and an id that recurs
        seg = jnp.cumsum(jax.random.uniform(ks[2], (B, T)) < 0.08, axis=1) % 3
    return qkvz, kernel, seg, dict(key_heads=nk, key_dim=dk, value_heads=nv, value_dim=dv)


def loop_conv(qkvz, kernel, seg, dims):
    """out[b, t, c] = SiLU(sum_j kernel[j, c] x[b, t - (W-1-j), c]) over taps inside t's document (a maximal run of
    equal ids), by loops in numpy."""
    q, k, v, z = split(np.asarray(qkvz, np.float64), **dims)
    B, T = qkvz.shape[:2]
    x = np.concatenate([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], -1)
    kern = np.asarray(kernel, np.float64)
    seg = np.zeros((B, T), int) if seg is None else np.asarray(seg)
    out = np.zeros_like(x)
    for b in range(B):
        start = 0
        for t in range(T):
            if t and seg[b, t] != seg[b, t - 1]:
                start = t
            for j in range(W):
                s = t - (W - 1 - j)
                if s >= start:
                    out[b, t] += kern[j] * x[b, s]
    y = out / (1 + np.exp(-out))
    n = dims["key_heads"] * dims["key_dim"]
    return y[..., :n].reshape(q.shape), y[..., n:2 * n].reshape(k.shape), y[..., 2 * n:].reshape(v.shape), z


@pytest.mark.parametrize("docs", [False, True])
def test_reference_matches_the_definition(docs):
    qkvz, kernel, seg, dims = make(2, 37, 2, 8, 4, 8, docs=docs, dtype=jnp.float32)
    got = reference_split_conv(qkvz, kernel, seg, **dims)
    for g, want in zip(got, loop_conv(qkvz, kernel, seg, dims)):
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-6)


def test_bad_shapes_name_what_is_wrong():
    qkvz, kernel, seg, dims = make(1, 8, 2, 8, 4, 8)
    with pytest.raises(ValueError, match=r"conv kernel must be \[W, 64\]"):
        split_conv(qkvz, kernel[:, :-1], seg, **dims)
    with pytest.raises(ValueError, match=r"qkvz must be \[B, T, 2, 48\]"):
        split_conv(qkvz[..., :-1], kernel, seg, **dims)
    with pytest.raises(ValueError, match="segment_ids must be"):
        split_conv(qkvz, kernel, seg[:, :-1], **dims)
    with pytest.raises(ValueError, match="unknown conv implementation 'triton'"):
        split_conv(qkvz, kernel, seg, impl="triton", **dims)


def check_kernel(B, T, nk, dk, nv, dv, docs, seed=0, tol=1e-2):
    """The kernels in bf16 against the plain-JAX form in fp32 on the same bf16 inputs: outputs, d qkvz, d kernel."""
    from qwen3next_kernels.conv import dispatch, pallas_gpu
    qkvz, kernel, seg, dims = make(B, T, nk, dk, nv, dv, seed=seed, docs=docs)
    assert pallas_gpu.supports(HOPPER, dispatch.site(qkvz, kernel, **dims))
    outs, vjp = jax.vjp(lambda x, w: pallas_gpu.split_conv(x, w, seg, **dims), qkvz, kernel)
    refs, rvjp = jax.vjp(lambda x, w: reference_split_conv(x, w, seg, **dims), qkvz.astype(jnp.float32),
                         kernel.astype(jnp.float32))
    cts = tuple(jax.random.normal(jax.random.key(seed + 10 + i), o.shape).astype(o.dtype) for i, o in enumerate(outs))
    grads = vjp(cts)
    want = rvjp(tuple(c.astype(jnp.float32) for c in cts))
    for name, g, w in zip(["q", "k", "v", "z", "d qkvz", "d kernel"], (*outs, *grads), (*refs, *want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape, name
        err = np.max(np.abs(g - w)) / np.max(np.abs(w))
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_kernels_in_the_gpu_interpreter_on_cpu(monkeypatch):
    """T not a multiple of the 64-token tile, packed documents with short ones, GVA 2, blocks of 64 channels."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from qwen3next_kernels import mgpu
    monkeypatch.setattr(mgpu, "INTERPRET", plgpu.InterpretGPUParams())
    check_kernel(1, 100, 2, 64, 4, 64, docs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,nk,dk,nv,dv,docs", [
    (2, 300, 2, 128, 4, 128, True), (1, 4096, 16, 128, 32, 128, True), (2, 256, 2, 128, 4, 128, False),
    (1, 37, 1, 128, 1, 128, True), (1, 200, 2, 64, 6, 128, True), (1, 130, 2, 256, 2, 256, False)])
def test_kernels_on_the_gpu(B, T, nk, dk, nv, dv, docs):
    """Qwen3-Next's heads at 4096 tokens; GVA 1, 2, 3; T shorter than a tile and not a multiple of it; head dims
    64 (blocks of 64 channels), 128 and 256; with and without documents."""
    check_kernel(B, T, nk, dk, nv, dv, docs)


@pytest.mark.gpu
def test_auto_picks_the_kernel_on_hopper():
    from qwen3next_kernels.conv import dispatch, pallas_gpu
    qkvz, kernel, seg, dims = make(1, 64, 2, 128, 4, 128)
    assert pallas_gpu.supports(Platform.current(), dispatch.site(qkvz, kernel, **dims))
    a = split_conv(qkvz, kernel, seg, **dims)
    b = pallas_gpu.split_conv(qkvz, kernel, seg, **dims)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
