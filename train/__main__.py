"""`qwen3next-train --config configs/tiny.yaml [--gin file.gin ...] [section.field=value ...]` (or python -m qwen3next_train)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from qwen3next_train.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qwen3next-train", description="Train a Qwen3-Next model. Without --config: a tiny model on the Python "
        "standard library's source, byte-level, on whatever device JAX finds.")
    parser.add_argument("--config", help="a YAML file of config sections (see configs/)")
    parser.add_argument("--gin", action="append", default=[], help="a gin file binding section.field values")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step by step at INFO
    try:
        cfg = load_config(args.config, args.overrides, args.gin)
    except ConfigError as e:
        parser.exit(2, f"qwen3next-train: config error: {e}\n")
    import jax

    from qwen3next_jax.platforms import skip_absent_tpu
    from qwen3next_train.loop import train  # after the config is known good: importing JAX takes a while

    skip_absent_tpu()

    if not jax.config.jax_compilation_cache_dir:  # a resumed run loads the step it compiled before
        jax.config.update("jax_compilation_cache_dir", os.path.join(cfg.train.out_dir, ".jax_cache"))
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
