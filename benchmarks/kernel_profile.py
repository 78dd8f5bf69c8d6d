"""Per-kernel device times of one Gated DeltaNet forward + backward, from a JAX profiler trace.

Usage (on a GPU):  python3 benchmarks/kernel_profile.py [--impls pallas_gpu,jla] [--shapes 8x4096,1x65536] [--out DIR]
                   python3 benchmarks/kernel_profile.py --mixer bench-1p3b --shapes 8x2048
Runs each implementation's jitted forward + backward a few times under `jax.profiler.trace`, reads the Perfetto
trace it writes, and prints the mean device time per call of every kernel and XLA fusion on the GPU's streams,
largest first. `jla` is jax-linear-attention's Mosaic GPU op (the anchor; its wheel must be installed). Wall-clock
comparisons belong to benchmarks/gdn.py; this says where the time goes. The output is returned with the
gradients, so no forward kernel is dead code (see gdn.py). Writes <out>/kernel_profile.json.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

from benchmarks.gdn import fwd_bwd, get_impl, inputs


def read_trace(trace_dir):
    """Every kernel on the GPU's CUDA streams in the Perfetto trace under trace_dir, as (name, start, duration,
    args), times in microseconds."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {p for p, n in pids.items() if "GPU" in n or "gpu" in n}
    # A device's rows are its CUDA streams plus summary rows ("XLA Modules", "XLA Ops") that repeat the same time.
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in gpu}
    streams = {t for t, n in threads.items() if n.lower().startswith("stream")}
    if not streams:
        raise RuntimeError(f"no CUDA stream rows in the trace: {sorted(set(threads.values()))}")
    return [(e["name"], float(e["ts"]), float(e["dur"]), e.get("args", {})) for e in events
            if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams and "dur" in e]


def device_times(trace_dir, calls):
    """{kernel name: mean microseconds per call} over the device streams of the Perfetto trace in trace_dir."""
    total = collections.defaultdict(float)
    for name, _, dur, _ in read_trace(trace_dir):
        total[name] += dur
    return dict(sorted(((n, t / calls) for n, t in total.items()), key=lambda x: -x[1]))


def profile(step, args, calls):
    """{kernel: mean us per call} of the jitted step(*args), after a warm-up call."""
    jax.block_until_ready(step(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                out = step(*args)
            jax.block_until_ready(out)
        return device_times(d, calls)


def mixer_step(preset, B, T, conv_impl="auto"):
    from qwen3next_kernels.registry import Platform
    """Forward + backward of the model's whole Gated DeltaNet mixer (projections, causal conv with conv_impl, gates,
    the op with impl="auto", gated norm, output projection) in bf16 with fp32 parameters, as a training step runs
    it."""
    from flax import nnx
    import jax.numpy as jnp
    from benchmarks.layer_breakdown import bench_context, module_step
    from qwen3next_jax import Qwen3NextConfig
    from qwen3next_jax.execution import Execution
    from qwen3next_jax.gated_deltanet import GatedDeltaNet
    cfg = Qwen3NextConfig.preset(preset)
    module = GatedDeltaNet(cfg, rngs=nnx.Rngs(0), execution=Execution(compute_dtype="bfloat16", conv=conv_impl),
                           platform=Platform.current())
    x = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size), jnp.bfloat16)
    return module_step(module, x, bench_context(cfg, B, T))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", default="pallas_gpu,jla")
    ap.add_argument("--shapes", default="8x4096,1x65536")
    ap.add_argument("--mixer", default="", help="a config preset: profile its whole Gated DeltaNet mixer instead")
    ap.add_argument("--conv-impls", default="auto", help="with --mixer: the input conv's implementations to profile")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    res = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind), "command": " ".join(sys.argv)}
    for shape in a.shapes.split(","):
        B, T = map(int, shape.split("x"))
        runs = [(f"mixer_{a.mixer}_conv_{c}", lambda c=c: mixer_step(a.mixer, B, T, c))
                for c in a.conv_impls.split(",")] if a.mixer else \
            [(name, lambda name=name: (fwd_bwd(get_impl(name)), inputs(B, T))) for name in a.impls.split(",")]
        for name, make in runs:
            times = profile(*make(), a.calls)
            key = f"{name}_B{B}_T{T}"
            res[key] = {"total_us": sum(times.values()), "kernels_us": times}
            print(f"{key}: device total {sum(times.values()) / 1e3:.3f} ms per call", flush=True)
            for n, t in list(times.items())[:25]:
                print(f"  {t / 1e3:8.3f} ms  {n[:110]}", flush=True)
            with open(os.path.join(a.out, "kernel_profile.json"), "w") as fh:
                json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
