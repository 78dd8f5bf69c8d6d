"""Many processes, one run: starting JAX's distributed system, which process writes, and a preemption all agree on.

A multi-host run is the same command started once per host (a TPU pod slice's workers, SLURM's tasks). Each
process calls `initialize(cfg.distributed)` before any device is touched; JAX's coordination service (process 0's
coordinator) then joins them into one set of global devices, one mesh and one program.

Which process does what:
- every process reads the same global data stream and feeds its own devices' rows of each batch (train/data.py),
  computes the same replicated metrics, and takes part in every checkpoint save and restore (Orbax writes each
  array's shards from the process that holds them);
- only process 0 (`is_lead()`) writes metrics.jsonl, TensorBoard, config.yaml and the progress bar, and logs the
  kernels and the compile report.

Preemption. SLURM and TPU maintenance send SIGTERM to some or all processes; a checkpoint is only whole if every
process saves the same step. With one process a Python handler sets a flag (`StopRequest`). With several, JAX's
preemption service (started by jax.distributed.initialize) catches SIGTERM in any process, tells the others through
the coordinator, and `multihost_utils.reached_preemption_sync_point(step)` turns true at the same step everywhere
(the step after the furthest any process had reached), without a collective on the step's path.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

from qwen3next_train.config import DISTRIBUTED_ARGS, ConfigError, DistributedConfig

log = logging.getLogger(__name__)

def detected_cluster() -> str | None:
    """The cluster JAX's auto-detection finds this process in (its ClusterEnv's name, e.g. SlurmCluster), or None.
    The same detection jax.distributed.initialize() runs (JAX's cluster registry; JAX is pinned to one version)."""
    from jax._src.clusters import ClusterEnv

    return next((env.__name__ for env in ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)


def initialize(cfg: DistributedConfig) -> bool:
    """Joins this process to the others of its run (see DistributedConfig); True when it did, False for a run of one
    process. Call it before anything starts a JAX backend. A value JAX or the cluster refuses is a ConfigError."""
    if cfg.initialize == "never":
        return False
    given = {k: getattr(cfg, k) for k in DISTRIBUTED_ARGS if getattr(cfg, k) is not None}
    cluster = detected_cluster()
    if cfg.initialize == "auto" and not given and cluster is None:
        return False
    try:
        jax.distributed.initialize(**given, initialization_timeout=cfg.initialization_timeout)
    except ValueError as e:
        raise ConfigError(f"distributed: {e} (given: {given or 'nothing'}; detected from the cluster: the rest). "
                          "Set the missing distributed.* fields, or run where JAX detects the cluster (a Cloud TPU "
                          "pod slice, SLURM's srun, Open MPI's mpirun)") from None
    except RuntimeError as e:  # the coordinator was not reached in time, or initialize ran twice
        raise ConfigError(f"distributed: jax.distributed.initialize({given}) failed: {e}") from None
    log.info("process %d of %d (%s); %d local of %d devices", jax.process_index(), jax.process_count(),
             f"detected {cluster}" if cluster else "no cluster detected", jax.local_device_count(), jax.device_count())
    return True


def is_lead() -> bool:
    """Whether this process writes the run's logs and files (process 0)."""
    return jax.process_index() == 0


class StopRequest:
    """SIGTERM caught for the loop's lifetime: `due(step)` is true at the step after which every process saves and
    stops (see the module docstring)."""

    def __init__(self):
        self.received = False
        self._previous = None
        self._shared = jax.process_count() > 1
        # With several processes, JAX's preemption service owns SIGTERM (a Python handler would replace its own).
        if not self._shared and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def due(self, step: int) -> bool:
        """Called once per step, with every step, on every process."""
        if self._shared:
            from jax.experimental import multihost_utils

            self.received = self.received or multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
