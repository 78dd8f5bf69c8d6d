"""Gated DeltaNet as Mosaic TPU Pallas kernels: chunked forward, and a backward kernel behind jax.custom_vjp.

The math is chunked.py's (read its docstring first). Per (batch, value head) the grid walks the chunks in order,
carrying the fp32 state S [K, V] in VMEM; per chunk, with q, k L2-normalised (q scaled), gc the in-chunk cumulative
sum of g, g(j, i] = gc_i - gc_j the sum of g over positions j < t <= i, and doc the in-chunk count of document starts:

    D[i, j]  = exp(g(j, i]) for j <= i in the same document, else 0                  (decay between tokens)
    G[i]     = exp(gc_i) while no document started in the chunk up to i, else 0    (decay of the carried-in S0)
    E[j]     = exp(g(j, last]) if j is in the chunk's last document, else 0         (decay from j to the chunk end)
    A        = strict_lower(beta_i (k_i . k_j) D[i, j]),   Tinv = (I + A)^-1
    u        = Tinv (beta v),   w = Tinv (beta G k),   delta = u - w S0            (the delta-rule updates)
    o        = (G q) S0 + ((q k^T) * D) delta
    S1       = G_last S0 + (E k)^T delta

Backward (reverse chunk order, dS carried in VMEM): the chunk states S0 are recomputed by the forward kernel in
state-only mode rather than saved by the forward pass, so a training step holds no [B, HV, N, K, V] residual
between forward and backward, only transiently inside the backward. Within a chunk everything else (norms, D, Tinv,
u, w) is recomputed from the inputs, and the adjoints of the formulas above are taken by hand.

Decisions:
- GVA: the grid runs over value heads and the q/k index_map picks key head j // r; q and k are never repeated.
  dq, dk come out per value head (fp32) and the wrapper sums each group of r.
- Fused in the kernel: the fp32 L2 norm and scale of q, k (and their backward), the gate sums and exps, the
  document masks. The document-start counts and the padding of T to a multiple of the chunk are tiny XLA ops in the
  wrapper.
- Gate sums: g(j, i] is not taken as gc_i - gc_j. Under strong decay gc runs to -100s within a chunk and the fp32
  difference of two such numbers loses the small sums that matter (near-diagonal D entries): 1e-5 relative error in
  o and dg at g ~ -10 per token. Instead every g(j, i] is summed from its own terms by one (C, C) x (C, C) matmul
  of 0/1 masks with g (exact products at HIGHEST), and dg comes out of the kernel the same way (no reverse cumsum
  of large cancelling terms); this is about 10x more accurate there than the pure-JAX chunked form.
- Layout: [B, T, heads, D] is viewed as [B, T, heads * D] (free) when D is a multiple of 128, so a block is a
  (C, D) slab of one head; otherwise (D = 64) it is transposed to [B, heads, T, D], because Mosaic blocks need their
  last two dims divisible by (8, 128) or whole. Per-token vectors (g, beta, doc) travel as (1, C) rows; where a
  column is needed it is made in-kernel by a diagonal mask and a lane reduction (no 2D transposes of vectors).
- (I + A)^-1 is unit lower triangular: inverted exactly by merging diagonal blocks 1 -> 2 -> ... -> C with
  X <- X - X L X (see _unit_lower_inverse); all MXU work, no serial row loop, and no intermediate larger than the
  inverse itself (series of powers of A cancel catastrophically for correlated keys).
- Dot precision: fp32 inputs use fp32 operands at Precision.HIGHEST (6 bf16 passes) throughout. bf16 inputs feed
  the q/k/v/state products to the MXU as bf16 with fp32 accumulation (the state itself stays fp32 in VMEM; this is
  what FLA does with bf16 h, u, w), and the triangular inverse and the dots with it at Precision.HIGH (3 passes,
  about fp32 accuracy; FLA's are TF32): at HIGHEST they would be most of the kernel's MXU work.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwen3next_kernels.gdn.reference import document_starts
from qwen3next_kernels.registry import interpret_pallas_tpu

HIGHEST = jax.lax.Precision.HIGHEST
NORM_EPS = 1e-6


class Config(NamedTuple):  # static (hashable) parameters of one kernel call
    chunk: int
    group: int  # r = HV // H: value heads per key head
    use_qk_l2norm: bool
    scale: float
    mxu_precision: jax.lax.Precision  # of the q/k/v/state dots: HIGHEST (fp32 inputs) or DEFAULT (bf16 operands)
    solve_precision: jax.lax.Precision  # of the triangular inverse and the dots with it: HIGHEST or HIGH
    interpret: bool


# ----------------------------------------------------------------------------------------------------------------
# In-kernel helpers (operate on loaded 2D values)


def _dot(a, b, precision, *, ta=False, tb=False):
    """a @ b (a^T if ta, b^T if tb) with fp32 accumulation. DEFAULT precision casts the operands to bf16 here, so
    the interpreter on CPU rounds them as the MXU does; HIGH / HIGHEST multiply fp32 operands in 3 / 6 bf16 passes."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    dtype = jnp.bfloat16 if precision == jax.lax.Precision.DEFAULT else jnp.float32
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                               preferred_element_type=jnp.float32)


def _eye_mask(n):
    return jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _col(row):
    """(1, C) -> (C, 1) through the diagonal: a mask and a lane reduction instead of a vector transpose."""
    n = row.shape[1]
    return jnp.sum(jnp.where(_eye_mask(n), row, 0.0), axis=1, keepdims=True)


def _row(col):
    """(C, 1) -> (1, C), as _col."""
    n = col.shape[0]
    return jnp.sum(jnp.where(_eye_mask(n), col, 0.0), axis=0, keepdims=True)


def _last(row):
    """(1, C) -> (1, 1): the chunk's last position."""
    n = row.shape[1]
    return row[:, n - 1:n]


def _masked_exp(x, keep):
    return jnp.where(keep, jnp.exp(jnp.where(keep, x, 0.0)), 0.0)


def _unit_lower_inverse(A, dot):
    """(I + A)^-1 for A (C, C) strictly lower triangular, C a power of two.

    Diagonal blocks are merged 1 -> 2 -> 4 ... -> C: with X the inverse of the block-diagonal part at size s and L
    the blocks just below the diagonal inside each 2s block, the inverse at size 2s is X - X L X (exact, since
    (I + X L)^2 = I + 2 X L). Every intermediate is the inverse of a principal sub-block, so nothing grows beyond the
    result; products of powers of A ((I - A)(I + A^2)...) reach entries of C(15, 8) = 6435 for correlated keys
    even in 16 x 16 blocks and lose fp32 accuracy to cancellation (1e-4 measured).
    """
    C = A.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    X = _eye_mask(C).astype(jnp.float32) - jnp.where((rows >> 1) == (cols >> 1), A, 0.0)   # size 2: I - A
    size = 4
    while size <= C:
        shift, half = size.bit_length() - 1, size // 2
        below = ((rows >> shift) == (cols >> shift)) & ((rows & (size - 1)) >= half) & ((cols & (size - 1)) < half)
        X = X - dot(X, dot(jnp.where(below, A, 0.0), X))
        size *= 2
    return X


class _Chunk(NamedTuple):
    """Per-chunk quantities shared by forward and backward: (C, *) fp32 values."""
    q: jax.Array | None  # normalised, scaled (C, K); None when not needed (state recompute)
    k: jax.Array  # normalised (C, K)
    q_inv: jax.Array | None  # rsqrt(sum q^2 + eps) (C, 1), for the norm's backward
    k_inv: jax.Array
    beta: jax.Array  # (C, 1)
    decay: jax.Array  # D (C, C)
    start: jax.Array  # G (C, 1)
    end: jax.Array  # E (C, 1)
    carry: jax.Array  # G_last (1, 1)
    kk: jax.Array  # k k^T (C, C)
    tinv: jax.Array  # (I + A)^-1 (C, C)
    x: jax.Array  # beta v (C, V)
    y: jax.Array  # beta G k (C, K)


def _gate_masks(C):
    """upto[i, t] = t <= i and after[j, t] = t > j, (C, C) bool."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    return cols <= rows, cols > rows


def _chunk_terms(q, k, v, g_row, beta_row, doc_row, cfg):
    """q (or None), k (C, K) and v (C, V) as stored; g, beta, doc (1, C) rows."""
    C = cfg.chunk

    def normalise(x):  # -> (x / |x|, 1 / |x|) in fp32, or (x, None) without the L2 norm
        x = x.astype(jnp.float32)
        if not cfg.use_qk_l2norm:
            return x, None
        inv = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + NORM_EPS)
        return x * inv, inv

    k, k_inv = normalise(k)
    q, q_inv = (None, None) if q is None else normalise(q)
    q = None if q is None else q * cfg.scale
    v = v.astype(jnp.float32)
    doc, beta = _col(doc_row), _col(beta_row)
    upto, after = _gate_masks(C)
    # g(j, i] = sum_t [t <= i] [t > j] g_t = ((upto * g) after^T)[i, j]: each entry summed from its own terms.
    gsum = _dot(jnp.where(upto, g_row, 0.0), after.astype(jnp.float32), HIGHEST, tb=True)  # (C, C)
    gc = jnp.sum(jnp.where(upto, g_row, 0.0), axis=1, keepdims=True)  # (C, 1)
    decay = _masked_exp(gsum, upto & (doc == doc_row))
    start = _masked_exp(gc, doc == 0.0)
    end = _masked_exp(_col(gsum[C - 1:C, :]), doc == _last(doc_row))
    carry = _masked_exp(jnp.sum(g_row, axis=1, keepdims=True), _last(doc_row) == 0.0)
    kk = _dot(k, k, cfg.mxu_precision, tb=True)
    strict = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0) > jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    solve_dot = functools.partial(_dot, precision=cfg.solve_precision)
    tinv = _unit_lower_inverse(jnp.where(strict, beta * kk * decay, 0.0), solve_dot)
    return _Chunk(q, k, q_inv, k_inv, beta, decay, start, end, carry, kk, tinv, beta * v, beta * start * k)


# ----------------------------------------------------------------------------------------------------------------
# Kernels. Grid (B, HV, N); the chunk axis is sequential ("arbitrary"), the state lives in a VMEM scratch.


def _forward_kernel(*refs, cfg, emit_output):
    """Forward over chunks. emit_output=False is the backward's recompute: it writes each chunk's incoming state
    instead of o."""
    if emit_output:
        q_ref, k_ref, v_ref, g_ref, beta_ref, doc_ref, h0_ref, o_ref, ht_ref, S_ref = refs
    else:
        k_ref, v_ref, g_ref, beta_ref, doc_ref, h0_ref, states_ref, S_ref = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        S_ref[...] = h0_ref[...].astype(jnp.float32)

    S0 = S_ref[...]  # (K, V) fp32
    q = q_ref[...] if emit_output else None
    c = _chunk_terms(q, k_ref[...], v_ref[...], g_ref[...], beta_ref[...], doc_ref[...], cfg)
    mm = functools.partial(_dot, precision=cfg.mxu_precision)
    solve_mm = functools.partial(_dot, precision=cfg.solve_precision)
    delta = solve_mm(c.tinv, c.x) - mm(solve_mm(c.tinv, c.y), S0)  # u - w S0, (C, V)
    if emit_output:
        P = mm(c.q, c.k, tb=True) * c.decay  # (C, C)
        o_ref[...] = (mm(c.q * c.start, S0) + mm(P, delta)).astype(o_ref.dtype)
    else:
        states_ref[...] = S0.astype(states_ref.dtype)
    S1 = c.carry * S0 + mm(c.k * c.end, delta, ta=True)
    S_ref[...] = S1

    if emit_output:
        @pl.when(n == pl.num_programs(2) - 1)
        def _():
            ht_ref[...] = S1


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, doc_ref, S0_ref, do_ref, dht_ref,
                     dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, dh0_ref, dS_ref, *, cfg):
    """Reverse walk over chunks (the index maps reverse n). dS_ref carries dL/d(state after this chunk)."""
    n = pl.program_id(2)
    C = cfg.chunk

    @pl.when(n == 0)
    def _():
        dS_ref[...] = dht_ref[...].astype(jnp.float32)

    dS1 = dS_ref[...]  # (K, V)
    S0 = S0_ref[...].astype(jnp.float32)
    v = v_ref[...].astype(jnp.float32)
    c = _chunk_terms(q_ref[...], k_ref[...], v, g_ref[...], beta_ref[...], doc_ref[...], cfg)
    mm = functools.partial(_dot, precision=cfg.mxu_precision)
    solve_mm = functools.partial(_dot, precision=cfg.solve_precision)
    w = solve_mm(c.tinv, c.y)
    delta = solve_mm(c.tinv, c.x) - mm(w, S0)
    qk = mm(c.q, c.k, tb=True)
    P = qk * c.decay
    do = do_ref[...].astype(jnp.float32)

    # o = (G q) S0 + P delta;   S1 = G_last S0 + (E k)^T delta
    dP = mm(do, delta, tb=True)  # (C, C)
    ddelta = mm(P, do, ta=True) + mm(c.k * c.end, dS1)  # (C, V)
    dq_start = mm(do, S0, tb=True)  # d(G q) (C, K)
    dk_end = mm(delta, dS1, tb=True)  # d(E k) (C, K)
    dcarry = jnp.sum(S0 * dS1, keepdims=True)  # (1, 1)
    # delta = Tinv x - (Tinv y) S0
    dw = -mm(ddelta, S0, tb=True)  # (C, K)
    dS0 = c.carry * dS1 + mm(c.q * c.start, do, ta=True) - mm(w, ddelta, ta=True)
    dx = solve_mm(c.tinv, ddelta, ta=True)
    dy = solve_mm(c.tinv, dw, ta=True)
    dtinv = solve_mm(ddelta, c.x, tb=True) + solve_mm(dw, c.y, tb=True)
    # Tinv = (I + A)^-1  =>  dA = -Tinv^T dTinv Tinv^T, on A's strictly lower support
    strict = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0) > jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    dA = jnp.where(strict, -solve_mm(solve_mm(c.tinv, dtinv, ta=True), c.tinv, tb=True), 0.0)
    # A = beta_i kk D (strict);  P = qk D
    dkk = dA * c.beta * c.decay
    dqk = dP * c.decay
    # dD * D = dL/d g(j, i] through D (the diagonal, g over an empty range, has none)
    dgsum = jnp.where(strict, (dA * c.beta * c.kk + dP * qk) * c.decay, 0.0)

    dq = mm(dqk, c.k) + dq_start * c.start
    dk = mm(dqk, c.q, ta=True) + mm(dkk, c.k) + mm(dkk, c.k, ta=True) + dk_end * c.end + dy * c.beta * c.start
    dv = dx * c.beta
    dbeta = (jnp.sum(dA * c.kk * c.decay, axis=1, keepdims=True) + jnp.sum(dx * v, axis=1, keepdims=True)
             + jnp.sum(dy * c.start * c.k, axis=1, keepdims=True))  # (C, 1)
    dstart = jnp.sum(dq_start * c.q, axis=1, keepdims=True) + jnp.sum(dy * c.beta * c.k, axis=1, keepdims=True)
    dend = jnp.sum(dk_end * c.k, axis=1, keepdims=True)
    # dg_t: D[i, j] holds g_t for j < t <= i, G[i] for t <= i, E[j] for t > j, G_last for every t.
    upto, after = _gate_masks(C)
    through_pairs = _dot(dgsum, after.astype(jnp.float32), HIGHEST)  # [i, t] = sum_j dgsum[i, j] [t > j]
    dg = (jnp.sum(jnp.where(upto, through_pairs + dstart * c.start, 0.0), axis=0, keepdims=True)
          + jnp.sum(jnp.where(after, dend * c.end, 0.0), axis=0, keepdims=True) + dcarry * c.carry)  # (1, C)

    # Undo the scale and L2 norm: y = x * inv  =>  dx = inv (dy - y (y . dy)).
    dq = dq * cfg.scale
    if cfg.use_qk_l2norm:
        q_unit = c.q / cfg.scale
        dq = c.q_inv * (dq - q_unit * jnp.sum(q_unit * dq, axis=1, keepdims=True))
        dk = c.k_inv * (dk - c.k * jnp.sum(c.k * dk, axis=1, keepdims=True))

    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dg_ref[...] = dg
    dbeta_ref[...] = _row(dbeta)
    dS_ref[...] = dS0

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = dS0


# ----------------------------------------------------------------------------------------------------------------
# Wrapper: layouts, padding and block specs.


def _to_kernel_layout(x):
    """[B, T, heads, D] -> [B, T, heads * D] (a free view) if D % 128 == 0, else [B, heads, T, D]."""
    B, T, nh, D = x.shape
    return x.reshape(B, T, nh * D) if D % 128 == 0 else x.transpose(0, 2, 1, 3)


def _from_kernel_layout(x, nh, D):
    if D % 128 == 0:
        B, T, _ = x.shape
        return x.reshape(B, T, nh, D)
    return x.transpose(0, 2, 1, 3)


def _token_spec(C, D, head, chunk):
    """Block of one head's chunk, (C, D), of a tensor in _to_kernel_layout; head(j), chunk(n) map grid indices."""
    if D % 128 == 0:
        return pl.BlockSpec((None, C, D), lambda b, j, n: (b, chunk(n), head(j)))
    return pl.BlockSpec((None, None, C, D), lambda b, j, n: (b, head(j), chunk(n), 0))


class _Prepared(NamedTuple):
    q: jax.Array  # kernel layout, padded
    k: jax.Array
    v: jax.Array
    g: jax.Array  # [B, HV, N, 1, C] fp32
    beta: jax.Array  # [B, HV, N, 1, C] fp32
    doc: jax.Array  # [B, N, 1, C] fp32 in-chunk count of document starts


def _prepare(q, k, v, g, beta, segment_ids, C):
    B, T, H, K = q.shape
    HV = v.shape[2]
    pad = -T % C
    N = (T + pad) // C
    # Padded tokens have k = 0, beta = 0, g = 0 and start no document: they neither write nor decay the state.
    pad_tokens = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    def rows(x):  # [B, T, HV] -> [B, HV, N, 1, C]
        return pad_tokens(x.astype(jnp.float32)).reshape(B, N, C, HV).transpose(0, 3, 1, 2)[:, :, :, None, :]

    starts = pad_tokens(document_starts(segment_ids, B, T)).reshape(B, N, C)
    doc = jnp.cumsum(starts.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B, N, 1, C]
    return _Prepared(*(_to_kernel_layout(pad_tokens(x)) for x in (q, k, v)), rows(g), rows(beta), doc)


def _specs(p, K, V, cfg, reverse):
    """Block specs of the prepared inputs for grid (B, HV, N), walking chunks backwards if reverse."""
    C, r = cfg.chunk, cfg.group
    N = p.g.shape[2]
    chunk = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    key_head, value_head = (lambda j: j // r), (lambda j: j)
    vec = pl.BlockSpec((None, None, None, 1, C), lambda b, j, n: (b, j, chunk(n), 0, 0))
    return dict(
        q=_token_spec(C, K, key_head, chunk), k=_token_spec(C, K, key_head, chunk),
        v=_token_spec(C, V, value_head, chunk), g=vec, beta=vec,
        doc=pl.BlockSpec((None, None, 1, C), lambda b, j, n: (b, chunk(n), 0, 0)),
        state=pl.BlockSpec((None, None, K, V), lambda b, j, n: (b, j, 0, 0)),
        chunk_state=pl.BlockSpec((None, None, None, K, V), lambda b, j, n: (b, j, chunk(n), 0, 0)),
        dqk_head=_token_spec(C, K, value_head, chunk),
    )


def _params(cfg):
    return dict(
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
    )


def _forward(cfg, p, h0, K, V, emit_output):
    B, HV = h0.shape[:2]
    N = p.g.shape[2]
    s = _specs(p, K, V, cfg, reverse=False)
    state = jax.ShapeDtypeStruct((B, HV, K, V), jnp.float32)
    kernel = functools.partial(_forward_kernel, cfg=cfg, emit_output=emit_output)
    inputs = [p.k, p.v, p.g, p.beta, p.doc, h0]
    in_specs = [s["k"], s["v"], s["g"], s["beta"], s["doc"], s["state"]]
    if emit_output:
        inputs, in_specs = [p.q] + inputs, [s["q"]] + in_specs
        out_shape = (jax.ShapeDtypeStruct(p.v.shape, p.v.dtype), state)
        out_specs = (s["v"], s["state"])
    else:
        # bf16 runs only ever use S0 as a bf16 MXU operand: store it so, halving the backward's largest buffer.
        states_dtype = jnp.float32 if cfg.mxu_precision == HIGHEST else jnp.bfloat16
        out_shape = jax.ShapeDtypeStruct((B, HV, N, K, V), states_dtype)
        out_specs = s["chunk_state"]
    return pl.pallas_call(
        kernel, grid=(B, HV, N), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)], **_params(cfg),
    )(*inputs)


def _backward(cfg, p, h0, states, do, dht, K, V):
    B, HV = h0.shape[:2]
    N = p.g.shape[2]
    s = _specs(p, K, V, cfg, reverse=True)
    Tp = N * cfg.chunk
    dqk_shape = (B, Tp, HV * K) if K % 128 == 0 else (B, HV, Tp, K)
    vec = jax.ShapeDtypeStruct(p.g.shape, jnp.float32)
    out_shape = (jax.ShapeDtypeStruct(dqk_shape, jnp.float32), jax.ShapeDtypeStruct(dqk_shape, jnp.float32),
                 jax.ShapeDtypeStruct(p.v.shape, p.v.dtype), vec, vec,
                 jax.ShapeDtypeStruct((B, HV, K, V), jnp.float32))
    out_specs = (s["dqk_head"], s["dqk_head"], s["v"], s["g"], s["beta"], s["state"])
    return pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg), grid=(B, HV, N),
        in_specs=[s["q"], s["k"], s["v"], s["g"], s["beta"], s["doc"], s["chunk_state"], s["v"], s["state"]],
        out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)], **_params(cfg),
    )(p.q, p.k, p.v, p.g, p.beta, p.doc, states, do, dht)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdn(cfg, q, k, v, g, beta, h0, segment_ids):
    return _gdn_fwd(cfg, q, k, v, g, beta, h0, segment_ids)[0]


def _gdn_fwd(cfg, q, k, v, g, beta, h0, segment_ids):
    T, K, (HV, V) = q.shape[1], q.shape[3], v.shape[2:]
    p = _prepare(q, k, v, g, beta, segment_ids, cfg.chunk)
    o, ht = _forward(cfg, p, h0, K, V, emit_output=True)
    o = _from_kernel_layout(o, HV, V)[:, :T]
    return (o, ht), (q, k, v, g, beta, h0, segment_ids)


def _gdn_bwd(cfg, residuals, cotangents):
    q, k, v, g, beta, h0, segment_ids = residuals
    do, dht = cotangents
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    C = cfg.chunk
    p = _prepare(q, k, v, g, beta, segment_ids, C)
    states = _forward(cfg, p, h0, K, V, emit_output=False)  # [B, HV, N, K, V]: the state entering each chunk
    do = _to_kernel_layout(jnp.pad(do.astype(v.dtype), ((0, 0), (0, -T % C), (0, 0), (0, 0))))
    dq, dk, dv, dg, dbeta, dh0 = _backward(cfg, p, h0, states, do, dht.astype(jnp.float32), K, V)

    def per_key_head(x):  # kernel layout per value head -> [B, T, H, K], summing each group of r value heads
        x = _from_kernel_layout(x, HV, K)[:, :T]  # [B, T, HV, K]
        return x.reshape(B, T, H, cfg.group, K).sum(axis=3)

    def per_token(x):  # [B, HV, N, 1, C] -> [B, T, HV]
        return x[:, :, :, 0, :].reshape(B, HV, -1).transpose(0, 2, 1)[:, :T]

    return (per_key_head(dq).astype(q.dtype), per_key_head(dk).astype(k.dtype),
            _from_kernel_layout(dv, HV, V)[:, :T], per_token(dg).astype(g.dtype),
            per_token(dbeta).astype(beta.dtype), dh0.astype(h0.dtype), None)


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Public interface (the registry's "gdn" family: kernels_pallas/registry.py)

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_CHUNKS = (32, 64, 128)
SUPPORTED_DTYPES = ("float32", "bfloat16")


def supports(platform, site):
    """True for the calls the tests cover, on a TPU: head dims 64/128/256, chunk 32/64/128, fp32 or bf16."""
    return (platform.backend == "tpu" and site["key_dim"] in SUPPORTED_HEAD_DIMS
            and site["value_dim"] in SUPPORTED_HEAD_DIMS and site.get("chunk_size", 64) in SUPPORTED_CHUNKS
            and site["dtype"] in SUPPORTED_DTYPES)


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None, use_qk_l2norm=True, scale=None,
                     chunk_size=64, interpret=None):
    """The dispatch's gated_delta_rule on Mosaic TPU. interpret: run the kernels in the Pallas interpreter;
    default: when not traced for TPU chips (registry.interpret_pallas_tpu: CPU tests interpret, an ahead-of-time
    compile for a TPU topology from a CPU host lowers through Mosaic)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    if chunk_size < 2 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two; got {chunk_size}")
    if interpret is None:
        interpret = interpret_pallas_tpu()
    fp32 = v.dtype == jnp.float32
    cfg = Config(chunk=chunk_size, group=HV // H, use_qk_l2norm=use_qk_l2norm,
                 scale=float(K**-0.5 if scale is None else scale),
                 mxu_precision=HIGHEST if fp32 else jax.lax.Precision.DEFAULT,
                 solve_precision=HIGHEST if fp32 else jax.lax.Precision.HIGH, interpret=interpret)
    h0 = jnp.zeros((B, HV, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    if segment_ids is None:
        segment_ids = jnp.zeros((B, T), jnp.int32)
    return _gdn(cfg, q, k, v, g, beta, h0, segment_ids)
