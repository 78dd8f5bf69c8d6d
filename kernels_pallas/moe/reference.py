"""The experts' SwiGLU MLP over rows grouped by expert, with jax.lax.ragged_dot: the definition.

x [M, D] holds rows grouped by expert in expert order, group_sizes [E] (int32) how many rows each expert has
(summing to at most M); gate, up [E, D, F] and down [E, F, D] in x's dtype. Row m of expert e gives
down[e]^T (silu(gate[e]^T x_m) * up[e]^T x_m). Returns [M, D] in x's dtype.

Rows past sum(group_sizes) belong to no expert (expert parallelism's receive buffers end in them). Their outputs
and input gradients are unspecified: ragged_dot gives zeros, the tiled form computes them with the last expert, a
kernel may leave them unwritten (any value, NaN included). The contract every implementation keeps
(tests/test_moe_parallel.py checks it): given finite values there and zero cotangents for them, the real rows'
outputs, the real rows' input gradients and the weight gradients are what they are without those rows. Callers
select the unspecified rows away, forward and backward (jnp.where, not a multiply: moe/permute.py).

ragged_dot is native on TPU. Elsewhere JAX 0.11 lowers it by expanding the rows to [experts, rows, features]
(126 GiB of temporaries for one bench-1p3b MoE layer at 16K tokens, forward + backward, on the CPU).
"""
import jax


def supports(platform, site):
    return platform.backend == "tpu"


def swiglu(matmul, x, gate, up, down, group_sizes):
    """The expert MLP from any grouped matmul (x [M, D], w [E, D, F], group_sizes) -> [M, F]."""
    h = jax.nn.silu(matmul(x, gate, group_sizes)) * matmul(x, up, group_sizes)
    return matmul(h, down, group_sizes)


def expert_mlp(x, gate, up, down, group_sizes):
    return swiglu(jax.lax.ragged_dot, x, gate, up, down, group_sizes)
