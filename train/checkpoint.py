"""Orbax checkpoints of a run: train state, data-iterator position and the resolved config, saved together.

A checkpoint `checkpoints/<step>/` holds three items:
- `state`: parameters, optimizer state, step and RNG key (Orbax's StandardSave; arrays written asynchronously);
- `data`: the grain iterator's state (grain's own Orbax handler, written before `save` returns);
- `config`: the resolved TrainConfig as JSON.

Orbax writes a checkpoint into a temporary directory and renames it only once every item is complete, so a run
killed mid-save leaves no step directory that `all_steps()` lists. Restoring walks the steps newest first and
passes over one that fails to restore (a damaged file), so the newest *complete and readable* checkpoint wins; the
unreadable ones after it are deleted, as the resumed run writes those steps again.
Restoring against abstract arrays carrying shardings places each array on the current mesh, whatever mesh wrote it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from qwen3next_train.config import CheckpointConfig

log = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, directory: str, cfg: CheckpointConfig):
        self.enabled = cfg.every > 0
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(cfg.every, 1), max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_names=("state", "data", "config"))

    def maybe_save(self, step: int, state: Any, data_iter, config: dict, *, force: bool = False) -> bool:
        """Starts an asynchronous save when `step` is due (or forced); returns whether one started."""
        if not self.enabled:
            return False
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config)))

    def restore_newest(self, abstract_state: Any, data_iter) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, with `data_iter` moved to its position; None when
        there is none. `abstract_state` is a pytree of jax.ShapeDtypeStruct (with shardings) to restore into."""
        unreadable = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter)))
            except Exception as e:  # noqa: BLE001 - any failure to read means: not a usable checkpoint
                log.warning("checkpoint at step %d cannot be restored (%s: %s); trying the previous one",
                            step, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                unreadable.append(step)
                continue
            for bad in unreadable:  # the resumed run saves these steps again
                log.warning("deleting the unreadable checkpoint at step %d", bad)
                self.manager.delete(bad)
            return step, restored.state
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
