"""One MoE layer with expert parallelism, forward + backward, compiled ahead of time for TPU chips on a CPU host (a
libtpu topology description; no TPU needed): the per-chip memory XLA plans and the collectives of the step.

Usage:  python3 benchmarks/moe_ep_aot.py [--topology v5p:2x2x2] [--expert 8] [--tokens-per-chip 4096]
                                         [--capacity-factor 0] [--exchange auto] [--out /tmp]
By default the 80B-A3B MoE layer (512 experts, top-10, hidden 2048, expert width 512, shared expert 512), bf16
compute over fp32 weights, the tokens split over every chip (data x expert), the experts over `expert`. Prints and
writes <out>/moe_ep_aot.json. tests/test_moe_parallel.py compiles a narrow variant through compile_moe_layer.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Several processes on one host (pytest-xdist, a neighbour's tests) would otherwise fight over libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from qwen3next_jax import Qwen3NextConfig
from qwen3next_jax import sharding as shd
from qwen3next_jax.execution import Execution
from qwen3next_jax.interface import Context
from qwen3next_jax.moe import SparseMoE
from qwen3next_kernels.registry import Platform
from qwen3next_train.compile_report import count_collectives


def compile_moe_layer(topology: str, expert: int, tokens_per_chip: int, capacity_factor: float = 0.0,
                      exchange: str = "auto", **cfg_overrides):
    """(compiled step, the layer's resolved kernels) for the 80B-A3B MoE layer with `cfg_overrides`."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology, "tpu").devices
    cfg = Qwen3NextConfig.preset("qwen3-next-80b-a3b").replace(**cfg_overrides)
    execution = Execution(compute_dtype="bfloat16", exchange=exchange, moe_capacity_factor=capacity_factor)
    platform = Platform("tpu", devices[0].device_kind)
    layer = nnx.eval_shape(lambda: SparseMoE(cfg, rngs=nnx.Rngs(0), execution=execution, platform=platform))
    graphdef, state = nnx.split(layer)
    mesh = shd.make_mesh(devices, data=-1, expert=expert)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         state, shd.state_shardings(state, mesh))
    B, T, D = len(devices), tokens_per_chip, cfg.hidden_size
    arg = lambda shape, dtype, axes: jax.ShapeDtypeStruct(
        shape, dtype, sharding=NamedSharding(mesh, shd.logical_to_spec(axes, shape, mesh)))

    def loss(state, x, mask):
        y, aux = nnx.merge(graphdef, state)(x, Context(rope=None, segment_ids=None, token_mask=mask))
        return jnp.mean(y.astype(jnp.float32) ** 2) + aux.load_balancing

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
            state, arg((B, T, D), jnp.bfloat16, ("batch", "seq", None)), arg((B, T), bool, ("batch", "seq"))).compile()
    return compiled, {"exchange": layer.kernels["exchange"], "moe": layer.experts.kernels["moe"]}


def collective_counts(hlo: str) -> dict[str, int]:
    """The collective kinds the step holds, by count (those it does not hold left out)."""
    return {kind: n for kind, n in count_collectives(hlo).items() if n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="v5p:2x2x2")
    ap.add_argument("--expert", type=int, default=8)
    ap.add_argument("--tokens-per-chip", type=int, default=4096)
    ap.add_argument("--capacity-factor", type=float, default=0.0)
    ap.add_argument("--exchange", default="auto")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    compiled, kernels = compile_moe_layer(a.topology, a.expert, a.tokens_per_chip, a.capacity_factor, a.exchange)
    memory = compiled.memory_analysis()
    res = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__,
           "topology": a.topology, "expert": a.expert, "tokens_per_chip": a.tokens_per_chip,
           "capacity_factor": a.capacity_factor, "kernels": kernels, "compile_s": round(time.perf_counter() - t0, 1),
           "per_chip_GiB": {k: round(getattr(memory, f"{k}_size_in_bytes") / 2**30, 3)
                            for k in ("argument", "output", "temp", "generated_code")},
           "collectives": collective_counts(compiled.as_text())}
    print(json.dumps(res, indent=1))
    with open(os.path.join(a.out, "moe_ep_aot.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
