"""Logical axis names to mesh axes: one rules table, and a model created already sharded.

Every parameter carries logical axis names (`logical_axes` metadata, see layers.param). The mesh has the named axes
MESH_AXES; RULES maps each logical name to a mesh axis (or None: replicated). Parameters stacked over the scanned
layer repeats get a leading "layers" axis. A dimension that its mesh axis does not divide stays replicated, so any
mesh shape is legal; the rules decide only what is worth splitting.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor", "context")

RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "gdn_heads": "tensor",
    "gdn_value_heads": None,
    "conv": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "mtp_concat": "fsdp",
    "norm": None,
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": "context",
}


def make_mesh(devices=None, *, slices: int = 1, **axis_sizes: int) -> Mesh:
    """A mesh over MESH_AXES; unnamed axes have size 1 and one axis may be -1 (all remaining devices).

    Devices are placed by jax's mesh_utils: along the physical interconnect on TPUs (so an axis's neighbours are
    ICI neighbours), by device id on GPUs, in the given order elsewhere. `slices` > 1 splits the devices into that
    many granules joined by the data-centre network (TPU slices, or processes where all devices are in one slice) and
    lays the data axis across them outermost: each granule holds data / slices of it and every other axis whole.
    """
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    devices = list(np.asarray(jax.devices() if devices is None else devices).flat)
    sizes = [axis_sizes.get(a, 1) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    if slices == 1:
        return Mesh(mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True), MESH_AXES)
    data = MESH_AXES.index("data")
    if sizes[data] % slices:
        raise ValueError(f"the data axis ({sizes[data]} devices) must be a multiple of slices ({slices}): it is the "
                         "axis split across them")
    multislice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
    granule = "slice_index" if multislice else "process_index"
    found = len({getattr(d, granule) for d in devices})
    if found != slices:
        raise ValueError(f"slices is {slices} but the devices form {found} granule(s) by {granule}")
    per_granule = [s // slices if i == data else s for i, s in enumerate(sizes)]
    across = [slices if i == data else 1 for i in range(len(sizes))]
    grid = mesh_utils.create_hybrid_device_mesh(per_granule, across, devices, allow_split_physical_axes=True,
                                                process_is_granule=granule == "process_index")
    return Mesh(grid, MESH_AXES)


def logical_to_spec(axes, shape, mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec for an array of `shape` whose dimensions have logical names `axes`."""
    spec, used = [], set()
    for name, size in zip(axes, shape):
        mesh_axes = rules.get(name) if name is not None else None
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        n = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or size % n:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """x laid out over the context mesh as its logical axes name (RULES), where the axes divide its dimensions:
    pins activations at block boundaries, so XLA's propagation cannot drift into gathering them. Without a context
    mesh of several devices, x itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def per_shard(fn, in_axes, out_axes, *, sequence: bool = False):
    """`fn` run on each device's shard (jax.shard_map) under the context mesh (`jax.set_mesh`, `in_mesh`), for ops
    XLA cannot partition: Pallas kernels are opaque custom calls, whose operands XLA would otherwise gather onto every
    device.

    in_axes / out_axes give each argument's / result's logical axis names (a pytree of tuples matching fn's
    arguments / results; None for an argument that is None); RULES maps them to mesh axes, as for parameters, where
    the axis divides the dimension. `fn` sees the per-shard shapes. A result whose out_axes entry is SUMMED is a
    partial sum on each shard (a weight's gradient over the shard's tokens): it is added up over the mesh axes that
    split the arguments and comes back whole. Without a context mesh of several devices, `fn` itself.

    sequence=True: fn mixes tokens along its "seq" dimensions (all of one length) and takes a keyword `seq_axis`:
    None where it sees whole sequences, else the mesh axis they are split over in order (context parallelism: shard
    i of n holds tokens [i T/n, (i + 1) T/n)), across which fn must then combine by collectives. Its results'
    shapes must not depend on seq_axis: they are read from fn(*args, seq_axis=None) on the whole arrays."""
    def wrapped(*args):
        mesh = jax.sharding.get_abstract_mesh()
        whole = functools.partial(fn, seq_axis=None) if sequence else fn
        if mesh.empty or mesh.size == 1:
            return whole(*args)
        out_shapes = jax.eval_shape(whole, *args)
        is_axes = lambda x: x is SUMMED or isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)
        spec = lambda axes, x: P() if axes is SUMMED else logical_to_spec(axes, x.shape, mesh)
        in_specs = tuple(None if a is None else jax.tree.map(spec, ax, a, is_leaf=is_axes)
                         for ax, a in zip(in_axes, args))
        out_specs = jax.tree.map(spec, out_axes, out_shapes, is_leaf=is_axes)
        split = tuple(sorted({name for s in jax.tree.leaves(in_specs, is_leaf=lambda x: isinstance(x, P))
                              for entry in s if entry for name in ((entry,) if isinstance(entry, str) else entry)}))
        body = fn
        if sequence:
            seq_axes = {split for ax, a in zip(in_axes, args) if a is not None
                        for names, x in zip(jax.tree.leaves(ax, is_leaf=is_axes), jax.tree.leaves(a))
                        for name, split in zip(names, spec(names, x)) if name == "seq"}
            if len(seq_axes) > 1:
                raise ValueError(f"the arguments' seq dimensions split differently over the mesh: {seq_axes}")
            body = functools.partial(fn, seq_axis=seq_axes.pop() if seq_axes else None)
        if split and any(ax is SUMMED for ax in jax.tree.leaves(out_axes, is_leaf=is_axes)):
            body = _sum_over(body, out_axes, split, is_axes)
        # check_vma=False: the kernels and the chunked op's scans are not annotated for shard_map's
        # varying-across-devices types (a zero initial state is not "varying"); the specs say what varies.
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
    return wrapped


SUMMED = "summed over the shards"  # an out_axes entry of per_shard


def _sum_over(fn, out_axes, mesh_axes, is_axes):
    def summed(*args, **kwargs):
        return jax.tree.map(lambda ax, x: jax.lax.psum(x, mesh_axes) if ax is SUMMED else x,
                            out_axes, fn(*args, **kwargs), is_leaf=is_axes)
    return summed


def in_mesh(mesh: Mesh, fn):
    """fn called with `mesh` as the context mesh, so that the per_shard ops inside see it when jit traces fn."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)
    return call


def _variable_axes(variable: nnx.Variable) -> tuple:
    axes = tuple(variable.get_metadata().get("logical_axes", ()))
    extra = len(variable.get_value().shape) - len(axes)
    return ("layers",) * extra + axes  # stacked over the scanned repeats


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
    """The same tree as `state`, each variable's value replaced by its NamedSharding."""
    def one(v):
        return v.replace(NamedSharding(mesh, logical_to_spec(_variable_axes(v), v.get_value().shape, mesh, rules)))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_model, mesh: Mesh, rules=RULES):
    """Build `make_model()` with every parameter created directly in its shard (never whole on one host)."""
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(make_model())

    return nnx.merge(graphdef, init())
