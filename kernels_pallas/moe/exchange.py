"""The expert-parallel row exchange (the registry's "exchange" family): its definition, and all_to_all of padded
blocks, which runs on every backend.

    received, back = exchange(rows, send_sizes, capacity=C, axis_name=a, axis_size=n)

is called inside jax.shard_map, on each of the n devices of mesh axis `a`:
- rows [R, D]: this device's rows in destination order: send_sizes[j] (int32 [n]) rows for device j, the blocks in
  the order j = 0..n-1; rows past sum(send_sizes) are not sent.
- received [n * C, D]: slot block i (rows i*C .. i*C + C - 1) holds the first min(send_sizes_i[j], C) rows that
  source i sent to this device j, in their order, then zeros. Rows of a block past C are not sent (the caller
  counts them as dropped).
- back(y [n * C, D]) -> [R, D], the way home: every row that was sent gets the row in the slot it was received
  into on its destination; rows not sent (past C, or past the sum) get zeros.
Both are linear in the rows and differentiable; the buffers are zero-initialised (jnp.zeros), never uninitialised
memory.

The padded form puts each destination's rows into a block of C rows and exchanges the blocks with one all_to_all:
it moves n * C rows each way whatever the counts are. The ragged form (ragged_exchange.py) moves only the rows.
"""
import jax
import jax.numpy as jnp

from qwen3next_kernels.moe.permute import permute


def slots(send_sizes, rows: int, capacity: int):
    """The padded layout [n * C] of rows [R] in destination order, both ways: (slot_row, slot_valid): the row that
    fills slot (j, c) and whether one does; (row_slot, row_sent): the slot of row r and whether it has one."""
    n, C = send_sizes.shape[0], capacity
    starts = jnp.cumsum(send_sizes) - send_sizes
    c = jnp.arange(C, dtype=jnp.int32)
    slot_row = (starts[:, None] + c).reshape(n * C)
    slot_valid = (c < send_sizes[:, None]).reshape(n * C)
    r = jnp.arange(rows, dtype=jnp.int32)
    dest = jnp.minimum(jnp.searchsorted(jnp.cumsum(send_sizes), r, side="right"), n - 1)
    pos = r - starts[dest]
    row_slot = dest * C + jnp.minimum(pos, C - 1)
    row_sent = (pos < C) & (r < jnp.sum(send_sizes))
    return (slot_row, slot_valid), (row_slot, row_sent)


def padded_exchange(rows, send_sizes, *, capacity: int, axis_name: str, axis_size: int):
    R, D = rows.shape
    n, C = axis_size, capacity
    (slot_row, slot_valid), (row_slot, row_sent) = slots(send_sizes, R, C)

    def all_to_all(blocks):  # [n * C, D]: block j goes to device j, block i comes from device i
        return jax.lax.all_to_all(blocks.reshape(n, C, D), axis_name, 0, 0, tiled=True).reshape(n * C, D)

    received = all_to_all(permute(rows, slot_row, row_slot, slot_valid, row_sent))

    def back(y):
        return permute(all_to_all(y), row_slot, slot_row, row_sent, slot_valid)

    return received, back
