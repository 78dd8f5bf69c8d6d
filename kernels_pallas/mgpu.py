"""What the Mosaic GPU (Hopper) kernels share: swizzled SMEM tiles, the WGMMA register layouts and their row /
column broadcasts, and the kernel builder, which runs every kernel through Pallas' GPU interpreter
when INTERPRET is set (the CPU tests set it; the interpreter checks indexing and algebra, not the GPU lowering)."""
import functools

import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

WGMMA = plgpu.Layout.WGMMA
ROWS = plgpu.Layout.WGMMA.reduce(1)  # a [rows] vector of a WGMMA tile
COLS = plgpu.Layout.WGMMA.reduce(0)  # a [cols] vector of a WGMMA tile

INTERPRET = None  # tests on CPU may set plgpu.InterpretGPUParams()
F32 = jnp.float32


def smem(shape, dtype):
    """SMEM tile swizzled for TMA and WGMMA (minor dim = last dim)."""
    dtype = jnp.dtype(dtype)
    sw = plgpu.find_swizzle(shape[-1] * dtype.itemsize * 8)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, sw // dtype.itemsize)),
                                                plgpu.SwizzleTransform(sw)))


def bcast_rows(vec, shape):
    """A [rows] vector broadcast along the columns of a tile."""
    return lax.broadcast_in_dim(vec, shape, [0])


def bcast_cols(vec, shape):
    """A [cols] vector broadcast along the rows of a tile."""
    return lax.broadcast_in_dim(vec, shape, [1])


def kernel(body, *, name, out_type, scratch, grid, grid_names, num_threads=None):
    """The last grid axis is CUDA's x, launched fastest: kernels put there what should run side by side (what
    shares inputs through L2). With num_threads, that many warpgroups run the body, each finding its index as
    ``lax.axis_index("wg")``."""
    threads = {} if num_threads is None else dict(num_threads=num_threads, thread_name="wg")
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
                        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=INTERPRET,
                        kernel_name=name, **threads)


def iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)


def _issue(pairs, acc):
    for a, b in pairs:
        plgpu.wgmma(acc, a, b)


def _issue_and_read(pairs, acc):
    _issue(pairs, acc)
    return acc[...]


def mm(pairs, shape, init=None):
    """``init + sum(a @ b)`` on the tensor cores (a: registers or SMEM, b: SMEM); waited, then passed through an
    optimization barrier so no arithmetic on the result is scheduled before the wgmma wait."""
    if INTERPRET is not None:  # the GPU interpreter lacks run_state(ACC.init) and register A operands
        out = None
        for a, b in pairs:
            try:
                t = jnp.dot(a.astype(F32), b[...].astype(F32))
            except AttributeError:  # a is an SMEM ref
                t = pl.run_scoped(functools.partial(_issue_and_read, [(a, b)]), plgpu.ACC(shape, F32))
            out = t if out is None else out + t
        return out if init is None else init + out
    if init is None:
        out = pl.run_scoped(functools.partial(_issue_and_read, pairs), plgpu.ACC(shape, F32))
    else:
        out = pl.run_state(functools.partial(_issue, pairs))(plgpu.ACC.init(init))
    return lax.optimization_barrier(out)
