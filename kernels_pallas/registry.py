"""The one registry of implementations: every family of ops the model runs, each op with its implementations in
order of preference, the last of which runs anywhere (slower, never wrong).

An implementation is a function named "module:function" with its family's semantics (the family's reference
implementation documents them), imported only when the family resolves or calls it. Its module may also define

    supports(platform: Platform, site: Mapping) -> bool

a pure function of the platform and the call site's facts (shapes and dtype, listed per family below): True only
for what its tests cover. A module without supports() takes every call.

`Family.resolve(choice, site, platform)` turns "auto" into the first implementation that auto may pick and whose
supports() accepts; a named choice is taken as asked. Because it looks at nothing but its arguments, a CPU test can
check what any backend would get, and the model resolves each call site once, when it is built
(qwen3next_jax.execution).

Families and the facts of their call sites:
- gdn, the gated delta rule: key_heads, value_heads, key_dim, value_dim, dtype, chunk_size
- conv, the Gated DeltaNet input conv: key_heads, key_dim, value_heads, value_dim, taps, dtype
- attention, causal attention within documents: heads, kv_heads, head_dim, dtype
- moe, the experts' SwiGLU MLP over rows grouped by expert: experts, hidden, width, dtype
- exchange, the expert-parallel row exchange over the mesh's expert axis (moe/exchange.py): experts, hidden, dtype
- loss, the LM head's cross entropy: hidden, vocab, dtype
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Callable, Mapping

import jax

HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")  # compute capability 9.0


@dataclasses.dataclass(frozen=True)
class Platform:
    """Where a model will run: jax.default_backend() ("cpu", "gpu", "tpu") and the device kind ("NVIDIA H200",
    "TPU v5p", ...). Building for another platform than the running one (ahead-of-time compilation for TPU from a
    CPU host) passes it explicitly."""
    backend: str
    device_kind: str = ""

    @classmethod
    def current(cls) -> "Platform":
        return cls(jax.default_backend(), jax.devices()[0].device_kind)

    @property
    def is_hopper(self) -> bool:
        return self.backend == "gpu" and any(kind in self.device_kind for kind in HOPPER_KINDS)


def traced_backend() -> str:
    """The backend the computation being traced is for: the platform of the context mesh's devices (`jax.set_mesh`;
    inside `shard_map`, its mesh), else jax.default_backend(). They differ when a CPU host traces for TPU chips
    (ahead-of-time compilation on a libtpu topology): a kernel that asked default_backend() would run in the Pallas
    interpreter there, a loop of XLA ops instead of the Mosaic kernel the chips will run."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def interpret_pallas_tpu() -> bool:
    """Whether a Pallas TPU kernel traced now runs in the interpreter: only when it is not traced for TPU chips."""
    return traced_backend() != "tpu"


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    target: str  # "module:function"
    auto: bool = True  # False: taken only when asked for by name (a token-by-token oracle, say)

    @property
    def module(self):
        return _module(self.target.partition(":")[0])

    @property
    def function(self) -> Callable:
        return getattr(self.module, self.target.partition(":")[2])


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    impls: tuple[Impl, ...]  # in order of preference; the last takes every call

    @property
    def choices(self) -> list[str]:
        return ["auto", *(i.name for i in self.impls)]

    def _impl(self, name: str) -> Impl:
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise ValueError(f"unknown {self.name} implementation {name!r}; choose one of {self.choices}")

    def resolve(self, choice: str, site: Mapping, platform: Platform) -> str:
        """The implementation `choice` ("auto" or a name) stands for at a call site with these facts."""
        if choice != "auto":
            return self._impl(choice).name
        for impl in self.impls:
            if not impl.auto:
                continue
            try:
                supports = getattr(impl.module, "supports", None)
            except ImportError:  # not installed here (an optional dependency): not a candidate
                continue
            if supports is None or supports(platform, site):
                return impl.name
        raise AssertionError(f"the last {self.name} implementation must take every call")

    def function(self, name: str) -> Callable:
        return self._impl(name).function

    def call(self, choice: str, site: Mapping, *args, **kwargs):
        """Resolve on the running platform and call (for direct callers of an op; the model resolves once)."""
        return self.function(self.resolve(choice, site, Platform.current()))(*args, **kwargs)


@functools.cache
def _module(name: str):
    return importlib.import_module(name)


_K = "qwen3next_kernels"
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gdn", (
        Impl("pallas_tpu", f"{_K}.gdn.pallas_tpu:gated_delta_rule"),
        Impl("pallas_gpu", f"{_K}.gdn.pallas_gpu:gated_delta_rule"),
        Impl("reference", f"{_K}.gdn.reference:reference_gated_delta_rule", auto=False),
        Impl("chunked", f"{_K}.gdn.chunked:chunked_gated_delta_rule"))),
    Family("conv", (
        Impl("pallas_gpu", f"{_K}.conv.pallas_gpu:split_conv"),
        Impl("xla", f"{_K}.conv.reference:reference_split_conv"))),
    Family("attention", (
        Impl("cudnn", f"{_K}.attention.cudnn:attention"),
        Impl("splash", f"{_K}.attention.splash:attention"),
        Impl("xla", f"{_K}.attention.reference:attention"))),
    Family("moe", (
        Impl("ragged_dot", f"{_K}.moe.reference:expert_mlp"),
        Impl("pallas_gpu", f"{_K}.moe.pallas_gpu:expert_mlp"),
        Impl("tiled", f"{_K}.moe.tiled:expert_mlp"))),
    Family("exchange", (
        Impl("ragged", f"{_K}.moe.ragged_exchange:ragged_exchange"),
        Impl("padded", f"{_K}.moe.exchange:padded_exchange"))),
    Family("loss", (
        Impl("reference", f"{_K}.cross_entropy.reference:linear_cross_entropy", auto=False),
        Impl("chunked", f"{_K}.cross_entropy.chunked:linear_cross_entropy"))),
)}
