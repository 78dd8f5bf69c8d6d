"""One training step end to end, as a user runs it: `configs/bench-1p3b.yaml` (the bench shape of ANCHORS.md) through
the trainer's own `setup()` (mesh, model, optimizer, the ahead-of-time compiled step), timed on rows of
- `packed`: synthetic tokens, several documents a row (lengths drawn around T/8, positions restarting in each);
- `single`: synthetic tokens, one document a row;
- `pipeline`: the trainer's own data pipeline (the built-in corpus, byte-level, packed).

Each (shape, rows) runs in a process of its own, so that its peak memory is its own (`peak_bytes_in_use`
accumulates within a process). Writes $OUT/train_step.json (OUT defaults to /tmp). Run the anchor trainer
(jax-linear-attention's, `gpu_anchors.py jlatrain`) in the same device call so the ratio is measured at one time:

    python benchmarks/train_step.py --shapes 8x2048,2x8192 --rows packed,single [section.field=value ...]

`--profile N` also traces N steps with `jax.profiler` and attributes the device time of every kernel to a part of the
model through the JAX name stack of the HLO op that launched it: the named scopes of decoder.py, model.py and the
trainer's step (`moe`, `mlp`, `gated_deltanet`, `attention`, `lm_head_loss`, `embed`, `mtp`, `optimizer`; the
innermost wins, so the MTP layer's MoE counts as `moe`), split into forward, backward and rematerialised forward.
Kernels the trace gives no op name (custom calls and cuBLAS GEMMs inside XLA's command buffers) go by the rules of
attribute(). `--attribute FILE` prints that split again from a saved train_step.json.

Compilation happens in setup(); its time is reported as `setup_s` (compiling the bench-1p3b step on an H200 takes
minutes: give the command room).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(config: str, B: int, T: int, overrides: list[str]):
    """The trainer config of a benchmark run: `config` (a YAML path) at batch B x T, no evaluation, checkpoints
    or progress bar, a throw-away run directory; `overrides` last."""
    from qwen3next_train.config import load_config

    out_dir = tempfile.mkdtemp(prefix="bench_")
    return load_config(config, [
        f"data.seq_len={T}", f"data.batch_size={B}", "data.num_workers=0", f"train.out_dir={out_dir}",
        "train.steps=1000", "train.eval_every=0", "checkpoint.every=0", "train.progress=false", *overrides])


def synthetic_batch(rng, B: int, T: int, vocab: int, doc_len: int | None) -> dict:
    """Random tokens [B, T]: one document a row (doc_len None), or documents of lengths drawn around doc_len."""
    import numpy as np

    ids = rng.integers(0, vocab, (B, T)).astype(np.int32)
    if doc_len is None:
        return dict(input_ids=ids, segment_ids=np.ones((B, T), np.int32),
                    positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)))
    starts = rng.random((B, T)) < 1 / doc_len
    starts[:, 0] = True
    seg = np.cumsum(starts, axis=1).astype(np.int32)
    start_pos = np.maximum.accumulate(np.where(starts, np.arange(T), 0), axis=1)
    return dict(input_ids=ids, segment_ids=seg, positions=(np.arange(T) - start_pos).astype(np.int32))


def time_steps(run, host_batches: list[dict], warmup: int = 3) -> tuple[list[float], list[float]]:
    """Runs the compiled step of `run` on each batch; returns every step's loss and the wall times of the steps
    after `warmup`. Each loss is fetched before the next step starts, so a step's time is its own."""
    import jax

    batches = [{k: jax.device_put(v, run.batch_sharding) for k, v in b.items()} for b in host_batches]
    state, losses, times = run.state, [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        state, metrics = run.step_fn(state, batch)
        losses.append(float(metrics["loss"]))  # waits for the step; every loss kept, so a NaN shows where
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    run.state = state
    return losses, times


def peak_gib() -> float:
    """The largest peak_bytes_in_use over this process's devices (0 where the backend does not report it)."""
    import jax

    return max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()) / 2**30


PARTS = ("moe", "mlp", "gated_deltanet", "attention", "lm_head_loss", "embed", "mtp", "optimizer")


def part_of(op_name: str) -> tuple[str, str]:
    """(part, phase) of an HLO op from its JAX name stack, e.g. "jit(step)/transpose(jvp(while))/body/moe/dot"."""
    words = re.split(r"[/()\[\]]", op_name)
    part = next((w for w in reversed(words) if w in PARTS), "other")
    phase = ("recompute" if "rematted_computation" in words else "backward" if "transpose" in words
             else "forward")
    return part, phase


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name: JAX op_name} of a compiled module's text; names in the form kernels carry ('.' and '-' as
    '_')."""
    found = re.finditer(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text, re.M)
    return {re.sub(r"[.\-]", "_", m.group(1)): m.group(2) for m in found}


# Kernels that carry no op name in the trace (XLA runs them inside CUDA command buffers, and custom calls get no
# name there): ours and JAX's by their kernel names.
KERNEL_PARTS = (("gdn_", "gated_deltanet"),           # kernels_pallas/gdn and conv: gdn_*_mosaic_gpu_kernel
                ("body_mosaic_gpu", "moe"),           # JAX's ragged_dot_mgpu / transposed_ragged_dot_mgpu
                ("cudnn_generated", "attention"),     # cuDNN's flash attention
                ("void cudnn::", "attention"))        # and its helper kernels


def attribute(kernels: list[dict]) -> dict:
    """Device ms per part from kernels [{name, hlo_op, op_name, ms}]: the part of the op name where the trace gives
    one (forward, backward or recompute); else the part its kernel name says (KERNEL_PARTS); else, for a cuBLAS
    GEMM, the part of the named kernels in the same command buffer where they have one part besides "other" (the
    residual adds and casts between parts, which hold no GEMM of their own); else "unattributed: <kernel name>"."""
    named = [(k, *part_of(k["op_name"])) for k in kernels if k["op_name"]]
    buffer_parts = collections.defaultdict(set)
    for k, part, _ in named:
        if part != "other":
            buffer_parts[k["hlo_op"]].add(part)
    ms = collections.defaultdict(float)
    for k in kernels:
        if k["op_name"]:
            part, phase = part_of(k["op_name"])
            ms[f"{part} {phase}"] += k["ms"]
            continue
        by_name = next((part for prefix, part in KERNEL_PARTS if k["name"].startswith(prefix)), None)
        parts = buffer_parts.get(k["hlo_op"], set())
        if by_name:
            ms[f"{by_name} (kernel name)"] += k["ms"]
        elif len(parts) == 1:
            ms[f"{next(iter(parts))} (GEMM in its command buffer)"] += k["ms"]
        else:
            ms[f"unattributed: {re.sub(r'_[0-9x]+.*', '', k['name'])[:40]}"] += k["ms"]
    total = sum(ms.values())
    return dict(device_ms=total, unattributed=sum(v for n, v in ms.items() if n.startswith("unattributed")) / total,
                parts_ms=dict(sorted(ms.items(), key=lambda kv: -kv[1])))


def step_profile(run, host_batches: list[dict]) -> dict:
    """Device time per step by part (attribute()), from a trace of the steps on host_batches. A kernel's op name is
    the one the trace gives it (`tf_op`), else the compiled step's metadata for its HLO instruction (`hlo_op`, or
    the kernel's own name). `kernels` lists every (kernel, hlo_op, op name) with its time per step."""
    import jax

    from kernel_profile import read_trace

    names = hlo_op_names(run.step_fn.as_text())
    steps = len(host_batches)

    def op_name(name, args):
        if "/" in args.get("tf_op", ""):
            return args["tf_op"]
        keys = (re.sub(r"[.\-%]", "_", key).strip("_") for key in (args.get("hlo_op"), name) if key)
        return next((names[k] for k in keys if k in names), "")

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            time_steps(run, host_batches, warmup=0)
        events = read_trace(d)
    by_kernel = collections.defaultdict(float)
    for name, _, dur, args in events:
        by_kernel[(name[:100], args.get("hlo_op", ""), op_name(name, args)[:300])] += dur / steps / 1e3
    kernels = [dict(name=n, hlo_op=h, op_name=o, ms=t) for (n, h, o), t in by_kernel.items()]
    return dict(steps=steps, **attribute(kernels), kernels=sorted(kernels, key=lambda k: -k["ms"]))


def run_child(argv: list[str], timeout: int, env: dict | None = None) -> dict:
    """Runs `python argv` in a process of its own and returns the JSON of its last `RESULT ` line, or an error."""
    try:
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if lines else {"error": done.stderr[-3000:]}
        result["log"] = [ln[:400] for ln in done.stderr.splitlines() if "train step" in ln]  # the compile times
        return result
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout} s", "stderr": str(e.stderr)[-1000:]}


def bench_one(B: int, T: int, rows: str, steps: int, profile: int, overrides: list[str], hlo: str = "") -> dict:
    import jax
    import numpy as np

    from qwen3next_train.loop import setup
    from qwen3next_train.metrics import flops_per_token, peak_flops

    cfg = bench_config(os.path.join(ROOT, "configs", "bench-1p3b.yaml"), B, T, overrides)
    t0 = time.perf_counter()
    run = setup(cfg)
    setup_s = time.perf_counter() - t0
    if hlo:
        import gzip
        with gzip.open(hlo, "wt") as f:
            f.write(run.step_fn.as_text())
    rng = np.random.default_rng(0)
    # Fetched or made before timing: the step is timed, not the pipeline.
    make = {"pipeline": lambda: next(run.train_iter),
            "single": lambda: synthetic_batch(rng, B, T, cfg.model.vocab_size, None),
            "packed": lambda: synthetic_batch(rng, B, T, cfg.model.vocab_size, max(T // 8, 2))}[rows]
    host = [make() for _ in range(steps + 3)]
    docs_per_row = float(np.mean([len(np.unique(r[r > 0])) for r in host[0]["segment_ids"]]))
    losses, times = time_steps(run, host)
    profiled = step_profile(run, host[:profile]) if profile else None
    run.train_iter.close()
    run.ckpt.close()
    dt = statistics.median(times)
    tps = B * T / dt / jax.device_count()
    peak = peak_flops(jax.devices()[0])
    return dict(step_ms=dt * 1e3, tokens_per_s_per_device=tps, setup_s=setup_s, losses=losses,
                documents_per_row=docs_per_row, device=jax.devices()[0].device_kind, devices=jax.device_count(),
                mfu=flops_per_token(cfg.model, T)["total"] * tps / peak if peak else None,
                peak_gib=peak_gib(), execution=cfg.to_dict()["execution"], profile=profiled)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8x2048,2x8192")
    ap.add_argument("--rows", default="packed,single", help="packed, single, pipeline (module docstring)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds for each (shape, rows) process")
    ap.add_argument("--profile", type=int, default=0, help="trace this many more steps (module docstring)")
    ap.add_argument("--hlo", action="store_true", help="also save the compiled step's HLO (what XLA fused) as "
                    "$OUT/train_step_<shape>_<rows>.hlo.gz")
    ap.add_argument("--attribute", metavar="JSON", help="print the profile split of a train_step.json written with "
                    "--profile, by this version's attribute()")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # BxT:rows, run in this process
    ap.add_argument("overrides", nargs="*", metavar="section.field=value")
    a = ap.parse_args()
    if a.attribute:
        with open(a.attribute) as f:
            saved = json.load(f)
        for key, result in saved.items():
            if isinstance(result, dict) and result.get("profile"):
                split = attribute(result["profile"]["kernels"])
                print(f"{key}: step {result['step_ms']:.1f} ms, device {split['device_ms']:.1f} ms")
                for part, ms in split["parts_ms"].items():
                    print(f"  {ms:7.2f} ms {ms / result['step_ms']:6.1%}  {part}")
        return
    if a.one:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the compile times
        shape, rows = a.one.split(":")
        B, T = map(int, shape.split("x"))
        hlo = os.path.join(os.environ.get("OUT", "/tmp"), f"train_step_{shape}_{rows}.hlo.gz") if a.hlo else ""
        print("RESULT " + json.dumps(bench_one(B, T, rows, a.steps, a.profile, a.overrides, hlo)), flush=True)
        return
    out = os.path.join(os.environ.get("OUT", "/tmp"), "train_step.json")
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv)}
    for shape in a.shapes.split(","):
        for rows in a.rows.split(","):
            key = f"{shape}_{rows}"
            results[key] = run_child([__file__, "--one", f"{shape}:{rows}", "--steps", str(a.steps),
                                      "--profile", str(a.profile), *(["--hlo"] if a.hlo else []), *a.overrides],
                                     a.timeout)
            print(key, json.dumps(results[key])[:600], flush=True)
            if results[key].get("profile"):
                prof = results[key]["profile"]
                print(f"profile: device {prof['device_ms']:.1f} ms/step, {prof['unattributed']:.0%} unattributed:",
                      json.dumps(prof["parts_ms"]), flush=True)
            with open(out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
