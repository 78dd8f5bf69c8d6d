"""Mosaic GPU (Hopper) kernels for the Gated DeltaNet input conv (see reference.py for what it computes).

XLA ran this conv as several passes: the conv into a bf16 pre-activation, slices that copy q, k, v out for the
Gated DeltaNet kernels, then in the backward SiLU's derivative, the transposed conv interleaved back into
in_proj_qkvz's gradient layout, and a column reduction over all tokens for the kernel's gradient: about 4.8 ms of
an 80B-A3B mixer's 17.2 ms forward + backward at 8 x 4096 on an H100 (benchmarks/RESULTS.md). Here three kernels
read in_proj_qkvz's output (or the gradients) and write the results in the layouts their users read.

Work is cut into CTAs of 64 tokens x one block of BW = 64 or 128 channels (grid (B, T / 64, key heads x blocks);
the blocks of a key head's row of in_proj_qkvz are [q | k | v heads | z heads] in that order, so block j covers
the row's columns [j BW, (j + 1) BW)). z blocks are copied through.

* Shifted taps are loads from SMEM at row offsets. They need a plain (unswizzled) tile, and a plain tile whose
  rows are 256 bytes puts eight rows of a WGMMA-layout load on the same banks. So tiles are loaded 8 columns wider
  than the block (the next block's first columns, never used): rows of 272 bytes fall on distinct banks, and
  results are sliced to the block's width.
* Forward (gdn_conv_fwd): a[t] = sum_d kernel[W-1-d] mask_d[t] x[t-d] (d = 0..W-1, mask_d: x[t-d] is a token of
  t's document), then SiLU, from x rows [t0 - 8, t0 + 64).
* Backward, two kernels. gdn_conv_bwd_da recomputes a and writes da = dy SiLU'(a) (in x's dtype) and the
  kernel's gradient as per-CTA partial sums of mask_d x[t-d] da[t] (column sums on the tensor cores; [B, T / 64,
  key heads, conv blocks, 8, BW] fp32, which XLA adds up). gdn_conv_bwd_dx takes the transposed conv,
  dx[t] = sum_d kernel[W-1-d] mask_d[t+d] da[t+d], from da rows [t0, t0 + 72), and writes in_proj_qkvz's whole
  gradient (dz into the z blocks). One kernel would need da 3 rows past its tokens, i.e. a second pass of the
  recomputation per CTA: measured 3.0 ms against 1.3 + 0.6 ms for the two (80B-A3B mixer at 8 x 4096).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from qwen3next_kernels import mgpu
from qwen3next_kernels.conv.reference import tap_masks
from qwen3next_kernels.mgpu import COLS, ROWS, WGMMA, bcast_cols, bcast_rows, iota, mm, smem

TT = 64     # tokens per CTA
HALO = 8    # rows loaded before (and in the backward after) a CTA's tokens; taps reach W - 1 <= HALO rows back
PAD = 8     # extra columns of the x tiles, so that their rows do not share SMEM banks
F32 = jnp.float32


def _geometry(key_heads, key_dim, value_heads, value_dim):
    """(BW, blocks of a q or k head, blocks of a value head, conv blocks per key head, all blocks per key head)."""
    bw = 128 if key_dim % 128 == 0 and value_dim % 128 == 0 else 64
    nq, nvb = key_dim // bw, value_dim // bw
    r = value_heads // key_heads
    nconv = 2 * nq + r * nvb
    return bw, nq, nvb, nconv, nconv + r * nvb


def supports(platform, site):
    """True only for calls the GPU tests cover: a Hopper GPU, bf16 activations, head dims multiples of 64,
    2 to HALO + 1 taps."""
    return (platform.is_hopper and site["dtype"] == "bfloat16" and site["key_dim"] % 64 == 0
            and site["value_dim"] % 64 == 0 and 2 <= site["taps"] <= HALO + 1
            and site["value_heads"] % site["key_heads"] == 0)


def _blocks(kernel, key_heads, key_dim, value_heads, value_dim, bw):
    """kernel [W, channels of cat(q, k, v)] -> [key heads, conv blocks, W, BW + PAD] fp32, in the blocks' order."""
    W = kernel.shape[0]
    nq = key_heads * key_dim
    parts = [kernel[:, :nq], kernel[:, nq:2 * nq], kernel[:, 2 * nq:]]   # v's channels are per key head too
    parts = [p.reshape(W, key_heads, -1, bw) for p in parts]
    wb = jnp.concatenate(parts, axis=2).transpose(1, 2, 0, 3).astype(F32)
    return jnp.pad(wb, ((0, 0), (0, 0), (0, 0), (0, PAD)))             # as wide as the x tiles


def _unblocks(wb, key_heads, key_dim, bw):
    """The inverse of _blocks: [key heads, conv blocks, W, BW] -> [W, channels]."""
    nk, _, W, _ = wb.shape
    nq = key_dim // bw
    wb = wb.transpose(2, 0, 1, 3)                                       # [W, nk, blocks, BW]
    parts = [wb[:, :, :nq], wb[:, :, nq:2 * nq], wb[:, :, 2 * nq:]]
    return jnp.concatenate([p.reshape(W, -1) for p in parts], axis=1)


def _pre_activation(x_s, w_s, cm_s, taps, off, width):
    """a = sum_d kernel[W-1-d] mask_d x[t-d] for the 64 rows starting at token t0 + off, [64, width] fp32.
    x_s row HALO + i holds token t0 + i; cm_s[d - 1, i] is mask_d of token t0 + i."""
    shape = (TT, width)

    def tap(d):
        x = plgpu.load(x_s.at[pl.ds(HALO + off - d, TT)], layout=WGMMA).astype(F32)
        return x * bcast_cols(plgpu.load(w_s.at[taps - 1 - d], layout=COLS), shape)

    a = tap(0)
    for d in range(1, taps):
        a = a + tap(d) * bcast_rows(plgpu.load(cm_s.at[d - 1, pl.ds(off, TT)], layout=ROWS), shape)
    return a


def _sigmoid(a):
    return 1.0 / (1.0 + jnp.exp(a * -1.0))


def _dest(j, refs, b, rows, h, *, nq, nvb, r, bw):
    """[(condition, GMEM tile)] of conv block j: a column block of q, k (key head h) or v (value head h r + i)."""
    q_ref, k_ref, v_ref = refs
    vi = j - 2 * nq
    return [(j < nq, lambda: q_ref.at[b, rows, h, pl.ds(j * bw, bw)]),
             ((j >= nq) & (j < 2 * nq), lambda: k_ref.at[b, rows, h, pl.ds((j - nq) * bw, bw)]),
             (j >= 2 * nq, lambda: v_ref.at[b, rows, h * r + lax.div(vi, nvb), pl.ds(lax.rem(vi, nvb) * bw, bw)])]


def _z_tile(ref, j, b, rows, h, *, nconv, nvb, r, bw):
    zi = j - nconv
    return ref.at[b, rows, h * r + lax.div(zi, nvb), pl.ds(lax.rem(zi, nvb) * bw, bw)]


def _forward(xp, wb, cm, *, key_heads, key_dim, value_heads, value_dim):
    """xp [B, Tp, nk, P] (Tp a multiple of TT) -> q, k [B, Tp, nk, dk], v, z [B, Tp, nv, dv]."""
    B, Tp, nk, P = xp.shape
    bw, nq, nvb, nconv, nblk = _geometry(key_heads, key_dim, value_heads, value_dim)
    r = value_heads // key_heads
    W = wb.shape[2]
    dt = xp.dtype
    geo = dict(nvb=nvb, r=r, bw=bw)

    def body(x_ref, w_ref, cm_ref, q_ref, k_ref, v_ref, z_ref, x_s, out_s, w_s, cm_s, bar_c, bar_z):
        b, t, hj = lax.axis_index("b"), lax.axis_index("t"), lax.axis_index("hj")
        h, j = lax.div(hj, nblk), lax.rem(hj, nblk)
        t0 = t * TT
        rows = pl.ds(t0, TT)

        @pl.when(j >= nconv)
        def _():  # z passes through
            plgpu.copy_gmem_to_smem(x_ref.at[b, rows, h, pl.ds(j * bw, bw)], out_s, bar_z)
            plgpu.barrier_wait(bar_z)
            plgpu.copy_smem_to_gmem(out_s, _z_tile(z_ref, j, b, rows, h, nconv=nconv, **geo))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(j < nconv)
        def _():
            cols = pl.ds(j * bw, bw + PAD)
            # Rows before t0 = 0 are rows 0..7 again: every tap reaching them is masked.
            plgpu.copy_gmem_to_smem(x_ref.at[b, pl.ds(jnp.maximum(t0 - HALO, 0), HALO), h, cols],
                                    x_s.at[pl.ds(0, HALO)], bar_c)
            plgpu.copy_gmem_to_smem(x_ref.at[b, rows, h, cols], x_s.at[pl.ds(HALO, TT)], bar_c)
            plgpu.copy_gmem_to_smem(w_ref.at[h, j], w_s, bar_c)
            plgpu.copy_gmem_to_smem(cm_ref.at[b, :, pl.ds(t0, TT)], cm_s, bar_c)
            plgpu.barrier_wait(bar_c)
            a = _pre_activation(x_s, w_s, cm_s, W, 0, bw + PAD)[:, :bw]
            out_s[...] = (a * _sigmoid(a)).astype(dt)
            plgpu.commit_smem()
            for cond, dst in _dest(j, (q_ref, k_ref, v_ref), b, rows, h, nq=nq, **geo):
                pl.when(cond)(lambda dst=dst: plgpu.copy_smem_to_gmem(out_s, dst()))
            plgpu.wait_smem_to_gmem(0)

    scratch = [plgpu.SMEM((HALO + TT, bw + PAD), dt), smem((TT, bw), dt), plgpu.SMEM((W, bw + PAD), F32),
               plgpu.SMEM((W - 1, TT), F32), plgpu.Barrier(num_arrivals=4), plgpu.Barrier(num_arrivals=1)]
    out_type = [jax.ShapeDtypeStruct((B, Tp, nk, key_dim), dt)] * 2 + \
               [jax.ShapeDtypeStruct((B, Tp, value_heads, value_dim), dt)] * 2
    f = mgpu.kernel(body, name="gdn_conv_fwd", out_type=out_type, scratch=scratch, grid=(B, Tp // TT, nk * nblk),
                    grid_names=("b", "t", "hj"))
    return f(xp, wb, cm)


def _grad_pre_activation(xp, dq, dk, dv, wb, cm, *, key_heads, key_dim, value_heads, value_dim):
    """da = dy * SiLU'(a) (a recomputed) -> [B, Tp, nk, conv blocks x BW + 64] in x's dtype (the last 64 columns
    are never written: they only keep the transposed conv's wide tiles in bounds), and the kernel's gradient as
    per-CTA partial sums sum_t mask_d x[t - d] da[t]: [B, Tp / TT, nk, conv blocks, 8, BW] fp32, rows W-1-d
    (rows from W on are zero)."""
    B, Tp, nk, P = xp.shape
    bw, nq, nvb, nconv, _ = _geometry(key_heads, key_dim, value_heads, value_dim)
    r = value_heads // key_heads
    W = wb.shape[2]
    NT = Tp // TT
    dt = xp.dtype
    shape = (TT, bw)

    def body(x_ref, dq_ref, dk_ref, dv_ref, w_ref, cm_ref, da_ref, dw_ref, x_s, dy_s, w_s, cm_s, bar):
        b, t, hj = lax.axis_index("b"), lax.axis_index("t"), lax.axis_index("hj")
        h, j = lax.div(hj, nconv), lax.rem(hj, nconv)
        t0 = t * TT
        rows = pl.ds(t0, TT)
        cols = pl.ds(j * bw, bw + PAD)
        plgpu.copy_gmem_to_smem(x_ref.at[b, pl.ds(jnp.maximum(t0 - HALO, 0), HALO), h, cols],
                                x_s.at[pl.ds(0, HALO)], bar)
        plgpu.copy_gmem_to_smem(x_ref.at[b, rows, h, cols], x_s.at[pl.ds(HALO, TT)], bar)
        for cond, src in _dest(j, (dq_ref, dk_ref, dv_ref), b, rows, h, nq=nq, nvb=nvb, r=r, bw=bw):
            pl.when(cond)(lambda src=src: plgpu.copy_gmem_to_smem(src(), dy_s, bar))
        plgpu.copy_gmem_to_smem(w_ref.at[h, j], w_s, bar)
        plgpu.copy_gmem_to_smem(cm_ref.at[b, :, rows], cm_s, bar)
        plgpu.barrier_wait(bar)

        a = _pre_activation(x_s, w_s, cm_s, W, 0, bw + PAD)[:, :bw]
        sg = _sigmoid(a)
        da = plgpu.load(dy_s, layout=WGMMA).astype(F32) * sg * (1.0 + a * (1.0 - sg))
        da = da.astype(dt).astype(F32)     # rounded as it is stored (and as the plain-JAX form in dt rounds it)
        dy_s[...] = da.astype(dt)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dy_s, da_ref.at[b, rows, h, pl.ds(j * bw, bw)])

        # The kernel's gradient: column sums of p_d = mask_d x[t - d] da[t] over the CTA's tokens, on the tensor
        # cores (column sums across a WGMMA tile's warps took 0.9 of this kernel's 1.5 ms): row W-1-d of
        # sel_d @ p_d with sel_d one in that row. p_d (a product of two bf16 values, 16 significant bits) enters
        # as hi + lo, two bf16 tiles that hold it to 2^-17.
        def partials(p_hi, p_lo):
            ii = iota((TT, TT), 0)
            acc = plgpu.layout_cast(jnp.zeros(shape, F32), WGMMA)
            for d in range(W):
                p = plgpu.load(x_s.at[pl.ds(HALO - d, TT)], layout=WGMMA).astype(F32)[:, :bw] * da
                if d:
                    p = p * bcast_rows(plgpu.load(cm_s.at[d - 1], layout=ROWS), shape)
                hi = p.astype(dt)
                p_hi[...] = hi
                p_lo[...] = (p - hi.astype(F32)).astype(dt)
                plgpu.commit_smem()
                sel = jnp.where(ii == W - 1 - d, 1.0, 0.0).astype(dt)
                acc = mm([(sel, p_hi), (sel, p_lo)], shape, init=acc)
            return acc

        acc = pl.run_scoped(partials, smem((TT, bw), dt), smem((TT, bw), dt))

        def send(acc_s):   # in the SMEM of partials' spent tiles
            acc_s[...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(acc_s.at[pl.ds(0, 8)], dw_ref.at[b, t, h, j])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(send, smem((TT, bw), F32))

    scratch = [plgpu.SMEM((HALO + TT, bw + PAD), dt), smem((TT, bw), dt), plgpu.SMEM((W, bw + PAD), F32),
               plgpu.SMEM((W - 1, TT), F32), plgpu.Barrier(num_arrivals=5)]
    out_type = [jax.ShapeDtypeStruct((B, Tp, nk, nconv * bw + 64), dt),   # TMA: swizzled stores want 64s
                jax.ShapeDtypeStruct((B, NT, nk, nconv, 8, bw), F32)]    # rows W.. are zero
    f = mgpu.kernel(body, name="gdn_conv_bwd_da", out_type=out_type, scratch=scratch, grid=(B, NT, nk * nconv),
                    grid_names=("b", "t", "hj"))
    return f(xp, dq, dk, dv, wb, cm)


def _transposed_conv(da, dz, wb, cm, P, *, key_heads, key_dim, value_heads, value_dim):
    """d in_proj_qkvz [B, Tp, nk, P]: dx[t] = sum_d kernel[W-1-d] mask_d[t+d] da[t+d] in the conv blocks, dz in
    the z blocks."""
    B, Tp, nk, _ = da.shape
    bw, nq, nvb, nconv, nblk = _geometry(key_heads, key_dim, value_heads, value_dim)
    r = value_heads // key_heads
    W = wb.shape[2]
    dt = da.dtype
    shape = (TT, bw + PAD)

    def body(da_ref, dz_ref, w_ref, cm_ref, dx_ref, da_s, out_s, w_s, cm_s, bar_c, bar_z):
        b, t, hj = lax.axis_index("b"), lax.axis_index("t"), lax.axis_index("hj")
        h, j = lax.div(hj, nblk), lax.rem(hj, nblk)
        t0 = t * TT
        rows = pl.ds(t0, TT)
        dst = dx_ref.at[b, rows, h, pl.ds(j * bw, bw)]

        @pl.when(j >= nconv)
        def _():  # z's gradient passes through
            plgpu.copy_gmem_to_smem(_z_tile(dz_ref, j, b, rows, h, nconv=nconv, nvb=nvb, r=r, bw=bw), out_s, bar_z)
            plgpu.barrier_wait(bar_z)
            plgpu.copy_smem_to_gmem(out_s, dst)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(j < nconv)
        def _():
            cols = pl.ds(j * bw, bw + PAD)
            # Past the last CTA's tokens: the last 8 rows again, masked (cm is padded with a zero tile).
            after = jnp.minimum(t0 + TT, Tp - HALO)
            plgpu.copy_gmem_to_smem(da_ref.at[b, rows, h, cols], da_s.at[pl.ds(0, TT)], bar_c)
            plgpu.copy_gmem_to_smem(da_ref.at[b, pl.ds(after, HALO), h, cols], da_s.at[pl.ds(TT, HALO)], bar_c)
            plgpu.copy_gmem_to_smem(w_ref.at[h, j], w_s, bar_c)
            plgpu.copy_gmem_to_smem(cm_ref.at[b, :, pl.ds(t0, TT + HALO)], cm_s, bar_c)
            plgpu.barrier_wait(bar_c)

            def tap(d):
                x = plgpu.load(da_s.at[pl.ds(d, TT)], layout=WGMMA).astype(F32)
                return x * bcast_cols(plgpu.load(w_s.at[W - 1 - d], layout=COLS), shape)

            dx = tap(0)
            for d in range(1, W):
                dx = dx + tap(d) * bcast_rows(plgpu.load(cm_s.at[d - 1, pl.ds(d, TT)], layout=ROWS), shape)
            out_s[...] = dx[:, :bw].astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_s, dst)
            plgpu.wait_smem_to_gmem(0)

    scratch = [plgpu.SMEM((TT + HALO, bw + PAD), dt), smem((TT, bw), dt), plgpu.SMEM((W, bw + PAD), F32),
               plgpu.SMEM((W - 1, TT + HALO), F32), plgpu.Barrier(num_arrivals=4), plgpu.Barrier(num_arrivals=1)]
    out_type = jax.ShapeDtypeStruct((B, Tp, nk, P), dt)
    f = mgpu.kernel(body, name="gdn_conv_bwd_dx", out_type=out_type, scratch=scratch, grid=(B, Tp // TT, nk * nblk),
                    grid_names=("b", "t", "hj"))
    return f(da, dz, wb, cm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _split_conv(xp, kernel, cm, dims):
    return tuple(_forward(xp, _blocks(kernel, *dims, _geometry(*dims)[0]), cm, **_named(dims)))


def _split_conv_fwd(xp, kernel, cm, dims):
    return _split_conv(xp, kernel, cm, dims), (xp, kernel, cm)


def _split_conv_bwd(dims, res, cts):
    xp, kernel, cm = res
    bw = _geometry(*dims)[0]
    dq, dk, dv, dz = (c.astype(xp.dtype) for c in cts)
    wb = _blocks(kernel, *dims, bw)
    da, dwp = _grad_pre_activation(xp, dq, dk, dv, wb, cm, **_named(dims))
    dx = _transposed_conv(da, dz, wb, cm, xp.shape[-1], **_named(dims))
    dw = _unblocks(jnp.sum(dwp[..., :kernel.shape[0], :], axis=(0, 1)), dims[0], dims[1], bw)
    return dx, dw.astype(kernel.dtype), jnp.zeros_like(cm)


_split_conv.defvjp(_split_conv_fwd, _split_conv_bwd)


def _named(dims):
    return dict(zip(("key_heads", "key_dim", "value_heads", "value_dim"), dims))


def split_conv(qkvz, kernel, segment_ids=None, *, key_heads, key_dim, value_heads, value_dim):
    """reference.reference_split_conv on Hopper: q, k [B, T, nk, dk], v, z [B, T, nv, dv] in qkvz's dtype (the conv
    accumulates in fp32). Differentiable in qkvz and kernel (jax.custom_vjp)."""
    B, T = qkvz.shape[:2]
    Tp = -(-T // TT) * TT
    xp = jnp.pad(qkvz, ((0, 0), (0, Tp - T), (0, 0), (0, 0))) if Tp != T else qkvz
    # One zero tile past the end: the backward reads masks 8 rows past its CTA's tokens.
    cm = tap_masks(segment_ids, B, T, kernel.shape[0], Tp + TT).astype(F32)
    outs = _split_conv(xp, kernel, cm, (key_heads, key_dim, value_heads, value_dim))
    return tuple(o[:, :T] for o in outs) if Tp != T else outs
