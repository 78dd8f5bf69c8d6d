"""Orbax checkpoints of a run: train state, data-iterator position and the resolved config, saved together.

A checkpoint `checkpoints/<step>/` holds three items:
- `state`: the TrainState (parameters, optimizer state, step, RNG; Orbax's StandardSave, arrays written
  asynchronously);
- `data`: the grain iterator's state (grain's own Orbax handler, written before `save` returns);
- `config`: the resolved TrainConfig as JSON.

Orbax writes a checkpoint into a temporary directory and renames it only once every item is complete, so a run
killed mid-save leaves no step directory that `all_steps()` lists.

Resuming never loses a checkpoint. Newest first, each one is
1. read: its config, its state's tree (metadata) and its data files. One that cannot be read (missing or corrupt
   files) is damaged: it is moved to `checkpoints/damaged/<step>` (never deleted; no longer counted by `keep`, so
   the step can be saved again), one line is logged, and the one before it is tried;
2. compared: a config that differs in a structural field (config.ON_RESUME), or a state tree that differs from the
   model's, refuses the resume with a ConfigError naming the fields, before anything is restored;
3. restored: the state first, then the data position into a fresh iterator, so a failure leaves the caller's
   iterator untouched (both or neither). State arrays that fail to read make the checkpoint damaged as in 1.
Restoring against abstract arrays carrying shardings places each array on the current mesh, whatever mesh wrote it.

Several processes: every process calls save and restore alike. Orbax writes each array's shards from the process
that holds them and process 0 writes the metadata, with barriers through JAX's coordination service; the directory
must be one that every host reaches (a bucket, or a shared filesystem). grain's handler writes each process's
iterator state as `data/process_<i>-of-<n>.json`; every process's state is the same (the data stream is global,
train/data.py), so a run on another number of processes restores process 0's (`_DataHandler`).

Paths are etils.epath paths: the directory may be a bucket (gs://...), written through Orbax's tensorstore driver
for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from qwen3next_train import rundir
from qwen3next_train.config import CheckpointConfig, ConfigError, resume_changes

log = logging.getLogger(__name__)

DAMAGED = "damaged"
# What reading a missing or corrupt checkpoint file raises (tensorstore and JSON errors are ValueErrors, a missing
# item is a KeyError). Anything else, an out-of-memory error say, is not damage and propagates.
DAMAGE = (OSError, ValueError, KeyError)


class CheckpointSaveError(RuntimeError):
    """An asynchronous save did not complete; Orbax logged why."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_iter: Any  # a fresh iterator positioned after the checkpoint's last batch


def _drop_closed_loop_errors(unraisable) -> None:
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
        _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


@contextlib.contextmanager
def _orbax_quiet():
    """Reads of a checkpoint that may be damaged, without the noise: Orbax logs every failed read with a traceback,
    and when one read of a restore fails, tensorstore's other reads finish into the closed asyncio loop, each
    printing "Event loop is closed" through sys.unraisablehook. A damaged checkpoint gets our one line instead.
    After a failure the hook keeps dropping those (the late reads finish after the restore has given up)."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    hook = sys.unraisablehook
    sys.unraisablehook = _drop_closed_loop_errors
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    sys.unraisablehook = hook  # only when every read succeeded


def _reason(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:300]}"


class _DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's Orbax handler for the iterator state, which also restores on another number of processes: from this
    process's own file when the checkpoint has one, else from process 0's (all of them hold the same state)."""

    def restore(self, directory: epath.Path, item=None, args=None):
        item = item or args.item
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        written = [own] if own.exists() else sorted(directory.glob("process_0-of-*.json"))
        if not written:
            raise ValueError(f"{directory} holds neither {own.name} nor any process_0-of-*.json")
        item.set_state(json.loads(written[0].read_text()))
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    item: Any


class Checkpoints:
    def __init__(self, directory: epath.PathLike, cfg: CheckpointConfig):
        directory = epath.Path(directory)
        self.directory = directory if rundir.is_remote(directory) else directory.resolve()  # Orbax: absolute
        self.enabled = cfg.every > 0
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep or None, enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True,
            create=True)
        # Handlers named up front, so that a checkpoint's metadata is readable before anything is restored.
        handlers = {"state": ocp.handlers.StandardCheckpointHandler(), "data": _DataHandler(),
                    "config": ocp.handlers.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._in_flight: int | None = None  # the step of the save started since the last wait()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, data_iter, config: dict) -> None:
        """Starts an asynchronous save of step `step` (the loop decides when; see loop.py). The previous save is
        confirmed first (Orbax waits for it anyway), so a failed one stops the run before the next starts."""
        self.wait()
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=_DataSave(data_iter),
            config=ocp.args.JsonSave(config)))
        self._in_flight = step

    def wait(self) -> None:
        """Blocks until the save in flight is complete. One that failed in the background (Orbax raises its error
        here, or only logs it) raises CheckpointSaveError naming the step."""
        error = None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - whatever the background write raised: reported below
            error = e
        step, self._in_flight = self._in_flight, None
        missing = step is not None and not self.path(step).is_dir()  # checked before `keep` may drop it
        if missing or error is not None:
            self.manager.reload()
            cause = f" ({_reason(error)})" if error is not None else " (see the error logged above)"
            what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
            raise CheckpointSaveError(f"{what} was not written{cause}; the newest complete one is "
                                      f"{self._newest_text()}") from error

    def _newest_text(self) -> str:
        steps = self.steps()
        return f"step {steps[-1]} ({self.path(steps[-1])})" if steps else "none"

    def close(self) -> None:
        self.manager.close()

    # ------------------------------------------------------------------------------------------------ restoring

    def restore_newest(self, abstract_state: Any, new_iterator: Callable[[], Any], config: dict) -> Restored | None:
        """The newest checkpoint that is not damaged, restored (see the module docstring); None when there is
        none. `abstract_state` is a pytree of jax.ShapeDtypeStruct (with shardings), `new_iterator()` makes an
        iterator of the run's data pipeline, `config` is the new run's config dict."""
        for step in reversed(self.steps()):
            try:
                with _orbax_quiet():
                    stored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
                    tree = self.manager.item_metadata(step)["state"]
                    if tree is None:
                        raise FileNotFoundError(f"{self.path(step)}/state has no readable metadata")
                    self._read_data_files(step)
            except DAMAGE as e:
                self._set_aside(step, e)
                continue
            notes = self._compare(step, stored["config"], config, tree, abstract_state)
            try:
                with _orbax_quiet():
                    state = self.manager.restore(
                        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
            except DAMAGE as e:
                self._set_aside(step, e)
                continue
            data_iter = new_iterator()
            try:
                self.manager.restore(step, args=ocp.args.Composite(data=_DataRestore(data_iter)))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                data_iter.close()
                raise ConfigError(f"checkpoint step {step}: its data position does not fit this data pipeline "
                                  f"({_reason(e)}); every checkpoint is left as it is") from None
            for note in notes:
                log.info("resuming with a changed %s", note)
            return Restored(step, state, data_iter)
        return None

    def _read_data_files(self, step: int) -> None:
        """Each host's iterator state is a JSON file; an unreadable one is damage (raises), found before any
        restore. A readable one that does not fit the pipeline is a mismatch, found when it is restored."""
        files = list((self.path(step) / "data").glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{self.path(step)}/data holds no iterator state")
        for path in files:
            json.loads(path.read_text())

    def _compare(self, step: int, stored: dict, config: dict, tree, abstract_state) -> list[str]:
        """Refuses (ConfigError) a checkpoint whose structure differs from this run's; returns a note for each
        changed field that may change."""
        structural, notes = resume_changes(stored, config)
        if structural:
            raise ConfigError(
                f"cannot resume from {self.path(step)}: it was written with a different "
                + "; ".join(structural) + ". Every checkpoint is left as it is: set those values back to resume, or "
                "start a new run (another train.name)")
        stored_leaves = {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(getattr(tree, "tree", tree)).items()}
        wanted = {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(abstract_state).items()}
        if stored_leaves != wanted:
            name = lambda k: ".".join(k)  # noqa: E731
            diff = ([f"missing {name(k)}" for k in sorted(wanted.keys() - stored_leaves.keys())]
                    + [f"unexpected {name(k)}" for k in sorted(stored_leaves.keys() - wanted.keys())]
                    + [f"{name(k)} has shape {stored_leaves[k]}, the model's is {wanted[k]}"
                       for k in sorted(wanted.keys() & stored_leaves.keys()) if wanted[k] != stored_leaves[k]])
            raise ConfigError(
                f"cannot resume from {self.path(step)}: its state does not have this model's tree ({len(diff)} "
                f"differences: {'; '.join(diff[:8])}{'; ...' if len(diff) > 8 else ''}). Was it written by another "
                "version of the trainer? Every checkpoint is left as it is")
        return notes

    def _set_aside(self, step: int, error: BaseException) -> None:
        """Moves a damaged checkpoint to damaged/<step> (damaged/<step>.<n> when that exists already)."""
        target = self.directory / DAMAGED / str(step)
        n = 1
        while target.exists():
            target, n = self.directory / DAMAGED / f"{step}.{n}", n + 1
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.path(step).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
        log.warning("checkpoint at step %d cannot be restored, its files are damaged (%s); moved it to %s, "
                    "trying the one before it", step, _reason(error), target)
