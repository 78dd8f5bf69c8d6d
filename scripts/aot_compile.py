"""The trainer's whole training step compiled ahead of time for TPU topologies from a CPU host (libtpu's topology
descriptions; no TPU needed): per-chip memory against the chip's HBM, XLA's FLOPs and bytes, the collectives'
bytes, and an ESTIMATED step time and MFU from a stated model. Nothing here runs on a TPU.

Usage:  python3 scripts/aot_compile.py [--config configs/qwen3-next-80b-a3b.yaml]
            [--topology v5p:4x4x4 --topology v6e:16x16 ...] [--batch ROWS] [--seq-len T] [--layers N]
            [--set section.field=value ...] [--out report.json]

The step is train/loop.py's own (lower_train_step): the config's model, optimizer, loss and mesh axes
(train.loop.make_mesh over the topology's chips), the model's kernels resolved for the topology's chips. Each
topology compiles in turn; one that fails (RESOURCE_EXHAUSTED, or any compile error) is reported and the next one
compiled. --layers N keeps N decoder layers at full width (4 = one 3:1 block of the 80B-A3B).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Several processes on one host (pytest-xdist, a neighbour's tests) would otherwise fight over libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from qwen3next_jax.platforms import skip_absent_tpu  # noqa: E402

skip_absent_tpu()

import jax  # noqa: E402

from qwen3next_jax.execution import kernel_summary  # noqa: E402
from qwen3next_jax.moe import exchange_capacity  # noqa: E402
from qwen3next_kernels.registry import Platform  # noqa: E402
from qwen3next_train import loop  # noqa: E402
from qwen3next_train.compile_report import collective_bytes, compile_report, hlo_flops  # noqa: E402
from qwen3next_train.config import load_config  # noqa: E402
from qwen3next_train.metrics import flops_per_token, peak_flops  # noqa: E402

DEFAULT_TOPOLOGIES = ("v5p:4x4x4", "v5p:4x4x8", "v6e:16x16")
GiB = 2 ** 30
# Per chip, from Google Cloud's TPU pages: HBM, and the inter-chip interconnect's bandwidth (all of a chip's links,
# both directions: v5p 4,800 Gbit/s, v6e 3,584 Gbit/s). Keyed by the topology name's generation.
CHIPS = {"v5p": dict(hbm_bytes=95 * GiB, ici_bytes_per_s=4800e9 / 8),
         "v6e": dict(hbm_bytes=32 * GiB, ici_bytes_per_s=3584e9 / 8)}
ESTIMATE_MODEL = (
    "ESTIMATES, not measurements. compute time = the compiled step's FLOPs per chip (compile_report.hlo_flops: "
    "dots, convolutions and the kernels' own cost estimates, loop trips included; the grouped matmuls' estimates, "
    "which count every row of the dropless receive buffer (expert x capacity rows), scaled to the rows that hold "
    "tokens (tokens per chip x top-k), assuming the kernel skips the rest; where kernels give no estimate (the "
    "Gated DeltaNet and splash attention kernels among them), plus the model's attention and Gated DeltaNet FLOPs "
    "of the chip's tokens instead, once, without remat's recompute) / the chip's peak bf16 FLOP/s, as if all of "
    "them ran at peak; collective time = the collectives' bytes per chip (compile_report.collective_bytes: whole "
    "buffers, loop trips included) / the chip's whole ICI bandwidth; "
    "step time (serial) = compute + collective time, no overlap: the estimate; step time (overlapped) = "
    "max(compute, collective time), perfect overlap: its lower bound. MFU = model FLOPs per step "
    "(train.metrics.flops_per_token: 6 x active parameters + attention + Gated DeltaNet, x tokens) / (chips x "
    "peak x step time).")


def train_config(args):
    extra = [f"data.batch_size={args.batch}"] if args.batch else []
    extra += [f"data.seq_len={args.seq_len}"] if args.seq_len else []
    extra += [f"model.num_hidden_layers={args.layers}"] if args.layers else []
    return load_config(args.config, extra + args.set)


def compile_topology(cfg, topology: str) -> dict:
    """The report of one topology: what compiled, or the error that stopped it."""
    from jax.experimental import topologies

    t0 = time.perf_counter()
    devices = topologies.get_topology_desc(topology, "tpu").devices
    chip = CHIPS[topology.split(":")[0]]
    report = {"topology": topology, "chips": len(devices), "device_kind": devices[0].device_kind,
              "batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "layers": cfg.model.num_hidden_layers}
    try:
        mesh = loop.make_mesh(cfg, devices)  # a ConfigError where the chips cannot form it or split the batch
        report["mesh"] = {k: v for k, v in mesh.shape.items() if v > 1}
        a = loop.abstract_training(cfg, mesh, Platform("tpu", devices[0].device_kind))
        report["kernels"] = kernel_summary(a.model)
        compiled = loop.lower_train_step(cfg, mesh, a).compile()
    except Exception as e:  # RESOURCE_EXHAUSTED and any other compile failure: reported, then the next topology
        report.update(error=f"{type(e).__name__}: {str(e).strip()[:2000]}",
                      compile_s=round(time.perf_counter() - t0, 1))
        return report
    report["compile_s"] = round(time.perf_counter() - t0, 1)
    hlo = compiled.as_text()
    memory = compile_report(compiled)["memory"]
    # Donated arguments (the train state) alias outputs: their bytes are counted once.
    total = sum(memory.get(k, 0) for k in ("arguments", "outputs", "temporaries", "code")) - memory.get("aliased", 0)
    report["memory_per_chip"] = {**memory, "total": total, "hbm": chip["hbm_bytes"],
                                 "fits": total <= chip["hbm_bytes"]}
    cost = compiled.cost_analysis() or {}
    report["xla_cost_analysis"] = {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
                                   "note": "per chip; XLA counts each loop body once"}
    report["hlo_flops_per_chip"] = hlo_flops(hlo)
    report["collectives_per_chip"] = collective_bytes(hlo)
    report["estimates"] = estimates(cfg, len(devices), chip, peak_flops(devices[0]), report)
    return report


def estimates(cfg, chips: int, chip: dict, peak: float, report: dict) -> dict:
    """Step time and MFU by ESTIMATE_MODEL."""
    tokens = cfg.data.batch_size * cfg.data.seq_len
    model_flops = flops_per_token(cfg.model, cfg.data.seq_len)
    hlo = report["hlo_flops_per_chip"]
    unestimated = (model_flops["attention"] + model_flops["gdn"]) * tokens / chips if hlo["kernels_without_estimate"] \
        else 0.0
    # Every chip holds its own tokens (the batch is split over all of them): the expert-parallel exchange's buffer.
    n, k, E = report["mesh"].get("expert", 1), cfg.model.num_experts_per_tok, cfg.model.num_experts
    capacity = exchange_capacity(tokens // chips, k, n, E // n, cfg.execution.moe_capacity_factor)
    real_rows = (tokens // chips) * k / (n * capacity) if n > 1 else 1.0
    compute_flops = hlo["flops"] - hlo["grouped_matmul_flops"] * (1 - real_rows) + unestimated
    compute_s = compute_flops / peak
    collective_s = sum(report["collectives_per_chip"]["bytes"].values()) / chip["ici_bytes_per_s"]
    serial, overlapped = compute_s + collective_s, max(compute_s, collective_s)
    step_flops = model_flops["total"] * tokens
    return {"model": ESTIMATE_MODEL, "peak_flops_per_chip": peak, "ici_bytes_per_s_per_chip": chip["ici_bytes_per_s"],
            "model_flops_per_token": model_flops, "model_flops_per_step": step_flops,
            "grouped_matmul_real_row_share": real_rows, "kernel_flops_from_the_model": unestimated,
            "compute_flops": compute_flops, "compute_s": compute_s, "collective_s": collective_s,
            "step_s_serial": serial, "step_s_overlapped": overlapped,
            "mfu_serial": step_flops / (chips * peak * serial),
            "mfu_overlapped": step_flops / (chips * peak * overlapped),
            "tokens_per_s_per_chip_serial": tokens / serial / chips}


def summary(r: dict) -> str:
    head = (f"{r['topology']} ({r['chips']} chips, {r['device_kind']}), mesh {r.get('mesh')}, batch {r['batch']} x "
            f"{r['seq_len']}, {r['layers']} layers")
    if "error" in r:
        return f"{head}: DID NOT COMPILE after {r['compile_s']} s: {r['error'].splitlines()[0][:400]}"
    m, c, e, f = r["memory_per_chip"], r["collectives_per_chip"], r["estimates"], r["hlo_flops_per_chip"]
    gib = lambda n: f"{n / GiB:.2f} GiB"
    lines = [
        head + f", compiled in {r['compile_s']} s",
        "  memory per chip: " + ", ".join(f"{k} {gib(m[k])}" for k in ("arguments", "outputs", "temporaries", "code",
                                                                       "aliased") if k in m)
        + f"; total (aliased counted once) {gib(m['total'])} of {gib(m['hbm'])} HBM: "
        + ("FITS" if m["fits"] else "DOES NOT FIT"),
        f"  FLOPs per chip: {f['flops'] / 1e12:.1f} TFLOP (dots, convolutions, kernels; loop trips included; "
        f"{f['grouped_matmul_flops'] / 1e12:.1f} of them grouped matmuls over whole buffers; "
        f"{f['kernels_without_estimate']} kernel calls without a cost estimate, not in it); XLA cost_analysis "
        f"(loop bodies once): {r['xla_cost_analysis']['flops'] / 1e12:.2f} TFLOP, "
        f"{r['xla_cost_analysis']['bytes_accessed'] / GiB:.1f} GiB accessed",
        "  collectives per chip (loop trips included): " + ", ".join(
            f"{k} {c['executed'][k]}x {gib(c['bytes'][k])}" for k in c["bytes"] if c["executed"][k])
        + f"; total {gib(sum(c['bytes'].values()))}"
        + (f"; {c['loops_without_trip_count']} loops of unknown trips counted once"
           if c["loops_without_trip_count"] else ""),
        f"  ESTIMATES: compute {e['compute_flops'] / 1e12:.1f} TFLOP (grouped matmuls at "
        f"{e['grouped_matmul_real_row_share']:.3f} of their estimate, {e['kernel_flops_from_the_model'] / 1e12:.2f} "
        f"TFLOP of kernels without an estimate from the model) = {e['compute_s']:.3f} s + collectives "
        f"{e['collective_s']:.3f} s = step "
        f"{e['step_s_serial']:.3f} s (serial), MFU {e['mfu_serial']:.1%}; overlapped {e['step_s_overlapped']:.3f} "
        f"s, MFU {e['mfu_overlapped']:.1%}; model {e['model_flops_per_token']['total'] / 1e9:.2f} GFLOP/token, "
        f"peak {e['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s, ICI {e['ici_bytes_per_s_per_chip'] / 1e9:.0f} GB/s "
        "per chip",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/qwen3-next-80b-a3b.yaml")
    ap.add_argument("--topology", action="append", help=f"repeatable; default {', '.join(DEFAULT_TOPOLOGIES)}")
    ap.add_argument("--batch", type=int, help="global rows per step (data.batch_size)")
    ap.add_argument("--seq-len", type=int, help="tokens per row (data.seq_len)")
    ap.add_argument("--layers", type=int, help="decoder layers (model.num_hidden_layers), full width")
    ap.add_argument("--set", action="append", default=[], metavar="section.field=value",
                    help="a config override, e.g. mesh.expert=16")
    ap.add_argument("--out", help="the JSON report's path")
    args = ap.parse_args(argv)
    cfg = train_config(args)
    result = {"command": " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else argv)),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__, "config": args.config,
              "overrides": args.set, "execution": dataclasses.asdict(cfg.execution), "topologies": []}
    for topology in args.topology or DEFAULT_TOPOLOGIES:
        report = compile_topology(cfg, topology)
        print(summary(report), flush=True)
        result["topologies"].append(report)
        if args.out:  # after every topology, so a later one that runs out of host memory loses nothing
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print(ESTIMATE_MODEL)
    return result


if __name__ == "__main__":
    main()
