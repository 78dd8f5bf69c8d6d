"""Multi-GPU training through the trainer's own setup(): layouts x exchanges at one per-device shape, and the
80B-A3B from a random checkpoint. docs/multi_gpu.md says what to run and what nothing here has run on yet.

Layouts (`python benchmarks/multi_gpu.py [--devices N] [section.field=value ...]`): for N devices (default: every
GPU nvidia-smi lists), each in a process of its own that sees only its devices (CUDA_VISIBLE_DEVICES, and on a CPU
host XLA's fake device count):
- `1`: one device; the same global batch as the others by gradient accumulation over N micro-batches, so each
  micro-batch has the per-device shape and the losses are comparable;
- `data=N`, `expert=N`, `expert=N/2,fsdp=2` (N >= 4): every device; the expert layouts once per exchange
  (`--exchanges ragged,padded`, Execution.exchange).
The batch is `--rows` rows of `--seq` tokens PER DEVICE (global batch rows x N: weak scaling), synthetic packed
documents, the same batches in every layout. Per layout: tokens/s per device, scaling efficiency (its tokens/s per
device over the one-device run's), every step's loss and its largest relative difference from the one-device run,
peak memory per device, XLA's memory plan and the memory model's prediction (train/memory.py), the collectives
of the compiled step (count and result bytes per instruction), and with `--profile` the share of the step the
collectives' device events take in a jax.profiler trace. Writes $OUT/multi_gpu.json (OUT defaults to /tmp).

80B mode (`--preset-80b --layers L`): a random-weight checkpoint of the 80B-A3B's first L layers (all experts, MTP;
qwen3next_jax.hf.synthetic) and of its first block; one process on every device then loads the L-layer checkpoint
sharded (checkpoint.init_from_hf, bf16 weights and moments), compares the first block's logits on the mesh with a
CPU reference read from the block checkpoint, trains `--steps` steps, saves and restores the sharded train state
and exports it with train-to-hf, timing each and skipping the last two when the disk cannot hold them.
"""

from __future__ import annotations

import argparse
import gzip
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import ROOT, bench_config, peak_gib, run_child, synthetic_batch, time_steps  # noqa: E402

BENCH_CONFIG = os.path.join(ROOT, "configs", "bench-1p3b.yaml")
CONFIG_80B = os.path.join(ROOT, "configs", "qwen3-next-80b-a3b.yaml")
# A device event of the profile whose name matches this is a collective (XLA's op names, NCCL's kernel names).
COLLECTIVE_EVENT = re.compile(r"all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute|nccl", re.I)


def layouts(n: int) -> list[tuple[str, dict[str, int]]]:
    out = [("1", {}), (f"data={n}", {"data": n}), (f"expert={n}", {"expert": n})]
    if n >= 4:
        out.append((f"expert={n // 2},fsdp=2", {"expert": n // 2, "fsdp": 2}))
    return out if n > 1 else out[:1]


def mesh_overrides(mesh: dict[str, int]) -> list[str]:
    return [f"mesh.{axis}={mesh.get(axis, 1)}" for axis in ("data", "fsdp", "expert", "tensor", "context")]


def collective_share(trace_dir: str, wall_s: float) -> dict | None:
    """Seconds of collective events per device over `wall_s`, from the perfetto trace jax.profiler wrote; None
    when the trace has no device events (a CPU backend). Only the `XLA Ops` threads are read where a device has
    them, so an op and its kernels are not counted twice."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return None
    trace = json.load(gzip.open(files[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    devices = {pid for pid, name in names.items() if "/device:" in name and "CPU" not in name}
    if not devices:
        return None
    share = {}
    for pid in sorted(devices):
        timed = [e for e in events if e.get("pid") == pid and "dur" in e]
        ops = [e for e in timed if threads.get((pid, e.get("tid")), "").startswith("XLA Ops")] or timed
        busy = sum(e["dur"] for e in ops) / 1e6
        coll = sum(e["dur"] for e in ops if COLLECTIVE_EVENT.search(e.get("name", ""))) / 1e6
        share[names[pid]] = {"collective_s": coll, "busy_s": busy, "share_of_wall": coll / wall_s}
    return share


def _report(run, cfg, mesh_shape) -> dict:
    from qwen3next_train.compile_report import collective_bytes, compile_report
    from qwen3next_train.memory import predict_memory

    report = compile_report(run.step_fn)
    return {"compiled_memory": report["memory"], "collectives": report["collectives"],
            "collective_bytes": collective_bytes(run.step_fn.as_text())["bytes"],
            "predicted_memory": predict_memory(cfg, mesh_shape)}


def bench_layout(config: str, n: int, mesh: dict[str, int], exchange: str, rows: int, seq: int, steps: int,
                 overrides: list[str], profile: bool) -> dict:
    """One layout in this process (which sees its devices only): module docstring."""
    import jax
    import numpy as np

    from qwen3next_train.loop import setup
    from qwen3next_train.metrics import flops_per_token, peak_flops

    on = int(np.prod(list(mesh.values()))) if mesh else 1
    cfg = bench_config(config, rows * n, seq, [*mesh_overrides(mesh), f"optim.grad_accum_steps={n // on}",
                                               f"execution.exchange={exchange}", *overrides])
    t0 = time.perf_counter()
    run = setup(cfg)
    setup_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    host = [synthetic_batch(rng, rows * n, seq, cfg.model.vocab_size, max(seq // 8, 2)) for _ in range(steps)]
    losses, times = time_steps(run, host, warmup=min(3, steps - 1))
    out = {"devices": jax.device_count(), "device": jax.devices()[0].device_kind, "setup_s": setup_s,
           "losses": losses, "step_ms": statistics.median(times) * 1e3, "peak_gib_per_device": peak_gib(),
           **_report(run, cfg, dict(run.batch_sharding.mesh.shape))}
    out["tokens_per_s_per_device"] = rows * n * seq / (out["step_ms"] / 1e3) / jax.device_count()
    peak = peak_flops(jax.devices()[0])
    out["mfu"] = flops_per_token(cfg.model, seq)["total"] * out["tokens_per_s_per_device"] / peak if peak else None
    if profile:
        trace_dir = tempfile.mkdtemp(prefix="multi_gpu_trace_")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            time_steps(run, host[:3], warmup=0)
            wall = time.perf_counter() - t0
        out["profile"] = {"dir": trace_dir, "wall_s": wall, "collectives": collective_share(trace_dir, wall)}
    run.train_iter.close()
    run.ckpt.close()
    return out


# ------------------------------------------------------------------------------------------------- the 80B-A3B

def _logits_check(block_ckpt: str, mesh, tokens: int) -> dict:
    """The first block + head's logits, loaded sharded on `mesh` (bf16 compute over fp32 weights) and on the CPU
    (fp32), for `tokens` tokens in each of the mesh's batch rows."""
    import jax
    import numpy as np
    from flax import nnx

    from qwen3next_jax.execution import Execution
    from qwen3next_jax.hf import load_hf_checkpoint

    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    ids = np.random.default_rng(1).integers(0, 1000, (shards, tokens)).astype(np.int32)

    def logits(model, x):
        graphdef, state = nnx.split(model)
        return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), np.float32)

    with jax.set_mesh(mesh):
        ours = logits(load_hf_checkpoint(block_ckpt, mesh=mesh, execution=Execution(compute_dtype="bfloat16")), ids)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        ref = logits(load_hf_checkpoint(block_ckpt, execution=Execution()), jax.device_put(ids, cpu))
    return {"tokens": int(ids.size), "max_abs_diff": float(np.abs(ours - ref).max()),
            "max_abs_ref": float(np.abs(ref).max()),
            "rel_error": float(np.abs(ours - ref).max() / np.abs(ref).max())}


def bench_80b(config: str, ckpt: str, block_ckpt: str, mesh: dict[str, int], rows: int, seq: int, steps: int,
              overrides: list[str], workdir: str) -> dict:
    """Load, check, train, save, restore, export (module docstring), in this process on every device."""
    import jax
    import numpy as np

    from qwen3next_jax.convert import train_to_hf
    from qwen3next_train.checkpoint import Checkpoints
    from qwen3next_train.config import CheckpointConfig
    from qwen3next_train.data import make_tokenizer, train_and_val
    from qwen3next_train.loop import setup
    from qwen3next_train.metrics import flops_per_token, peak_flops

    n = jax.device_count()
    cfg = bench_config(config, rows * n, seq, [*mesh_overrides(mesh), f"checkpoint.init_from_hf={ckpt}",
                                               "execution.param_dtype=bfloat16", "data.tokenizer=bytes", *overrides])
    out = {"devices": n, "device": jax.devices()[0].device_kind}
    t0 = time.perf_counter()
    run = setup(cfg)
    out["load_and_compile_s"] = time.perf_counter() - t0
    out["logits_check"] = _logits_check(block_ckpt, run.batch_sharding.mesh, 8)
    out.update(_report(run, run.cfg, dict(run.batch_sharding.mesh.shape)))
    rng = np.random.default_rng(0)
    host = [synthetic_batch(rng, rows * n, seq, run.cfg.model.vocab_size, max(seq // 8, 2)) for _ in range(steps)]
    losses, times = time_steps(run, host, warmup=min(2, steps - 1))
    out.update(losses=losses, step_ms=statistics.median(times) * 1e3, peak_gib_per_device=peak_gib())
    out["tokens_per_s_per_device"] = rows * n * seq / (out["step_ms"] / 1e3) / n
    peak = peak_flops(jax.devices()[0])
    out["mfu"] = flops_per_token(run.cfg.model, seq)["total"] * out["tokens_per_s_per_device"] / peak if peak else None

    state_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state))
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state.params))
    free = shutil.disk_usage(workdir).free
    if free < 1.1 * (state_bytes + params_bytes):
        out["save"] = f"skipped: the state ({state_bytes / 1e9:.1f} GB) and its export ({params_bytes / 1e9:.1f} GB) " \
                      f"do not fit the {free / 1e9:.1f} GB free under {workdir}"
    else:
        ckpts = Checkpoints(run.run_dir / "checkpoints", CheckpointConfig(every=1, keep=1, async_save=False))
        t0 = time.perf_counter()
        ckpts.save(steps, run.state, run.train_iter, run.cfg.to_dict())
        ckpts.wait()
        out["save_s"] = time.perf_counter() - t0
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state)
        jax.tree.map(lambda x: x.delete(), run.state)  # room for the restored copy
        t0 = time.perf_counter()
        train_ds, _ = train_and_val(run.cfg.data, make_tokenizer(run.cfg.data.tokenizer, run.cfg.model.eos_token_id))
        restored = ckpts.restore_newest(abstract, lambda: iter(train_ds), run.cfg.to_dict())  # the data position
        # belongs to the training pipeline
        jax.block_until_ready(restored.state)
        out["restore_s"] = time.perf_counter() - t0
        out["state_gb"] = state_bytes / 1e9
        ckpts.close()
        restored.data_iter.close()
        del restored
        t0 = time.perf_counter()
        train_to_hf(run.run_dir, os.path.join(workdir, "exported"), progress=False)
        out["train_to_hf_s"] = time.perf_counter() - t0
    run.train_iter.close()
    run.ckpt.close()
    return out


def predict_80b(rows: int, seq: int, overrides: list[str]) -> dict:
    """The memory model (train/memory.py) for the 80B-A3B config on 8 devices, rows x seq tokens per device, at
    bf16 weights and moments, fp32 weights with a bf16 first moment, and fp32 weights and moments."""
    from qwen3next_train.config import load_config
    from qwen3next_train.memory import predict_memory

    out = {}
    for mesh in ({"expert": 8}, {"expert": 4, "fsdp": 2}):
        for params, mu in (("bfloat16", "null"), ("float32", "bfloat16"), ("float32", "null")):
            cfg = load_config(CONFIG_80B, [f"data.batch_size={rows * 8}", f"data.seq_len={seq}",
                                           f"execution.param_dtype={params}", f"optim.mu_dtype={mu}",
                                           "data.tokenizer=bytes", *overrides])
            key = f"{','.join(f'{k}={v}' for k, v in mesh.items())} params={params} mu={cfg.optim.mu_dtype or params}"
            out[key] = {k: round(v / 2**30, 1) for k, v in predict_memory(cfg, mesh).items()}
            print(key, "GiB per device:", out[key], flush=True)
    return out


# ------------------------------------------------------------------------------------------------- the driver

def child_env(base: dict, n: int) -> dict:
    """`base` with only the first n devices visible: GPUs by CUDA_VISIBLE_DEVICES, a CPU host's fake devices by
    XLA's flag."""
    env = dict(base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(n)))
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    return env


def gpu_count() -> int:
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        sys.exit("no nvidia-smi: give --devices N (on a CPU host, N fake devices)")
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def compare_losses(results: dict, reference: str = "1") -> None:
    """Adds to each layout its scaling efficiency and largest relative loss difference from `reference`."""
    ref = results.get(reference, {})
    for key, r in results.items():
        if not isinstance(r, dict) or "losses" not in r or "losses" not in ref:
            continue
        r["loss_rel_diff_max"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
        r["scaling_efficiency"] = r["tokens_per_s_per_device"] / ref["tokens_per_s_per_device"]


def run_layouts(a, env: dict) -> dict:
    results = {}
    for name, mesh in layouts(a.devices):
        if a.only and name not in a.only.split("|"):
            continue
        for exchange in (a.exchanges.split(",") if mesh.get("expert", 1) > 1 else ["auto"]):
            key = name if exchange == "auto" else f"{name},{exchange}"
            job = {"config": a.config, "n": a.devices, "mesh": mesh, "exchange": exchange, "rows": a.rows,
                   "seq": a.seq, "steps": a.steps, "overrides": a.overrides, "profile": a.profile}
            results[key] = run_child([__file__, "--one", json.dumps(job)], a.timeout,
                                     child_env(env, a.devices if mesh else 1))
            print(key, json.dumps(results[key])[:400], flush=True)
    return results


def run_80b(a, env: dict) -> dict:
    from qwen3next_jax.hf.save import DEFAULT_MAX_SHARD_SIZE, plan_shards
    from qwen3next_jax.hf.synthetic import checkpoint_specs, write_random_checkpoint
    from qwen3next_train.config import load_config
    from qwen3next_train.memory import with_layers

    cfg = with_layers(load_config(a.config or CONFIG_80B, [f"model.preset={a.preset}"] if a.preset else []),
                      a.layers).model
    period = 4 if cfg.num_hidden_layers >= 4 else cfg.num_hidden_layers
    os.makedirs(a.workdir, exist_ok=True)
    ckpt, block = os.path.join(a.workdir, "random_hf"), os.path.join(a.workdir, "random_hf_block")
    out = {}
    t0 = time.perf_counter()
    if os.path.exists(os.path.join(ckpt, "config.json")):  # written last: the checkpoint of an earlier command
        plan = plan_shards(checkpoint_specs(cfg), DEFAULT_MAX_SHARD_SIZE)
    else:
        plan = write_random_checkpoint(cfg, ckpt, workers=a.workers)
        out["write_random_s"] = time.perf_counter() - t0
    out["checkpoint"] = {"layers": cfg.num_hidden_layers, "tensors": len(plan.entries),
                         "parameters": plan.parameters, "bytes": plan.nbytes}
    if period == cfg.num_hidden_layers:
        block = ckpt
    elif not os.path.exists(os.path.join(block, "config.json")):  # the same seed: the first block of the above
        write_random_checkpoint(cfg.replace(num_hidden_layers=period, layer_types=cfg.layer_types[:period]), block,
                                workers=a.workers)
    job = {"config": a.config or CONFIG_80B, "ckpt": ckpt, "block_ckpt": block, "mesh": a.mesh80, "rows": a.rows,
           "seq": a.seq, "steps": a.steps, "overrides": a.overrides, "workdir": a.workdir}
    out.update(run_child([__file__, "--one-80b", json.dumps(job)], a.timeout, child_env(env, a.devices)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, help="devices to use (default: the GPUs nvidia-smi lists)")
    ap.add_argument("--config", help="trainer YAML (default: configs/bench-1p3b.yaml; 80B mode: the 80B's)")
    ap.add_argument("--rows", type=int, default=8, help="rows per device")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--exchanges", default="ragged,padded")
    ap.add_argument("--results", help="JSON file to add to (default $OUT/multi_gpu.json); earlier layouts kept")
    ap.add_argument("--only", help="layouts to run, |-separated (e.g. '1|expert=4')")
    ap.add_argument("--profile", action="store_true", help="trace 3 more steps; the collectives' share")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds for each process")
    ap.add_argument("--preset-80b", action="store_true", help="the 80B-A3B from a random checkpoint")
    ap.add_argument("--preset", help="80B mode: another model preset (a CPU smoke run uses tiny)")
    ap.add_argument("--layers", type=int, default=48, help="80B mode: decoder layers")
    ap.add_argument("--mesh", default="expert=8", help="80B mode: the mesh, e.g. expert=4,fsdp=2")
    ap.add_argument("--workdir", default="/tmp/multi_gpu_80b", help="80B mode: checkpoints and exports")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 4),
                    help="80B mode: processes writing the random checkpoint")
    ap.add_argument("--predict", action="store_true",
                    help="print the memory model's per-device GiB for the 80B on 8 devices, bf16 and fp32 variants")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--one-80b", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", metavar="section.field=value")
    a = ap.parse_args(argv)
    if a.one or a.one_80b:
        from qwen3next_jax.platforms import skip_absent_tpu
        skip_absent_tpu()
        job = json.loads(a.one or a.one_80b)
        result = bench_layout(**job) if a.one else bench_80b(**job)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    env = dict(os.environ)
    os.environ["JAX_PLATFORMS"] = "cpu"  # this process only plans and writes files: the devices are the children's
    if a.predict:
        return predict_80b(a.rows, a.seq, a.overrides)
    a.devices = a.devices or gpu_count()
    a.mesh80 = {k: int(v) for k, v in (item.split("=") for item in a.mesh.split(","))}
    out = a.results or os.path.join(os.environ.get("OUT", "/tmp"), "multi_gpu.json")
    results = {}
    if os.path.exists(out):  # layouts run by earlier commands: one device's figures stay the reference
        with open(out) as f:
            results = json.load(f)
    results.update({"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                    "per_device_batch": f"{a.rows}x{a.seq}"})
    if a.preset_80b:
        results[f"80b_{a.layers}_layers"] = run_80b(a, env)
    else:
        a.config = a.config or BENCH_CONFIG
        results.update(run_layouts(a, env))
        compare_losses(results)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}", flush=True)
    return results


if __name__ == "__main__":
    main()
