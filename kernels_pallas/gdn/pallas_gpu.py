"""Mosaic GPU (Hopper) Pallas kernels for the chunked gated delta rule.

Layout of the computation (chunk C = 64 tokens, per batch b and value head hv):

* XLA prep (elementwise, cheap): chunk-local cumulative log2-decay ``G``, ``beta`` in head-major ``[B, HV, Tp]``,
  segment-run vectors (``run``: run id; ``cin``: the token belongs to the run the chunk's incoming state belongs to;
  ``tail``: the token belongs to the chunk's last run, so it writes the outgoing state) and the per-chunk state decay
  ``gam = 2^G_last * cin_last``.
* ``_prep`` kernel, one CTA per (b, hv, chunk), fully parallel: L2 norm of q and k (fused), ``A = beta_i k_i.k_j
  2^(G_i - G_j)`` (strict lower, same run), the UT inverse ``M = (I + A)^-1`` by merging diagonal blocks on the tensor
  cores (``X <- X - X L X``, 1 -> 2 -> ... -> 64, bf16 operands, fp32 accumulation; see ``_inverse``), the WY factors
  ``w = M (beta 2^G cin k)``, ``u = M (beta v)``, the masked intra-chunk scores ``P = (q k^T) 2^(G_i - G_j)``,
  and the normalised ``qn``, ``kn`` once per key head; all stored bf16, head-major.
* ``_state`` kernel, one CTA per (b, hv, 64 value columns), sequential over chunks with the state ``S [K, 64]``
  (fp32) in registers and a double-buffered TMA pipeline: ``v_new = u - w S``, ``o = qd S + P v_new``,
  ``S <- gam S + kd^T v_new``, where ``qd = qn 2^G cin`` and ``kd = kn 2^(G_last - G) tail`` enter as row scales of
  the products (``gci``, ``kdec`` from the XLA prep). Writes o in the user layout ``[B, T, HV, V]`` and the final
  state.

Backward (``jax.custom_vjp``): the forward also stores M, the state entering every chunk and v_new, and keeps the
prep outputs; ``_state_bwd`` (reverse sequential) gives the gradient of the state leaving every chunk and of the
initial state; ``_chunk_bwd`` (parallel per chunk, two warpgroups) recomputes A and P, loads M, and gives dq, dk,
dv, dbeta and the gate-gradient pieces (``dA = -dXv v_new^T``: no pass through the inverse), with dq, dk summed
over the value heads of a key head by TMA adds in GMEM (at most two heads; XLA sums more); XLA takes the reverse
cumsum for dg. Measurements: benchmarks/RESULTS.md and benchmarks/notes_gdn_gpu.md.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from qwen3next_kernels import mgpu
from qwen3next_kernels.mgpu import COLS, ROWS, WGMMA, bcast_cols, bcast_rows, iota, mm, smem

C = 64
LOG2E = math.log2(math.e)
F32 = jnp.float32
BF16 = jnp.bfloat16
EPS = 1e-6
STATE_STAGES = 2  # TMA pipeline depth of the two sequential state kernels (1 at K = 256, for SMEM)
V_SLICE = {64: 128, 128: 128, 256: 64}  # widest value block each key head dim's kernels fit in SMEM
GAMW = 32  # per-chunk state decay is stored in 128-byte rows (TMA destinations in SMEM must be 128-byte aligned)

SUPPORTED_HEAD_DIMS = (64, 128, 256)


# --------------------------------------------------------------------------------------------------------------------
# small helpers

def _mm_multi(groups):
    """Several independent accumulations ``[(pairs, shape, init_or_None), ...]`` issued together, waited once."""
    if mgpu.INTERPRET is not None:
        return tuple(mm(p, sh, init=i) for p, sh, i in groups)
    inits = tuple(plgpu.ACC.init(i if i is not None else plgpu.layout_cast(jnp.zeros(sh, F32), WGMMA))
                  for _, sh, i in groups)

    def body(accs):
        for acc, (pairs, _, _) in zip(accs, groups):
            for a, b in pairs:
                plgpu.wgmma(acc, a, b)

    return lax.optimization_barrier(pl.run_state(body)(inits))


def _inverse(a, buf, dt):
    """(I + A)^-1 for A [C, C] strictly lower (fp32, registers), by merging diagonal blocks 1 -> 2 -> ... -> 64:
    with X the inverse of the block-diagonal part at size s and L the blocks just below it inside each 2s block,
    the inverse at size 2s is X - X L X (exact: (I + X L) is nilpotent of order 2). Every intermediate is itself an
    inverse of a sub-block, so nothing grows beyond the result: repeated squaring (I - A)(I + A^2)...(I + A^32)
    forms powers of A whose entries reach C(63, 32) for correlated keys and cancel catastrophically (it overflowed
    in training). Products take bf16 operands and accumulate in fp32; two tensor-core waits per level.
    ``buf``: [C, C] SMEM scratch in ``dt``."""
    ii, jj = iota((C, C), 0), iota((C, C), 1)
    x = jnp.where(ii == jj, 1.0, 0.0) - jnp.where(lax.div(ii, 2) == lax.div(jj, 2), a, 0.0)   # size 2: I - A
    size = 4
    while size <= C:
        ii, jj = iota((C, C), 0), iota((C, C), 1)
        half = size // 2
        below = ((lax.div(ii, size) == lax.div(jj, size)) & (lax.rem(ii, size) >= half)
                 & (lax.rem(jj, size) < half))
        buf[...] = x.astype(dt)
        plgpu.commit_smem()
        link = mm([(jnp.where(below, a, 0.0).astype(dt), buf)], (C, C))          # L X
        buf[...] = link.astype(dt)
        plgpu.commit_smem()
        x = mm([((x * -1.0).astype(dt), buf)], (C, C), init=x)                    # X - X (L X)
        size *= 2
    return x


def _add_to_gmem(src, dst):
    """dst += src (a bf16 SMEM tile into GMEM) by the TMA's reduction; the GPU interpreter, which runs one CTA at a
    time and lacks TMA reductions, reads, adds and writes."""
    if mgpu.INTERPRET is not None:
        dst[...] = (dst[...].astype(F32) + src[...].astype(F32)).astype(dst.dtype)
    else:
        plgpu.copy_smem_to_gmem(src, dst, reduction_op="add")


def _load_chunk(q_ref, k_ref, q_s, k_s, head_vecs, token_vecs, bar, *, b, h, hv, rows):
    """TMA loads that open both per-chunk kernels: q, k of key head h, then per-token vectors into [C] SMEM rows:
    head_vecs [(src [B, HV, Tp], dst)] of value head hv (gates), token_vecs [(src [B, Tp], dst)] (segments).
    2 + len(head_vecs) + len(token_vecs) arrivals on bar."""
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_s, bar)
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h], k_s, bar)
    for src, dst in head_vecs:
        plgpu.copy_gmem_to_smem(src.at[b, hv, rows], dst, bar)
    for src, dst in token_vecs:
        plgpu.copy_gmem_to_smem(src.at[b, rows], dst, bar)


def _normalise(x_s, *, scale, l2norm, dt):
    """In place in SMEM (bf16): x <- scale * x / |x| (only the scale without l2norm). Returns the fp32 reciprocal
    norm for the norm's backward, None without l2norm."""
    xf = plgpu.load(x_s, layout=WGMMA).astype(F32)
    if not l2norm:
        x_s[...] = (xf * scale).astype(dt)
        return None
    rx = lax.rsqrt(jnp.sum(xf * xf, axis=1) + EPS)
    x_s[...] = (xf * bcast_rows(rx * scale, xf.shape)).astype(dt)
    return rx


def _normalise_qk(q_s, k_s, *, scale, l2norm, dt):
    """q <- scale * q / |q|, k <- k / |k| in SMEM, one fp32 tile live at a time; returns (rq, rk) (see _normalise)."""
    rq = _normalise(q_s, scale=scale, l2norm=l2norm, dt=dt)
    rk = _normalise(k_s, scale=1.0, l2norm=l2norm, dt=dt)
    plgpu.commit_smem()
    return rq, rk


def _masks(ri, rj):
    """(row iota, column iota, strictly lower, lower incl. diagonal) of a [C, C] tile, both limited to pairs of one
    run (ri, rj: the run ids as rows / columns). Recomputed where needed rather than kept live (registers)."""
    ii, jj = iota((C, C), 0), iota((C, C), 1)
    same = bcast_rows(ri, (C, C)) == bcast_cols(rj, (C, C))
    return ii, jj, (ii > jj) & same, (ii >= jj) & same


def _decay(mask, gi, gj):
    """2^(G_i - G_j) where mask holds, else 0."""
    return jnp.exp2(jnp.where(mask, bcast_rows(gi, (C, C)) - bcast_cols(gj, (C, C)), -jnp.inf))


# --------------------------------------------------------------------------------------------------------------------
# prep kernel: per chunk, fully parallel

def _prep(q, k, v, gc, beta, run, gci, *, scale, l2norm, store_m=False):
    """-w, u, P [B, HV, Tp, *], the normalised qn (scale included), kn [B, H, Tp, K] (bf16, once per key head: the
    state kernels apply the value heads' decays to their products, which halves these bytes under GVA) and, with
    store_m, M = (I + A)^-1 [B, HV, Tp, C] for the backward."""
    B, Tp, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    r = HV // H
    NC = Tp // C
    dt = q.dtype

    def body(q_ref, k_ref, v_ref, gc_ref, beta_ref, run_ref, gci_ref,
             w_ref, u_ref, a_ref, qn_ref, kn_ref, *rest):
        if store_m:
            m_ref, *rest = rest
        (q_s, k_s, v_s, bk_s, p_s, g_r, g_c, b_r, gci_r, run_r, run_c, bar, v_bar) = rest
        b = lax.axis_index("b")
        hv = lax.axis_index("h")
        c = lax.axis_index("c")
        rows = pl.ds(c * C, C)
        _load_chunk(q_ref, k_ref, q_s, k_s, ((gc_ref, g_r), (gc_ref, g_c), (beta_ref, b_r), (gci_ref, gci_r)),
                    ((run_ref, run_r), (run_ref, run_c)), bar,
                    b=b, h=lax.div(hv, r), hv=hv, rows=rows)
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hv], v_s, v_bar)   # first needed after the inverse
        plgpu.barrier_wait(bar)
        _normalise_qk(q_s, k_s, scale=scale, l2norm=l2norm, dt=dt)

        @pl.when(lax.rem(hv, r) == 0)    # the first value head of a key head writes its qn, kn
        def _():
            plgpu.copy_smem_to_gmem(q_s, qn_ref.at[b, lax.div(hv, r), rows])
            plgpu.copy_smem_to_gmem(k_s, kn_ref.at[b, lax.div(hv, r), rows])

        gi = plgpu.load(g_r, layout=ROWS)
        gj = plgpu.load(g_c, layout=COLS)
        bi = plgpu.load(b_r, layout=ROWS)
        ri = plgpu.load(run_r, layout=ROWS)
        rj = plgpu.load(run_c, layout=COLS)
        qk, kk = _mm_multi([([(q_s, k_s.T)], (C, C), None), ([(k_s, k_s.T)], (C, C), None)])
        ii, jj, strict, incl = _masks(ri, rj)
        p_s[...] = (qk * _decay(incl, gi, gj)).astype(dt)     # the scores leave through p_s before the inverse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(p_s, a_ref.at[b, hv, rows])
        ii, jj, strict, incl = _masks(ri, rj)
        a = kk * _decay(strict, gi, gj) * bcast_rows(bi, (C, C))   # A = beta_i k_i.k_j 2^(G_i - G_j), strict, same run
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # P (and qn, kn) left p_s
        x = _inverse(a, p_s, dt)
        if store_m:
            p_s[...] = x.astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(p_s, m_ref.at[b, hv, rows])

        knf = plgpu.load(k_s, layout=WGMMA).astype(F32)
        bk_s[...] = (knf * bcast_rows(bi * plgpu.load(gci_r, layout=ROWS), (C, K))).astype(dt)
        plgpu.barrier_wait(v_bar)
        vf = plgpu.load(v_s, layout=WGMMA).astype(F32)
        v_s[...] = (vf * bcast_rows(bi, (C, V))).astype(dt)
        plgpu.commit_smem()
        # -w (the state kernels only accumulate) and u, issued together
        w, u = _mm_multi([([((x * -1.0).astype(dt), bk_s)], (C, K), None), ([(x.astype(dt), v_s)], (C, V), None)])
        w_o, u_o = bk_s, v_s
        w_o[...] = w.astype(dt)
        u_o[...] = u.astype(dt)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(w_o, w_ref.at[b, hv, rows])
        plgpu.copy_smem_to_gmem(u_o, u_ref.at[b, hv, rows])
        plgpu.wait_smem_to_gmem(0)

    vec = plgpu.SMEM((C,), F32)
    scratch = [smem((C, K), dt), smem((C, K), dt), smem((C, V), dt), smem((C, K), dt), smem((C, C), dt),
               vec, vec, vec, vec, vec, vec,
               plgpu.Barrier(num_arrivals=8), plgpu.Barrier(num_arrivals=1)]
    out_type = [jax.ShapeDtypeStruct((B, HV, Tp, K), dt), jax.ShapeDtypeStruct((B, HV, Tp, V), dt),
                jax.ShapeDtypeStruct((B, HV, Tp, C), dt), jax.ShapeDtypeStruct((B, H, Tp, K), dt),
                jax.ShapeDtypeStruct((B, H, Tp, K), dt)]
    if store_m:
        out_type.append(jax.ShapeDtypeStruct((B, HV, Tp, C), dt))
    f = mgpu.kernel(body, name="gdn_prep", out_type=out_type, scratch=scratch, grid=(B, NC, HV),
                grid_names=("b", "c", "h"))
    return f(q, k, v, gc, beta, run, gci)


# --------------------------------------------------------------------------------------------------------------------
# state kernel: sequential over chunks

def _state(nw, u, att, qn, kn, gci, kdec, gam, h0, *, T, out_dtype, store_h=False, bv=64):
    """Forward state pass; returns o [B, Tp, HV, V] (out_dtype), final state fp32 and, with store_h, the state
    entering every chunk [B, HV, NC, K, V] (bf16) and v_new [B, HV, Tp, V]. qn, kn are per key head; the value
    head's decays enter as row scales of products: qd S = gci * (qn S), kd^T v_new = kn^T (kdec * v_new)."""
    B, HV, Tp, K = nw.shape
    r = HV // qn.shape[1]
    V = u.shape[-1]
    NC = Tp // C
    NV = V // bv
    dt = nw.dtype
    ST = STATE_STAGES if K <= 128 else 1
    NO = 2 if K <= 128 else 1     # outgoing tiles alternate (no wait on the last step's stores) where SMEM allows
    sends = 3 if store_h else 1   # stores issued per step

    def body(w_ref, u_ref, a_ref, qn_ref, kn_ref, gci_ref, kdec_ref, gam_ref, h0_ref, o_ref, ht_ref, *rest):
        if store_h:
            h_ref, vn_ref, *rest = rest
        w_s, u_s, a_s, qn_s, kn_s, gci_s, kdec_s, gam_s, s_s, vn_s, vk_s, o_s, in_bar = rest
        b = lax.axis_index("b")
        hv = lax.axis_index("h")
        iv = lax.axis_index("v")
        cols = pl.ds(iv * bv, bv)

        def issue(n, slot):
            rows = pl.ds(n * C, C)
            bb = in_bar.at[slot]
            plgpu.copy_gmem_to_smem(w_ref.at[b, hv, rows], w_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(u_ref.at[b, hv, rows, cols], u_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(a_ref.at[b, hv, rows], a_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(qn_ref.at[b, lax.div(hv, r), rows], qn_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(kn_ref.at[b, lax.div(hv, r), rows], kn_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(gci_ref.at[b, hv, rows], gci_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(kdec_ref.at[b, hv, rows], kdec_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(gam_ref.at[b, hv, n], gam_s.at[slot], bb)

        issue(0, 0)
        s0 = plgpu.load(h0_ref.at[b, hv, :, cols], layout=WGMMA, optimized=False)

        def step(n, s):
            slot = lax.rem(n, ST)
            out = lax.rem(n, NO)

            if ST > 1:
                @pl.when(n + 1 < NC)
                def _():
                    issue(n + 1, lax.rem(n + 1, ST))

            plgpu.barrier_wait(in_bar.at[slot])
            plgpu.wait_smem_to_gmem(sends * (NO - 1), wait_read_only=True)   # the stores of NO steps ago were read
            s_o, vn_o, vk_o = s_s.at[out], vn_s.at[out], vk_s.at[out]
            s_o[...] = s.astype(dt)
            plgpu.commit_smem()
            if store_h:
                plgpu.copy_smem_to_gmem(s_o, h_ref.at[b, hv, n, :, cols])
            uf = plgpu.load(u_s.at[slot], layout=WGMMA).astype(F32)
            vn, qs = _mm_multi([([(w_s.at[slot], s_o)], (C, bv), uf),        # v_new = u - w S
                                ([(qn_s.at[slot], s_o)], (C, bv), None)])    # qn S
            vn_o[...] = vn.astype(dt)
            vk_o[...] = (vn * bcast_rows(plgpu.load(kdec_s.at[slot], layout=ROWS), (C, bv))).astype(dt)
            plgpu.commit_smem()
            if store_h:
                plgpu.copy_smem_to_gmem(vn_o, vn_ref.at[b, hv, pl.ds(n * C, C), cols])
            gci = plgpu.load(gci_s.at[slot], layout=ROWS)
            o, s = _mm_multi([([(a_s.at[slot], vn_o)], (C, bv), qs * bcast_rows(gci, (C, bv))),
                              ([(kn_s.at[slot].T, vk_o)], (K, bv), s * gam_s[slot, 0])])
            if ST == 1:
                @pl.when(n + 1 < NC)
                def _():
                    issue(n + 1, 0)
            o_s.at[out][...] = o.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s.at[out], o_ref.at[b, pl.ds(n * C, C), hv, cols])
            return s

        s = lax.fori_loop(0, NC, step, s0)
        plgpu.wait_smem_to_gmem(0)
        ht_ref.at[b, hv, :, cols][...] = s

    scratch = [smem((ST, C, K), dt), smem((ST, C, bv), dt), smem((ST, C, C), dt), smem((ST, C, K), dt),
               smem((ST, C, K), dt), plgpu.SMEM((ST, C), F32), plgpu.SMEM((ST, C), F32),
               plgpu.SMEM((ST, GAMW), F32),
               smem((NO, K, bv), dt), smem((NO, C, bv), dt), smem((NO, C, bv), dt), smem((NO, C, bv), out_dtype),
               plgpu.Barrier(num_arrivals=8, num_barriers=ST)]
    out_type = [jax.ShapeDtypeStruct((B, Tp, HV, V), out_dtype), jax.ShapeDtypeStruct((B, HV, K, V), F32)]
    if store_h:
        out_type += [jax.ShapeDtypeStruct((B, HV, NC, K, V), dt), jax.ShapeDtypeStruct((B, HV, Tp, V), dt)]
    f = mgpu.kernel(body, name="gdn_state", out_type=out_type, scratch=scratch, grid=(B, HV, NV),
                grid_names=("b", "h", "v"))
    return f(nw, u, att, qn, kn, gci, kdec, gam, h0)


def _state_bwd(do, nw, att, qn, kn, gci, kdec, gam, dht, *, bv=64):
    """Reverse state pass: the gradient of the state leaving every chunk, dS' [B, HV, NC, K, V] (bf16), and of the
    initial state (fp32). Per chunk (reverse): dv_new = P^T do + kdec * (kn dS'),
    dS = gam dS' + qn^T (gci * do) - w^T dv_new."""
    B, HV, Tp, K = nw.shape
    r = HV // qn.shape[1]
    V = do.shape[-1]
    NC = Tp // C
    NV = V // bv
    dt = nw.dtype
    ST = STATE_STAGES if K <= 128 else 1

    def body(do_ref, w_ref, a_ref, qn_ref, kn_ref, gci_ref, kdec_ref, gam_ref, dht_ref, dsp_ref, dh0_ref,
             do_s, w_s, a_s, qn_s, kn_s, gci_s, kdec_s, gam_s, ds_s, dvn_s, dog_s, in_bar):
        b = lax.axis_index("b")
        hv = lax.axis_index("h")
        iv = lax.axis_index("v")
        cols = pl.ds(iv * bv, bv)

        def issue(n, slot):
            rows = pl.ds(n * C, C)
            bb = in_bar.at[slot]
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, hv, cols], do_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(w_ref.at[b, hv, rows], w_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(a_ref.at[b, hv, rows], a_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(qn_ref.at[b, lax.div(hv, r), rows], qn_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(kn_ref.at[b, lax.div(hv, r), rows], kn_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(gci_ref.at[b, hv, rows], gci_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(kdec_ref.at[b, hv, rows], kdec_s.at[slot], bb)
            plgpu.copy_gmem_to_smem(gam_ref.at[b, hv, n], gam_s.at[slot], bb)

        issue(NC - 1, 0)
        d0 = plgpu.load(dht_ref.at[b, hv, :, cols], layout=WGMMA, optimized=False)

        def step(i, ds):
            n = NC - 1 - i
            slot = lax.rem(i, ST)

            if ST > 1:
                @pl.when(n > 0)
                def _():
                    issue(n - 1, lax.rem(i + 1, ST))

            plgpu.barrier_wait(in_bar.at[slot])
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # dS' tiles alternate: the one of two steps ago was read
            ds_o = ds_s.at[lax.rem(i, 2)]
            ds_o[...] = ds.astype(dt)
            dof = plgpu.load(do_s.at[slot], layout=WGMMA).astype(F32)
            dog_s[...] = (dof * bcast_rows(plgpu.load(gci_s.at[slot], layout=ROWS), (C, bv))).astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ds_o, dsp_ref.at[b, hv, n, :, cols])
            pdo, kds = _mm_multi([([(a_s.at[slot].T, do_s.at[slot])], (C, bv), None),
                                  ([(kn_s.at[slot], ds_o)], (C, bv), None)])
            dvn = pdo + kds * bcast_rows(plgpu.load(kdec_s.at[slot], layout=ROWS), (C, bv))
            dvn_s[...] = dvn.astype(dt)
            plgpu.commit_smem()
            ds = mm([(qn_s.at[slot].T, dog_s), (w_s.at[slot].T, dvn_s)], (K, bv), init=ds * gam_s[slot, 0])
            if ST == 1:
                @pl.when(n > 0)
                def _():
                    issue(n - 1, 0)
            return ds

        ds = lax.fori_loop(0, NC, step, d0)
        plgpu.wait_smem_to_gmem(0)
        dh0_ref.at[b, hv, :, cols][...] = ds

    scratch = [smem((ST, C, bv), dt), smem((ST, C, K), dt), smem((ST, C, C), dt), smem((ST, C, K), dt),
               smem((ST, C, K), dt), plgpu.SMEM((ST, C), F32), plgpu.SMEM((ST, C), F32),
               plgpu.SMEM((ST, GAMW), F32),
               smem((2, K, bv), dt), smem((C, bv), dt), smem((C, bv), dt),
               plgpu.Barrier(num_arrivals=8, num_barriers=ST)]
    out_type = [jax.ShapeDtypeStruct((B, HV, NC, K, V), dt), jax.ShapeDtypeStruct((B, HV, K, V), F32)]
    f = mgpu.kernel(body, name="gdn_state_bwd", out_type=out_type, scratch=scratch, grid=(B, HV, NV),
                grid_names=("b", "h", "v"))
    return f(do, nw, att, qn, kn, gci, kdec, gam, dht)


def _l2norm_bwd(dxn, xn, r, scale, l2norm):
    """Gradient through x -> scale * x / |x| given xn = scale * x / |x| (fp32 [C, K]) and r = 1 / |x| (rows)."""
    if not l2norm:
        return dxn * scale
    shape = dxn.shape
    return (dxn * scale - xn * bcast_rows(jnp.sum(xn * dxn, axis=1) * (1.0 / scale), shape)) * bcast_rows(r, shape)


def _chunk_bwd(q, k, v, do, gc, beta, run, gci, kdec, hc, dsp, vn, m, *, scale, l2norm):
    """Chunk-local gradients, one CTA per (b, hv, chunk), given the state entering the chunk (hc), the gradient of
    the state leaving it (dsp), v_new (vn) and the forward's M = (I + A)^-1 (m: its serial inverse is the costliest
    part to recompute). Recomputes the normalised q/k, A and P and returns
    dq, dk [B, Tp, H, K] bf16, dv [B, Tp, HV, V], dbeta [B, HV, Tp], the gate gradient pieces
    dg_row, dg_col, rkd ([B, HV, Tp] fp32) and sds = rowsum(S * dS') [B, HV, NC, K]; XLA assembles dg.

    Two warpgroups, so that one's tensor-core waits and loads overlap the other's work. The chain through A runs on
    warpgroup 0: qk^T, kk^T and dP = do v_new^T, then dv_new = P^T do + kd dS', dXv = M^T dv_new (dv = beta dXv)
    and dA = -dXv v_new^T (v_new = M r with r = Xv - Xk S, so dA = -M^T (dv_new r^T) M^T = -dXv (M r)^T: no pass
    through the inverse). Warpgroup 1 makes dq and dk from products that need only the loads (v_new dS'^T,
    do S^T) and, as warpgroup 0 publishes them in SMEM, dPD, dXv and dKK. Warpgroup 0 alone takes column sums
    (a reduction across warps through Pallas' one reduction scratch); warpgroup 1 only sums rows.

    dq, dk sum over the value heads of a key head. With at most two of them the CTAs add their tiles into
    zeroed GMEM with the TMA's reduction (bf16): 0 + a + b rounds once, to the same value whichever head arrives
    first, so the sum is deterministic and equal to rounding a + b. It replaces XLA's pass over per-value-head
    copies (0.26 ms at 8 x 4096 on an H100) by a zeroing pass (0.08 ms). With more heads the order would change
    the rounding from run to run, so the tiles are stored per value head ([B, Tp, HV, K]) and _assemble_grads
    sums them."""
    B, Tp, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    r = HV // H
    NC = Tp // C
    dt = q.dtype
    add_heads = r <= 2

    # dq_ref, dk_ref are the last inputs (zeroed, added to) or the first outputs: the same place either way.
    def body(q_ref, k_ref, v_ref, do_ref, gc_ref, beta_ref, run_ref, gci_ref, kdec_ref, h_ref, dsp_ref, vn_ref, m_ref,
             dq_ref, dk_ref, dv_ref, db_ref, dgr_ref, dgc_ref, rkd_ref, sds_ref,
             q_s, k_s, v_s, do_s, vn_s, s_s, ds_s, m_s, p_s, dpd_s, dkk_s, dvn_s,
             g_r, g_c, b_r, gci_r, kdec_r, run_r, run_c, rk_s, db_s, dgr_s, dgc_s, db1_s, dgr1_s, rkd_s, sds_s,
             bar, bar_b, bar_y, bar_c, q_ready, k_ready, dpd_ready, dxv_ready, dkk_ready, part_ready, done):
        b = lax.axis_index("b")
        hv = lax.axis_index("h")
        c = lax.axis_index("c")
        wg = lax.axis_index("wg")
        rows = pl.ds(c * C, C)
        hk = lax.div(hv, r)

        @pl.when(wg == 0)
        def _chain():
            # Loads in the order the two warpgroups need them, each group on its own barrier.
            _load_chunk(q_ref, k_ref, q_s, k_s, ((gc_ref, g_r), (gc_ref, g_c), (beta_ref, b_r), (gci_ref, gci_r),
                                                 (kdec_ref, kdec_r)),
                        ((run_ref, run_r), (run_ref, run_c)), bar, b=b, h=hk, hv=hv, rows=rows)
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, hv], do_s, bar_b)
            plgpu.copy_gmem_to_smem(vn_ref.at[b, hv, rows], vn_s, bar_b)
            plgpu.copy_gmem_to_smem(dsp_ref.at[b, hv, c], ds_s, bar_y)
            plgpu.copy_gmem_to_smem(h_ref.at[b, hv, c], s_s, bar_y)
            plgpu.copy_gmem_to_smem(m_ref.at[b, hv, rows], m_s, bar_c)
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, hv], v_s, bar_c)
            plgpu.barrier_wait(bar)
            rk = _normalise(k_s, scale=1.0, l2norm=l2norm, dt=dt)     # warpgroup 1 normalises q meanwhile
            if l2norm:
                rk_s[...] = rk
            plgpu.commit_smem()
            plgpu.barrier_arrive(k_ready)

            gi = plgpu.load(g_r, layout=ROWS)
            gj = plgpu.load(g_c, layout=COLS)
            bi = plgpu.load(b_r, layout=ROWS)
            ri = plgpu.load(run_r, layout=ROWS)
            rj = plgpu.load(run_c, layout=COLS)
            plgpu.barrier_wait(bar_b)
            plgpu.barrier_wait(q_ready)
            qk, kk, dp = _mm_multi([([(q_s, k_s.T)], (C, C), None), ([(k_s, k_s.T)], (C, C), None),
                                    ([(do_s, vn_s.T)], (C, C), None)])
            ii, jj, strict, incl = _masks(ri, rj)
            dec = _decay(incl, gi, gj)
            pm = qk * dec                                   # P, masked
            p_s[...] = pm.astype(dt)
            ep = dp * pm                                    # the gates' share of dP
            dg_row = jnp.sum(ep, axis=1)
            dg_col = jnp.sum(ep, axis=0) * -1.0
            dpd_s[...] = (dp * dec).astype(dt)              # dPD = dP * D (dec is 0 off the mask)
            plgpu.commit_smem()
            plgpu.barrier_arrive(dpd_ready)
            kkd = kk * _decay(strict, gi, gj)               # A = beta_i KKD
            kd16 = (plgpu.load(k_s, layout=WGMMA).astype(F32)
                    * bcast_rows(plgpu.load(kdec_r, layout=ROWS), (C, K))).astype(dt)
            plgpu.barrier_wait(bar_y)
            dvn_s[...] = mm([(p_s.T, do_s), (kd16, ds_s)], (C, V)).astype(dt)     # dv_new = P^T do + kd dS'
            plgpu.commit_smem()
            plgpu.barrier_wait(bar_c)
            dxv = mm([(m_s.T, dvn_s)], (C, V))                                     # dXv = M^T dv_new
            db = jnp.sum(plgpu.load(v_s, layout=WGMMA).astype(F32) * dxv, axis=1)
            dxv16 = dxv.astype(dt)
            v_s[...] = dxv16                                # v is spent: dXv for warpgroup 1's dXv S^T
            dvn_s[...] = (dxv * bcast_rows(bi, (C, V))).astype(dt)                 # dv, final
            plgpu.commit_smem()
            plgpu.barrier_arrive(dxv_ready)
            plgpu.copy_smem_to_gmem(dvn_s, dv_ref.at[b, rows, hv])
            da = mm([(dxv16, vn_s.T)], (C, C))
            ii, jj, strict, incl = _masks(ri, rj)
            da = jnp.where(strict, da * -1.0, 0.0)          # dA = -dXv v_new^T on A's support
            dakkd = da * kkd
            db = db + jnp.sum(dakkd, axis=1)
            ea = dakkd * bcast_rows(bi, (C, C))             # dA * A
            dg_row = dg_row + jnp.sum(ea, axis=1)
            dg_col = dg_col - jnp.sum(ea, axis=0)
            dkk_s[...] = (da * _decay(strict, gi, gj) * bcast_rows(bi, (C, C))).astype(dt)   # dKK = dA * D * beta_i
            plgpu.commit_smem()
            plgpu.barrier_arrive(dkk_ready)
            db_s[...] = db
            dgr_s[...] = dg_row
            dgc_s[...] = dg_col
            plgpu.commit_smem()
            plgpu.barrier_arrive(part_ready)
            plgpu.copy_smem_to_gmem(dgc_s, dgc_ref.at[b, hv, rows])
            plgpu.wait_smem_to_gmem(0)

        def send(x_s, dx_ref, dxn, rx, x_scale):
            """dq or dk from the gradient of the normalised tile, in place of the normalised tile, to GMEM."""
            x_s[...] = _l2norm_bwd(dxn, plgpu.load(x_s, layout=WGMMA).astype(F32), rx, x_scale, l2norm).astype(dt)
            plgpu.commit_smem()
            if add_heads:
                _add_to_gmem(x_s, dx_ref.at[b, rows, hk])
            else:
                plgpu.copy_smem_to_gmem(x_s, dx_ref.at[b, rows, hv])

        @pl.when(wg == 1)
        def _keys_and_queries():
            plgpu.barrier_wait(bar)
            rq = _normalise(q_s, scale=scale, l2norm=l2norm, dt=dt)
            plgpu.commit_smem()
            plgpu.barrier_arrive(q_ready)
            plgpu.barrier_wait(bar_b)
            plgpu.barrier_wait(bar_y)
            dkd, dqd = _mm_multi([([(vn_s, ds_s.T)], (C, K), None), ([(do_s, s_s.T)], (C, K), None)])
            for half in range(K // 64):               # the state's own decay: rowsum(S * dS')
                sl = pl.ds(half * 64, 64)
                sds_s[sl] = jnp.sum(plgpu.load(s_s.at[sl], layout=WGMMA).astype(F32)
                                    * plgpu.load(ds_s.at[sl], layout=WGMMA).astype(F32), axis=1)
            plgpu.barrier_wait(k_ready)
            gci = plgpu.load(gci_r, layout=ROWS)      # qd = qn * gci
            kdec = plgpu.load(kdec_r, layout=ROWS)    # kd = kn * kdec
            bgci = plgpu.load(b_r, layout=ROWS) * gci   # Xk = kn * bgci
            knf = plgpu.load(k_s, layout=WGMMA).astype(F32)
            rkd = jnp.sum(knf * dkd, axis=1) * kdec
            dkn = dkd * bcast_rows(kdec, (C, K))
            qnf = plgpu.load(q_s, layout=WGMMA).astype(F32)
            dg_row = jnp.sum(qnf * dqd, axis=1) * gci - rkd
            plgpu.barrier_wait(dpd_ready)
            dqn, dkn = _mm_multi([([(dpd_s, k_s)], (C, K), dqd * bcast_rows(gci, (C, K))),   # dqn = dPD kn + gci dqd
                                  ([(dpd_s.T, q_s)], (C, K), dkn)])                          # dkn += dPD^T qn
            send(q_s, dq_ref, dqn, rq, scale)
            plgpu.barrier_wait(dxv_ready)
            ndxk = mm([(v_s, s_s.T)], (C, K))                                  # -dXk = dXv S^T
            knf = plgpu.load(k_s, layout=WGMMA).astype(F32)
            t = jnp.sum(knf * ndxk, axis=1)
            db = t * gci * -1.0
            dg_row = dg_row - t * bgci
            dkn = dkn - ndxk * bcast_rows(bgci, (C, K))
            plgpu.barrier_wait(dkk_ready)
            dkn = mm([(dkk_s, k_s), (dkk_s.T, k_s)], (C, K), init=dkn)          # dkn += (dKK + dKK^T) kn
            send(k_s, dk_ref, dkn, plgpu.load(rk_s, layout=ROWS) if l2norm else None, 1.0)
            plgpu.barrier_wait(part_ready)
            db1_s[...] = plgpu.load(db_s, layout=ROWS) + db
            dgr1_s[...] = plgpu.load(dgr_s, layout=ROWS) + dg_row
            rkd_s[...] = rkd
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(db1_s, db_ref.at[b, hv, rows])
            plgpu.copy_smem_to_gmem(dgr1_s, dgr_ref.at[b, hv, rows])
            plgpu.copy_smem_to_gmem(rkd_s, rkd_ref.at[b, hv, rows])
            plgpu.copy_smem_to_gmem(sds_s, sds_ref.at[b, hv, c])
            plgpu.wait_smem_to_gmem(0)

        # Neither warpgroup exits while the other still issues wgmmas.
        plgpu.barrier_arrive(done)
        plgpu.barrier_wait(done)

    vec = plgpu.SMEM((C,), F32)
    one = plgpu.Barrier()
    scratch = [smem((C, K), dt), smem((C, K), dt), smem((C, V), dt), smem((C, V), dt), smem((C, V), dt),
               smem((K, V), dt), smem((K, V), dt),
               smem((C, C), dt), smem((C, C), dt), smem((C, C), dt), smem((C, C), dt), smem((C, V), dt),
               *[vec] * 14, plgpu.SMEM((K,), F32),
               plgpu.Barrier(num_arrivals=9), plgpu.Barrier(num_arrivals=2), plgpu.Barrier(num_arrivals=2),
               plgpu.Barrier(num_arrivals=2), one, one, one, one, one, one, plgpu.Barrier(num_arrivals=2)]
    vt = jax.ShapeDtypeStruct((B, HV, Tp), F32)
    out_type = [jax.ShapeDtypeStruct((B, Tp, HV, V), dt), vt, vt, vt, vt, jax.ShapeDtypeStruct((B, HV, NC, K), F32)]
    if not add_heads:
        out_type = [jax.ShapeDtypeStruct((B, Tp, HV, K), dt)] * 2 + out_type
    f = mgpu.kernel(body, name="gdn_chunk_bwd", out_type=out_type, scratch=scratch, grid=(B, NC, HV),
                    grid_names=("b", "c", "h"), num_threads=2)
    args = (q, k, v, do, gc, beta, run, gci, kdec, hc, dsp, vn, m)
    if not add_heads:
        return f(*args)
    dq, dk = jax.new_ref(jnp.zeros((B, Tp, H, K), dt)), jax.new_ref(jnp.zeros((B, Tp, H, K), dt))
    rest = f(*args, dq, dk)
    return (dq[...], dk[...], *rest)


# --------------------------------------------------------------------------------------------------------------------
# XLA glue

def _runs(segment_ids, B, T):
    if segment_ids is None:
        return jnp.zeros((B, T), jnp.int32)
    s = segment_ids
    change = jnp.concatenate([jnp.zeros((B, 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    return jnp.cumsum(change.astype(jnp.int32), axis=1)


def _gate_prep(g, beta, segment_ids, B, T, HV, pad):
    """Head-major fp32 gate vectors: gc (chunk-local cumsum of g in log2 units), beta, run, gam, and the row scales
    gci = 2^G cin (qd = qn gci, Xk = kn beta gci) and kdec = 2^(G_last - G) tail (kd = kn kdec)."""
    Tp = T + pad
    NC = Tp // C
    gf = jnp.pad(g.astype(F32), ((0, 0), (0, pad), (0, 0)))
    bf = jnp.pad(beta.astype(F32), ((0, 0), (0, pad), (0, 0)))
    gc = _chunk_cumsum(gf.reshape(B, NC, C, HV), axis=2) * LOG2E        # [B, NC, C, HV]
    runs = jnp.pad(_runs(segment_ids, B, T), ((0, 0), (0, pad)), mode="edge").reshape(B, NC, C)
    entering = jnp.concatenate([runs[:, :1, :1], runs[:, :-1, -1:]], axis=1)   # run of the incoming state
    cin = (runs == entering).astype(F32)                                  # [B, NC, C]
    tail = (runs == runs[:, :, -1:]).astype(F32)
    gam = jnp.exp2(gc[:, :, -1, :]) * cin[:, :, -1:]                      # [B, NC, HV]
    gci = jnp.exp2(gc) * cin[..., None]                                   # [B, NC, C, HV]
    kdec = jnp.exp2(gc[:, :, -1:, :] - gc) * tail[..., None]

    def head_major(x):                                                    # [B, NC, C, HV] -> [B, HV, Tp]
        return x.reshape(B, Tp, HV).transpose(0, 2, 1)

    gam = jnp.broadcast_to(gam.transpose(0, 2, 1)[..., None], (B, HV, NC, GAMW))   # 128-byte rows: TMA alignment
    return (head_major(gc), bf.transpose(0, 2, 1), runs.reshape(B, Tp).astype(F32), gam, head_major(gci),
            head_major(kdec))


def _pad_t(x, pad):
    return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x


def _forward(q, k, v, g, beta, h0, segment_ids, use_qk_l2norm, scale, training=False):
    """(o, final state); with training also the backward's residuals: q, k, v padded to whole chunks, the gate
    vectors, the prep kernel's outputs with M, and the state entering every chunk with v_new. Keeping the prep
    outputs (about 1.3 KB per token and value head, bf16) spares the backward a second prep pass; under remat they
    live only for one layer's backward."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    pad = (-T) % C
    gates = _gate_prep(g, beta, segment_ids, B, T, HV, pad)
    gc, bt, run, gam, gci, kdec = gates
    padded = tuple(_pad_t(x, pad) for x in (q, k, v))
    prepped = _prep(*padded, gc, bt, run, gci, scale=scale, l2norm=use_qk_l2norm, store_m=training)
    nw, u, att, qn, kn = prepped[:5]
    outs = _state(nw, u, att, qn, kn, gci, kdec, gam, h0, T=T, out_dtype=v.dtype, store_h=training)
    o, ht = outs[0][:, :T], outs[1]
    if not training:
        return o, ht
    hc, vn = outs[2:]
    return (o, ht), (padded, gates, prepped, hc, vn)


# --------------------------------------------------------------------------------------------------------------------
# public entry

@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _gdn(q, k, v, g, beta, h0, segment_ids, use_qk_l2norm, scale):
    return _forward(q, k, v, g, beta, h0, segment_ids, use_qk_l2norm, scale)


def _gdn_fwd(q, k, v, g, beta, h0, segment_ids, use_qk_l2norm, scale):
    out, saved = _forward(q, k, v, g, beta, h0, segment_ids, use_qk_l2norm, scale, training=True)
    return out, (g, beta, segment_ids) + saved


def _bwd(use_qk_l2norm, scale, res, cts):
    """Reverse state pass (Mosaic kernel) for the gradient of the state leaving every chunk, then the chunk-local
    gradients of every chunk at once (Mosaic kernel); XLA only assembles dg from the gate pieces (and sums dq, dk
    over value heads beyond two per key head)."""
    g, beta, segment_ids, (qp, kp, vp), gates, prepped, hc, vn = res
    gc, bt, run, gam, gci, kdec = gates
    nw, u, att, qn, kn, m = prepped
    do, dht = cts
    Tp, H = qp.shape[1], qp.shape[2]
    T = do.shape[1]
    do_p = _pad_t(do.astype(vp.dtype), Tp - T)
    dsp, dh0 = _state_bwd(do_p, nw, att, qn, kn, gci, kdec, gam, dht.astype(F32))
    pieces = _chunk_bwd(qp, kp, vp, do_p, gc, bt, run, gci, kdec, hc, dsp, vn, m, scale=scale, l2norm=use_qk_l2norm)
    dq, dk, dv, dg, db = _assemble_grads(*pieces, gam, T=T, H=H)
    dseg = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
    return dq, dk, dv, dg.astype(g.dtype), db.astype(beta.dtype), dh0, dseg


def _assemble_grads(dq, dk, dv, db, dgr, dgcol, rkd, sds, gam, *, T, H):
    """XLA tail of the backward: GVA sums of dq, dk where the kernel left them per value head; dg from the gate
    pieces by a reverse chunk-local cumsum."""
    B, Tp, _, K = dq.shape
    HV = dv.shape[2]
    NC = Tp // C
    dq, dk = dq[:, :T], dk[:, :T]
    if dq.shape[2] != H:   # per value head (see _chunk_bwd)
        dq = dq.astype(F32).reshape(B, T, H, HV // H, K).sum(3).astype(dq.dtype)
        dk = dk.astype(F32).reshape(B, T, H, HV // H, K).sum(3).astype(dk.dtype)
    dgc = (dgr + dgcol).reshape(B, HV, NC, C)
    last = rkd.reshape(B, HV, NC, C).sum(-1) + gam[..., 0] * sds.sum(-1)
    dgc = dgc.at[..., -1].add(last)
    dg = _chunk_cumsum(dgc, reverse=True).reshape(B, HV, Tp)[:, :, :T].transpose(0, 2, 1)
    return dq, dk, dv[:, :T], dg, db[:, :, :T].transpose(0, 2, 1)


def _chunk_cumsum(x, *, axis=-1, reverse=False):
    """Cumulative sum over a chunk axis of length C as one small fp32 matmul (XLA's scan lowering of jnp.cumsum
    costs several passes)."""
    tri = jnp.tril(jnp.ones((C, C), F32))             # tri[i, j] = 1 for j <= i
    spec = "ji,...j->...i" if reverse else "ij,...j->...i"
    x = jnp.moveaxis(x, axis, -1)
    return jnp.moveaxis(jnp.einsum(spec, tri, x, precision=lax.Precision.HIGHEST), -1, axis)


_gdn.defvjp(_gdn_fwd, _bwd)


def supports(platform, site):
    """True only for calls the GPU tests cover: a Hopper GPU, bf16 q/k/v, key and value head dims 64, 128 or 256,
    value heads a multiple of key heads, chunks of 64; any T, B, initial state, segment_ids, with or without the
    L2 norm (the scale must be a Python number: it is a compile-time constant of the kernels)."""
    return (platform.is_hopper and site["dtype"] == "bfloat16" and site.get("chunk_size", C) == C
            and site["key_dim"] in SUPPORTED_HEAD_DIMS and site["value_dim"] in SUPPORTED_HEAD_DIMS
            and site["value_heads"] % site["key_heads"] == 0)


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None, use_qk_l2norm=True, scale=None,
                     chunk_size=64, impl="pallas_gpu"):
    """Chunked gated delta rule on Hopper (Mosaic GPU kernels forward and backward).

    q, k [B, T, H, K]; v [B, T, HV, V]; g (log decay), beta [B, T, HV]; initial_state [B, HV, K, V];
    segment_ids [B, T] (the state restarts where the id changes). Returns (o [B, T, HV, V] in v.dtype, final
    state [B, HV, K, V] fp32). Differentiable in q, k, v, g, beta and initial_state (jax.custom_vjp)."""
    if chunk_size != C:
        raise ValueError(f"the Mosaic GPU kernels use chunks of {C}; got chunk_size={chunk_size}")
    K = q.shape[-1]
    if scale is None:
        scale = K ** -0.5
    V = v.shape[-1]
    if initial_state is None:
        h0 = jnp.zeros((q.shape[0], v.shape[2], K, V), F32)
    else:
        h0 = initial_state.astype(F32)
    # The recurrence is independent across value columns (S's columns never mix), so wide value heads run as
    # slices of the widest block the kernels fit in SMEM; autodiff sums the slices' dq, dk, dg and dbeta.
    width = min(V, V_SLICE[K])
    outs = [_gdn(q, k, v[..., i:i + width], g, beta, h0[..., i:i + width], segment_ids, bool(use_qk_l2norm),
                 float(scale)) for i in range(0, V, width)]
    if len(outs) == 1:
        return outs[0]
    return jnp.concatenate([o for o, _ in outs], -1), jnp.concatenate([s for _, s in outs], -1)
