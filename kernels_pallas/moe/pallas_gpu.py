"""reference.expert_mlp on Hopper: JAX's own Mosaic GPU grouped matmuls, forward and backward, under one custom VJP.

JAX 0.11.2 ships two persistent Mosaic GPU kernels (jax.experimental.pallas.ops.gpu): `ragged_dot` (rows grouped by
expert times that expert's weights, optionally transposed) and `transposed_ragged_dot` (per group, lhs_g^T rhs_g:
the weight gradient). The expert MLP is five of them:

    forward   h = x W_gu                [M, 2F]   gate and up as one product (W_gu = [gate | up], [E, D, 2F])
              a = silu(h_gate) * h_up   [M, F]    (XLA, elementwise)
              y = a W_down              [M, D]
    backward  da = dy W_down^T          ragged_dot with the weights transposed in the kernel
              dW_down = a^T dy          transposed_ragged_dot, per expert
              dh = (da * u * silu'(g) | da * silu(g))
              dx = dh W_gu^T            ragged_dot, transposed
              dW_gu = x^T dh            transposed_ragged_dot

The kernels write only rows inside the groups. Rows past sum(group_sizes) are masked to zero in what the
weight-gradient products read (a and dy; x is the caller's, dh is masked): transposed_ragged_dot drops the rows of a
group's last block that are not the group's by multiplying its lhs by a 0/1 mask, so a NaN in either operand there
would reach the sum. The output y and the input gradient dx are left as the kernels wrote them, unspecified there
(the family's contract, moe/reference.py): masking them cost passes over [M, D] (dx's, 0.25 ms a layer at the bench
shape) for rows that every caller selects away. The TMA tiles need the row count to be a multiple of 8: other
counts are padded with zero rows. The kernels take bf16 (or fp16) operands, accumulate in fp32 and store in the operand dtype. Each of the six products
has its own block shape, the fastest of a sweep at the bench shape on an H200 (benchmarks/moe.py --tune).
"""
import functools

import jax
import jax.numpy as jnp

# Block shapes per product: (block_m, block_n, block_k, max_concurrent_steps, grid_block_n).
BLOCKS = {  # measured at the bench shape on an H200, 2026-12-02 (benchmarks/RESULTS.md)
    "gate_up": (128, 128, 64, 5, 4),     # x W_gu
    "down": (128, 128, 64, 4, 8),        # a W_down
    "d_down": (128, 128, 64, 5, 4),      # dy W_down^T
    "d_gate_up": (128, 128, 64, 4, 8),   # dh W_gu^T
    "w_down": (128, 128, 64, 6, 1),      # a^T dy
    "w_gate_up": (128, 128, 64, 5, 4),   # x^T dh
}
BLOCK_FIELDS = ("block_m", "block_n", "block_k", "max_concurrent_steps", "grid_block_n")


def supports(platform, site):
    """A Hopper GPU, bf16 or fp16, hidden size and expert width multiples of 128 (the kernels' 128-wide blocks)."""
    return (platform.is_hopper and site["dtype"] in ("bfloat16", "float16") and site["hidden"] % 128 == 0
            and site["width"] % 128 == 0)


def _mosaic_ops():
    """(ragged_dot(role, lhs, rhs, group_sizes, transpose_rhs), weight_grad(role, lhs, rhs, group_sizes))."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    blocks = lambda role: dict(zip(BLOCK_FIELDS, BLOCKS[role]))

    def ragged(role, lhs, rhs, group_sizes, transpose_rhs=False):
        return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, transpose_rhs=transpose_rhs,
                                          **blocks(role))

    def weight_grad(role, lhs, rhs, group_sizes):
        return transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs, rhs, group_sizes=group_sizes, **blocks(role))

    return ragged, weight_grad


def _rows_in_groups(x, group_sizes):
    """x with the rows past sum(group_sizes) zeroed (the kernels leave them unwritten: any value, NaN included)."""
    inside = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(inside[:, None], x, jnp.zeros((), x.dtype))


def _silu_glu(h):
    g, u = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(g) * u


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mlp(x, w_gu, w_down, group_sizes, ops):
    return _mlp_fwd(x, w_gu, w_down, group_sizes, ops)[0]


def _mlp_fwd(x, w_gu, w_down, group_sizes, ops):
    ragged, _ = ops()
    h = ragged("gate_up", x, w_gu, group_sizes)                                        # [M, 2F]
    y = ragged("down", _silu_glu(h), w_down, group_sizes)                                # [M, D]
    return y, (x, w_gu, w_down, group_sizes, h)


def _mlp_bwd(ops, res, dy):
    ragged, weight_grad = ops()
    x, w_gu, w_down, group_sizes, h = res
    dy = _rows_in_groups(dy, group_sizes)
    h32 = h.astype(jnp.float32)
    g, u = jnp.split(h32, 2, axis=-1)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    a = _rows_in_groups((silu * u).astype(x.dtype), group_sizes)  # h is unwritten past the groups
    da = ragged("d_down", dy, w_down, group_sizes, transpose_rhs=True).astype(jnp.float32)    # [M, F]
    d_w_down = weight_grad("w_down", a, dy, group_sizes)                                      # [E, F, D]
    dh = jnp.concatenate([da * u * sig * (1 + g * (1 - sig)), da * silu], axis=-1).astype(x.dtype)
    dh = _rows_in_groups(dh, group_sizes)
    dx = ragged("d_gate_up", dh, w_gu, group_sizes, transpose_rhs=True)                       # [M, D]
    d_w_gu = weight_grad("w_gate_up", x, dh, group_sizes)                                     # [E, D, 2F]
    return dx, d_w_gu, d_w_down, None


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def expert_mlp(x, gate, up, down, group_sizes, *, ops=_mosaic_ops):
    """reference.expert_mlp. ops: where the grouped matmuls come from (the Mosaic GPU kernels; a test passes
    XLA's to check this module's algebra on a CPU)."""
    M = x.shape[0]
    pad = -M % 8
    x8 = jnp.pad(x, ((0, pad), (0, 0))) if pad else x                       # [M8, D]: whole TMA row tiles
    y = _mlp(x8, jnp.concatenate([gate, up], axis=-1), down, group_sizes.astype(jnp.int32), ops)
    return y[:M] if pad else y


def xla_ops():
    """The same two operations through jax.lax.ragged_dot (any backend): the oracle of the kernels' roles."""
    def ragged(role, lhs, rhs, group_sizes, transpose_rhs=False):
        return jax.lax.ragged_dot(lhs, jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs, group_sizes)

    def weight_grad(role, lhs, rhs, group_sizes):
        dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                                 lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, ragged_dot_dimension_numbers=dims)

    return ragged, weight_grad
