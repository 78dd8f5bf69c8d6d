"""`qwen3next-train --config configs/tiny.yaml [--gin file.gin ...] [section.field=value ...]`
(or `python -m qwen3next_train ...`).

Several processes (a TPU pod slice, a SLURM job): the same command on every host; see docs/launch.md and the
`distributed` config section.

Exit status: 0 the run reached train.steps; 2 a config error (bad key or value, file, data, tokenizer, mesh, or a
resume refused), reported in one `config error:` line before anything is computed; 1 the run stopped (too many
non-finite steps in a row, or a checkpoint that failed to save); 75 (EX_TEMPFAIL) stopped by SIGTERM after saving
a checkpoint: run the same command again to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from qwen3next_train.config import ConfigError, load_config

EXIT_STOPPED, EXIT_CONFIG, EXIT_PREEMPTED = 1, 2, 75


def _current_directory_off_path() -> None:
    """`python -m` puts the current directory first on sys.path, where any module in it could shadow a library
    the trainer imports later; the trainer is installed, so it needs no such entry."""
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]


def main(argv: list[str] | None = None) -> int:
    _current_directory_off_path()
    parser = argparse.ArgumentParser(
        prog="qwen3next-train", description="Train a Qwen3-Next model. Without --config: a tiny model on the Python "
        "standard library's source, byte-level, on whatever device JAX finds.")
    parser.add_argument("--config", help="a YAML file of config sections (see configs/)")
    parser.add_argument("--gin", action="append", default=[],
                        help="a gin file binding section.field = value (literal values and `include` only: gin "
                             "imports, references and macros are refused, so a gin file cannot run code)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step by step at INFO

    def fail(status: int, kind: str, error: Exception):
        parser.exit(status, f"qwen3next-train: {kind}{error}\n")

    try:
        cfg = load_config(args.config, args.overrides, args.gin)
    except ConfigError as e:
        fail(EXIT_CONFIG, "config error: ", e)
    import jax
    from etils import epath

    from qwen3next_jax.platforms import skip_absent_tpu
    from qwen3next_train import distributed
    from qwen3next_train.checkpoint import CheckpointSaveError
    from qwen3next_train.loop import NonFiniteError, loop, setup  # after the config is known good: JAX takes a while

    skip_absent_tpu()
    try:
        if distributed.initialize(cfg.distributed):  # before anything starts a backend
            logging.getLogger().handlers[0].setFormatter(logging.Formatter(
                f"%(asctime)s %(levelname)s [process {jax.process_index()}/{jax.process_count()}] %(name)s: "
                "%(message)s"))
    except ConfigError as e:
        fail(EXIT_CONFIG, "config error: ", e)

    if not jax.config.jax_compilation_cache_dir:  # a resumed run loads the step it compiled before
        jax.config.update("jax_compilation_cache_dir", os.fspath(epath.Path(cfg.train.out_dir) / ".jax_cache"))
    try:
        run = setup(cfg)
    except ConfigError as e:
        fail(EXIT_CONFIG, "config error: ", e)
    try:
        loop(run)
    except (NonFiniteError, CheckpointSaveError) as e:
        fail(EXIT_STOPPED, "", e)
    return EXIT_PREEMPTED if run.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
