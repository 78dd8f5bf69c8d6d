"""Several processes, one run: two processes on localhost (4 fake CPU devices each, joined by
jax.distributed.initialize through a coordinator on a free port) train the smoke preset as one process with 8
devices does, survive a SIGKILL and a SIGTERM sent to one of them, and hand the run to a single process.

The story of one run, each part resuming the part before:
1. two processes, started as SLURM's srun starts them (JAX detects the cluster from srun's variables), train with
   slowed steps and are SIGKILLed once a checkpoint is complete;
2. two processes, given coordinator, count and id explicitly, resume from it; process 1 alone gets SIGTERM: both
   save the same step and exit 75;
3. one process with 8 devices resumes that two-process checkpoint (model, optimizer and data position) and finishes.
The two-process parts build the hybrid mesh (mesh.slices=2: each process a granule of the data axis). Its
metrics.jsonl must match the uninterrupted run of one process with 8 devices: steps and learning rates exactly,
the losses and gradient norms (reductions over the devices, which two processes sum in another order, so the
parameters drift by fp32 roundings) within 1e-6 relative. Only process 0 writes metrics, TensorBoard and config.yaml, and logs the kernels and
the compile report.
"""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"step_time", "tokens_per_s_per_device", "mfu"}
# Reductions over devices: two processes sum them in another order than one.
ROUNDED = {"loss", "ce", "mtp", "aux", "z_loss", "val_loss", "val_mtp1", "grad_norm"}
STEPS = 9
RUN = ["--config", "configs/smoke.yaml", f"train.steps={STEPS}", "checkpoint.every=3", "train.eval_every=3",
       "data.batch_size=8", "train.progress=true"]

# Steps slowed on the host, so that a signal lands mid-run however fast the machine.
SLOW_STEPS = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)  # as main() does; importing the trainer first would configure it otherwise
from qwen3next_train import loop
batch = loop._global_batch
def slow_batch(*args):
    time.sleep(0.25)
    return batch(*args)
loop._global_batch = slow_batch
from qwen3next_train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache, devices):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "PYTHONPATH": REPO,
            "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _start(out, name, processes, cache, slow=False, slurm=False):
    """Starts the run's processes (stdout and stderr to out/<name>.<i>.log); returns them with their logs. Several
    processes find each other through explicit distributed.* values, or (slurm) through the variables srun sets,
    which JAX's cluster detection reads (JAX_COORDINATOR_PORT picks a free port instead of the job id's)."""
    port = _free_port()
    procs = []
    for i in range(processes):
        args = RUN + [f"train.out_dir={out}", "train.name=run"]
        env = _env(cache, 8 // processes)
        if processes > 1:
            args += [f"mesh.slices={processes}"]  # the hybrid mesh: the data axis across processes
        if processes > 1 and slurm:
            args += ["distributed.initialize=always"]
            env.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(processes),
                       SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port))
        elif processes > 1:
            args += [f"distributed.coordinator_address=127.0.0.1:{port}", f"distributed.num_processes={processes}",
                     f"distributed.process_id={i}"]
        cmd = [sys.executable, "-c", SLOW_STEPS, *args] if slow else [sys.executable, "-m", "qwen3next_train", *args]
        log = out / f"{name}.{i}.log"
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs, timeout=300):
    codes = [p.wait(timeout=timeout) for p, _ in procs]
    return codes, [log.read_text() for _, log in procs]


def _records(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _steps(run_dir):
    return sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One compilation cache: every later process loads the steps the first ones compiled."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("reference")
    codes, logs = _wait(_start(out, "reference", 1, cache))
    assert codes == [0], logs[0][-3000:]
    return _records(out / "run")


@pytest.mark.slow  # four launches of JAX, two of them two processes at once, on 2 cores
def test_two_processes_kill_preempt_and_resume_on_one(reference, tmp_path, cache):
    run_dir = tmp_path / "run"

    # 1. Two processes, SIGKILLed once a checkpoint is complete.
    procs = _start(tmp_path, "killed", 2, cache, slow=True, slurm=True)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p, _ in procs):
        if os.path.isdir(run_dir / "checkpoints") and _steps(run_dir):
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p, _ in procs), "\n".join(log.read_text()[-2000:] for _, log in procs)
    assert "process 1 of 2 (detected SlurmCluster)" in procs[1][1].read_text()
    for p, _ in procs:
        os.kill(p.pid, signal.SIGKILL)
    _wait(procs)
    killed_at = _steps(run_dir)[-1]
    assert killed_at < STEPS

    # 2. Two processes resume; process 1 alone is preempted, and both save the same step.
    procs = _start(tmp_path, "preempted", 2, cache, slow=True)
    deadline = time.time() + 300
    while time.time() < deadline and procs[1][0].poll() is None:
        if len(_records(run_dir)) > killed_at + 1:  # a step after the resumed one (later records were dropped)
            break
        time.sleep(0.05)
    os.kill(procs[1][0].pid, signal.SIGTERM)
    codes, logs = _wait(procs)
    assert codes == [75, 75], "\n".join(log[-3000:] for log in logs)
    stopped = _steps(run_dir)[-1]
    assert killed_at < stopped < STEPS
    for log in logs:
        assert f"resumed from step {killed_at}" in log
        assert f"SIGTERM: stopping after step {stopped}" in log
    assert "[process 1/2]" in logs[1]  # every log line names its process
    # Only process 0 logs the kernels and the compile report, and draws the progress bar.
    for marker in ("kernels per call site", "train step compiled", f"/{STEPS} ["):
        assert marker in logs[0] and marker not in logs[1], marker

    # 3. One process with 8 devices resumes the two-process checkpoint and finishes.
    codes, logs = _wait(_start(tmp_path, "single", 1, cache))
    assert codes == [0], logs[0][-3000:]
    assert f"resumed from step {stopped}" in logs[0]

    # One writer: each record once. Every record as the single process's: steps and learning rates exactly; the
    # losses and gradient norms, summed over the devices of two processes in another order, within fp32 rounding.
    records = _records(run_dir)
    assert [(r["step"], sorted(r)) for r in records] == [(r["step"], sorted(r)) for r in reference]
    assert any(r["step"] > stopped for r in reference)  # steps of the single process, from the handed-over state
    for got, want in zip(records, reference):
        exact = {k: v for k, v in want.items() if k not in ROUNDED}
        assert {k: got[k] for k in exact} == exact
        assert {k: got[k] for k in want if k in ROUNDED} == pytest.approx({k: want[k] for k in want if k in ROUNDED},
                                                                          rel=1e-6)
    # One TensorBoard event file per start of the run, each written by process 0 alone.
    assert len(glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))) == 3
    # config.yaml, kept as config.<n>.yaml whenever a start changed it (here the coordinator's port): each version
    # written by process 0.
    import yaml

    versions = [yaml.safe_load(open(p)) for p in glob.glob(str(run_dir / "config*.yaml"))]
    assert len(versions) == 3 and {v["distributed"]["process_id"] for v in versions} == {0, None}


def test_multislice_mesh_puts_each_slice_on_its_share_of_the_data_axis():
    """Two TPU v5p slices of 4 chips (ahead-of-time devices: libtpu, no TPU): mesh.slices=2 gives each slice one row
    of the data axis and the whole fsdp axis; inside a slice the chips follow the physical torus, not their ids."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    from qwen3next_jax.sharding import make_mesh

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc("v5p:2x2x1", "tpu", num_slices=2).devices
    mesh = make_mesh(devices, data=2, fsdp=-1, slices=2)
    assert mesh.shape["data"] == 2 and mesh.shape["fsdp"] == 4
    grid = mesh.devices.reshape(2, 4)
    assert [{d.slice_index for d in row} for row in grid] == [{0}, {1}]
    torus = [tuple(d.coords) for d in make_mesh(devices[:4], fsdp=4).devices.flat]
    assert torus == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]  # by ids it would be (0,0), (1,0), (0,1), (1,1)
    with pytest.raises(ValueError, match="must be a multiple of slices"):
        make_mesh(devices, data=1, fsdp=-1, slices=2)

