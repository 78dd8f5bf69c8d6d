"""How the model runs, in one frozen record: compute and parameter dtypes, rematerialisation, the implementation of
each kernel family (gdn, conv, attention, moe, exchange, loss; qwen3next_kernels.registry) and the MoE's expert
capacity.

Each family's choice is "auto" or an implementation's name. The model resolves it per call site when it is built,
from the platform it is built for (default: the running one) and the site's shapes, so what "auto" became is fixed
for the model's life and can be read back with `resolved_kernels(model)`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_kernels.registry import FAMILIES, Platform

KERNEL_FAMILIES = ("gdn", "conv", "attention", "moe", "exchange", "loss")

# What each decoder layer keeps for the backward pass. "none" keeps everything, "full" recomputes the layer,
# "dots" keeps only matmul outputs without batch dimensions (projections), recomputing the rest. Both keep the
# MoE's routing (the values named ROUTING: router probabilities, top-k choices, the sort by expert), about 6 MB
# a layer at the bench shape: recomputing it costs two sorts a layer.
ROUTING = "moe_routing"
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.save_only_these_names(ROUTING),
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ROUTING)),
}


@dataclasses.dataclass(frozen=True)
class Execution:
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the weights' storage (fp32 masters to train)
    remat: Literal["none", "full", "dots"] = "none"
    gdn: str = "auto"
    conv: str = "auto"
    attention: str = "auto"
    moe: str = "auto"
    exchange: str = "auto"  # how expert parallelism moves rows over the mesh's expert axis: "ragged" or "padded"
    loss: str = "auto"
    # Under expert parallelism, each (source, destination) device pair exchanges at most
    # ceil(factor * tokens per device * top_k / expert-axis size) rows; the rest are dropped and counted (Aux.dropped).
    # 0: dropless (room for the worst case). Without an expert axis nothing is exchanged and nothing is dropped.
    moe_capacity_factor: float = 0.0

    def __post_init__(self):
        for family in KERNEL_FAMILIES:
            choice = getattr(self, family)
            if choice not in FAMILIES[family].choices:
                raise ValueError(f"unknown {family} implementation {choice!r}; choose one of "
                                 f"{FAMILIES[family].choices}")
        if not self.moe_capacity_factor >= 0:
            raise ValueError(f"moe_capacity_factor must be >= 0 (0: dropless); got {self.moe_capacity_factor!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {self.remat!r}; choose one of {list(REMAT_POLICIES)}")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be 'float32', 'bfloat16' or 'float16'; got {getattr(self, name)!r}")

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def params(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def resolve(self, family: str, site: dict, platform: Platform) -> str:
        return FAMILIES[family].resolve(getattr(self, family), site, platform)


def resolved_kernels(model) -> dict[str, dict[str, str]]:
    """{module path: {family: implementation}} for every call site of `model` (a stacked block counts once)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        kernels = getattr(node, "kernels", None)
        if isinstance(node, nnx.Module) and isinstance(kernels, dict):
            out[".".join(str(p) for p in path)] = dict(kernels)
    return out


def kernel_summary(model) -> dict[str, dict[str, int]]:
    """{family: {implementation: number of decoder call sites}}, stacked blocks counted once per layer."""
    repeats = model.model.layers.repeats
    summary: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path, kernels in resolved_kernels(model).items():
        n = repeats if path.startswith("model.layers.blocks.") else 1
        for family, impl in kernels.items():
            summary[family][impl] += n
    return {family: dict(counts) for family, counts in sorted(summary.items())}
