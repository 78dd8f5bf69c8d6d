"""Writes a random-weight Hugging Face checkpoint with a preset's exact tensor names and shapes (default the real
Qwen3-Next-80B-A3B: all 512 experts per layer, the MTP layer), streamed to disk shard by shard
(qwen3next_jax.hf.synthetic). Prints the tensor and parameter counts.

    python scripts/random_hf_checkpoint.py OUT [--preset qwen3-next-80b-a3b] [--layers N] [--workers 16]
    python scripts/random_hf_checkpoint.py --plan-only [--layers N]     # counts, files and bytes; writes nothing
"""

from __future__ import annotations

import argparse
import time

from qwen3next_jax.config import PRESETS, Qwen3NextConfig
from qwen3next_jax.hf.save import DEFAULT_MAX_SHARD_SIZE, plan_shards
from qwen3next_jax.hf.synthetic import checkpoint_specs, write_random_checkpoint
from qwen3next_jax.platforms import skip_absent_tpu


def preset_config(preset: str, layers: int | None = None) -> Qwen3NextConfig:
    """The preset's config, cut to its first `layers` decoder layers (their kinds as in the full model)."""
    cfg = Qwen3NextConfig.preset(preset)
    if layers is not None:
        cfg = cfg.replace(num_hidden_layers=layers, layer_types=cfg.layer_types[:layers])
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--preset", default="qwen3-next-80b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE)
    ap.add_argument("--workers", type=int, default=1, help="processes writing shards")
    ap.add_argument("--plan-only", action="store_true", help="print the plan, write nothing")
    a = ap.parse_args(argv)
    skip_absent_tpu()
    if not a.plan_only and not a.out:
        ap.error("give an output directory, or --plan-only")
    cfg = preset_config(a.preset, a.layers)
    t0 = time.perf_counter()
    if a.plan_only:
        plan = plan_shards(checkpoint_specs(cfg, a.dtype), a.max_shard_size)
    else:
        plan = write_random_checkpoint(cfg, a.out, seed=a.seed, dtype=a.dtype, max_shard_size=a.max_shard_size,
                                       workers=a.workers)
    print(f"{a.preset}, {cfg.num_hidden_layers} layers: {len(plan.entries):,} tensors, {plan.parameters:,} "
          f"parameters, {plan.nbytes / 1e9:.2f} GB in {len(plan.files)} files"
          + ("" if a.plan_only else f", written to {a.out} in {time.perf_counter() - t0:.1f} s"))
    return plan


if __name__ == "__main__":
    main()
