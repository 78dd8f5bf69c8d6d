"""exchange.py's row exchange with jax.lax.ragged_all_to_all: only the rows sent move, straight from the rows in
destination order into the receivers' slot blocks (no padded send buffer), and back.

Taken by "auto" on TPU only, where this project checks it by ahead-of-time compilation. JAX 0.11.2 does not
implement ragged-all-to-all on XLA:CPU; on GPUs it is known to fault at scale (openxla/xla#47283, more than 32 ranks
in one NVLink domain) and jax-linear-attention reports illegal addresses on H100s: there it is taken only by name.

ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes): this device sends
operand[input_offsets[j] : + send_sizes[j]] to device j, where it lands at output_offsets[j] of j's output;
recv_sizes[i] is what arrives from device i; the rest of `output` keeps its value (here zeros).
"""
import jax
import jax.numpy as jnp


def supports(platform, site):
    return platform.backend == "tpu"


def ragged_exchange(rows, send_sizes, *, capacity: int, axis_name: str, axis_size: int):
    R, D = rows.shape
    n, C = axis_size, capacity
    me = jax.lax.axis_index(axis_name)
    a2a = lambda v: jax.lax.all_to_all(v, axis_name, 0, 0, tiled=True)  # [n]: entry j to device j, i from i
    starts = jnp.cumsum(send_sizes) - send_sizes  # where each destination's rows start in `rows`
    sent = jnp.minimum(send_sizes, C).astype(jnp.int32)
    received_sizes = a2a(sent)  # rows from each source
    block = jnp.arange(n, dtype=jnp.int32) * C  # where each source's slot block starts in a receiver's buffer
    received = jax.lax.ragged_all_to_all(
        rows, jnp.zeros((n * C, D), rows.dtype), starts.astype(jnp.int32), sent,
        jnp.full((n,), me * C, jnp.int32), received_sizes, axis_name=axis_name)
    source_starts = a2a(starts.astype(jnp.int32))  # where the rows received from each source start in its rows

    def back(y):
        return jax.lax.ragged_all_to_all(y, jnp.zeros((R, D), y.dtype), block, received_sizes, source_starts, sent,
                                         axis_name=axis_name)

    return received, back
