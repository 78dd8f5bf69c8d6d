"""Causal attention within packed documents (the registry's "attention" family): the XLA form against a numpy loop
from the definition, cuDNN's against XLA's on the GPU (its document offsets and branch choice on a CPU too, against
an oracle of cuDNN's packed semantics), and what auto picks on each platform."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3next_kernels.registry import FAMILIES, Platform


def make(B=2, T=40, H=4, KV=2, hd=16, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, hd)).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, KV, hd)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, KV, hd)).astype(dtype)
    seg = jnp.asarray(np.repeat([[1] * 9 + [2] * 1 + [3] * (T - 10)], B, 0), jnp.int32)
    return q, k, v, seg


def loop_attention(q, k, v, seg, scale):
    q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, seg))
    B, T, H, hd = q.shape
    r = H // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
                logits = np.array([q[b, t, h] @ k[b, s, h // r] * scale for s in keys])
                p = np.exp(logits - logits.max())
                out[b, t, h] = (p / p.sum()) @ v[b, keys, h // r]
    return out


def test_xla_matches_the_definition():
    q, k, v, seg = make()
    got = FAMILIES["attention"].function("xla")(q, k, v, seg, scale=0.25)
    np.testing.assert_allclose(got, loop_attention(q, k, v, seg, 0.25), rtol=1e-5, atol=1e-5)


def test_auto_per_platform():
    site = dict(heads=16, kv_heads=2, head_dim=256, dtype="bfloat16")
    att = FAMILIES["attention"]
    assert att.resolve("auto", site, Platform("gpu", "NVIDIA H200")) == "cudnn"
    assert att.resolve("auto", dict(site, dtype="float32"), Platform("gpu", "NVIDIA H200")) == "xla"
    assert att.resolve("auto", site, Platform("cpu")) == "xla"
    assert att.resolve("auto", site, Platform("tpu", "TPU v5p")) == "splash"
    assert att.resolve("auto", dict(site, head_dim=96), Platform("tpu", "TPU v5p")) == "xla"


def random_documents(B, T, seed, mean_length):
    """[B, T] segment ids of packed rows: runs of random length numbered 1, 2, ..., a padding run (0) at some ends."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        t, doc = 0, 1
        end = T - (rng.integers(1, T // 4) if b % 2 else 0)
        while t < end:
            n = int(rng.integers(1, 2 * mean_length))
            seg[b, t:min(t + n, end)] = doc
            t, doc = t + n, doc + 1
    return jnp.asarray(seg)


@pytest.mark.parametrize("max_documents", [4, 16, 64])
def test_cudnn_document_offsets(max_documents):
    """cuDNN's packed form of segment ids: each row's document starts and lengths, -1 past the last, and the count
    that decides whether the packed form can take the batch."""
    from qwen3next_kernels.attention.cudnn import documents
    seg = random_documents(5, 64, seed=max_documents, mean_length=6)
    offsets, lengths, count = (np.asarray(a) for a in documents(seg, max_documents))
    assert offsets.shape == (5, max_documents + 1) and lengths.shape == (5, max_documents)
    for b, row in enumerate(np.asarray(seg)):
        starts = [t for t in range(64) if t == 0 or row[t] != row[t - 1]]
        sizes = np.diff(starts + [64]).tolist()
        assert count[b] == len(starts)
        kept = min(len(starts), max_documents)
        assert offsets[b].tolist() == starts[:kept] + [-1] * (max_documents + 1 - kept)
        assert lengths[b].tolist() == sizes[:kept] + [-1] * (max_documents - kept)


@pytest.mark.parametrize("max_documents", [64, 4])  # every row fits (packed branch); some row does not (dense)
def test_cudnn_form_routes_documents_like_the_reference(monkeypatch, max_documents):
    """The cuDNN form's own logic on a CPU: cuDNN replaced by an oracle of its packed-sequence semantics (each
    (offset, length) slot of a row is a causal sequence of its own) and by XLA for the dense-mask branch, and the
    branch that must not run poisoned with NaN. The output and gradients then equal the reference only if the
    offsets carry exactly the documents of the segment ids and lax.cond takes the branch the count asks for."""
    from qwen3next_kernels.attention import cudnn, reference
    xla_attention = jax.nn.dot_product_attention
    packed_runs = max_documents == 64
    poison = lambda out: jnp.full_like(out, jnp.nan)

    def packed_oracle(q, k, v, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale, mask_type):
        assert mask_type == cudnn.MaskType.PADDING_CAUSAL and q_seqlen is kv_seqlen and q_offsets is kv_offsets
        pos = jnp.arange(q.shape[1])
        start, length = q_offsets[:, :-1, None], q_seqlen[:, :, None]                      # [B, M, 1]
        inside = ((length > 0) & (pos >= start) & (pos < start + length)).astype(jnp.int32)  # [B, M, T]
        same = jnp.einsum("bmi,bmj->bij", inside, inside) > 0
        out = xla_attention(q, k, v, scale=scale, implementation="xla",
                            mask=(same & (pos[:, None] >= pos[None, :]))[:, None])
        return out if packed_runs else poison(out)

    def dense_on_xla(q, k, v, *, implementation, **kw):  # the reference's own calls (xla) pass through
        out = xla_attention(q, k, v, implementation="xla", **kw)
        return poison(out) if implementation == "cudnn" and packed_runs else out

    monkeypatch.setattr(cudnn, "cudnn_attention", packed_oracle)
    monkeypatch.setattr(jax.nn, "dot_product_attention", dense_on_xla)
    q, k, v, _ = make(B=4, T=96, H=4, KV=2, hd=16)
    seg = random_documents(4, 96, seed=3, mean_length=12)
    assert 4 < int(np.max(cudnn.documents(seg, 96)[2])) <= 64
    f = lambda q, k, v: cudnn.packed_attention(q, k, v, seg, scale=0.25, max_documents=max_documents)
    ref = lambda q, k, v: reference.attention(q, k, v, seg, scale=0.25)
    ct = jax.random.normal(jax.random.key(5), q.shape)
    (got, got_vjp), (want, want_vjp) = jax.vjp(f, q, k, v), jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_vjp(ct), want_vjp(ct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("hd", [128, 256])
@pytest.mark.parametrize("max_documents", [64, 4])  # every row fits (packed form); some row does not (dense mask)
def test_cudnn_matches_xla_on_the_gpu(hd, max_documents):
    from qwen3next_kernels.attention.cudnn import documents, packed_attention
    q, k, v, _ = make(B=4, T=300, H=8, KV=1, hd=hd, dtype=jnp.bfloat16)
    seg = random_documents(4, 300, seed=hd, mean_length=40)
    assert (int(np.max(documents(seg, max_documents)[2])) <= max_documents) == (max_documents == 64)
    ct = jax.random.normal(jax.random.key(9), q.shape).astype(jnp.bfloat16)
    run = lambda f: jax.jit(lambda *a: jax.vjp(lambda *b: f(*b, seg, scale=hd ** -0.5), *a))(q, k, v)
    cudnn = functools.partial(packed_attention, max_documents=max_documents)
    for f in (cudnn, FAMILIES["attention"].function("cudnn")):
        (o1, vjp1), (o2, vjp2) = run(f), run(FAMILIES["attention"].function("xla"))
        rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))
                                 / np.max(np.abs(np.asarray(b, np.float32))))
        assert rel(o1, o2) < 2e-2
        for a, b in zip(vjp1(ct), vjp2(ct)):
            assert rel(a, b) < 3e-2


@pytest.mark.parametrize("T, H, KV", [(200, 4, 2), (128, 2, 1)])
def test_splash_matches_xla_in_the_interpreter(T, H, KV):
    """TPU splash attention in the Pallas interpreter, fp32: T not a multiple of its 128-token blocks, GQA, packed
    documents (one of a single token), against the XLA form, values and gradients."""
    q, k, v, seg = make(B=2, T=T, H=H, KV=KV, hd=128)
    seg = jnp.asarray(np.repeat([[1] * 70 + [2] + [3] * (T - 71)], 2, 0), jnp.int32)
    ct = jax.random.normal(jax.random.key(5), q.shape)
    run = lambda impl: jax.vjp(lambda *a: FAMILIES["attention"].function(impl)(*a, seg, scale=0.1), q, k, v)
    (o1, vjp1), (o2, vjp2) = run("splash"), run("xla")
    np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-5)
    for a, b in zip(vjp1(ct), vjp2(ct)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_splash_compiles_for_tpu(topology):
    """Qwen3-Next's attention heads (16 q / 2 kv of 256) at 4096 tokens, bf16, packed documents, forward and
    backward, compiled ahead of time through Mosaic inside shard_map over the batch; interpret left to its default,
    which the mesh's TPU devices decide (registry.interpret_pallas_tpu)."""
    pytest.importorskip("libtpu")
    import os
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from qwen3next_kernels.attention import splash

    devices = topologies.get_topology_desc(topology, "tpu").devices
    mesh = Mesh(np.array(devices), ("data",))
    B, T, H, KV, hd = len(devices), 4096, 16, 2, 256

    def step(q, k, v, seg):
        loss = lambda q, k, v: jnp.sum(splash.attention(q, k, v, seg, scale=hd ** -0.5)
                                       .astype(jnp.float32) ** 2)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    batch = P("data")
    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(batch,) * 4, out_specs=(P(), (batch,) * 3),
                              check_vma=False))
    arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, batch))
    compiled = f.lower(arg((B, T, H, hd), jnp.bfloat16), arg((B, T, KV, hd), jnp.bfloat16),
                       arg((B, T, KV, hd), jnp.bfloat16), arg((B, T), jnp.int32)).compile()
    assert "tpu_custom_call" in compiled.as_text()
