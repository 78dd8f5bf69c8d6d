"""Checkpoints: a run killed with SIGKILL while a save is in flight, or stopped by SIGTERM, resumes to exactly the
losses of the uninterrupted run, bit for bit; a damaged newest checkpoint is set aside for the previous complete one.

The killed run's saves are slowed (a launcher makes Orbax's background commit sleep before it writes), so the kill
lands while a save is in flight on any machine, however fast or loaded; the test asserts that it did."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"step_time", "tokens_per_s_per_device", "mfu"}


def _cmd(out_dir, name):
    return [sys.executable, "-m", "qwen3next_train", "--config", "configs/smoke.yaml", "train.steps=40", "checkpoint.every=5",
            "checkpoint.keep=2", "train.eval_every=10", f"train.out_dir={out_dir}", f"train.name={name}"]


# The killed run: every checkpoint's background commit first sleeps 2 s, with the temporary directory in place.
SLOW_SAVES = """
import sys, time
from orbax.checkpoint._src.checkpointers import async_checkpointer
commit = async_checkpointer._background_wait_for_commit_futures
def slow_commit(*args, **kwargs):
    time.sleep(2.0)
    return commit(*args, **kwargs)
async_checkpointer._background_wait_for_commit_futures = slow_commit
from qwen3next_train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _env(cache_dir):
    # One compilation cache for all runs: the later processes load the step instead of compiling it again.
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _run(out_dir, name, env):
    done = subprocess.run(_cmd(out_dir, name), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("runs")
    env = _env(str(out / "jax_cache"))
    _run(str(out), "reference", env)
    return out, env, _records(str(out / "reference"))


def test_sigkill_then_resume_is_bit_exact(reference):
    out, env, want = reference
    run_dir = out / "killed"
    ckpt_dir = run_dir / "checkpoints"
    log = open(out / "killed.log", "w")
    slow_cmd = [sys.executable, "-c", SLOW_SAVES] + _cmd(str(out), "killed")[3:]
    proc = subprocess.Popen(slow_cmd, cwd=REPO, env=env, stdout=log, stderr=log)
    # Kill once a checkpoint is complete and the next one is being written (a tmp directory).
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        complete = [d for d in glob.glob(str(ckpt_dir / "*")) if os.path.basename(d).isdigit()]
        if complete and glob.glob(str(ckpt_dir / "*tmp*")):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + (out / "killed.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert glob.glob(str(ckpt_dir / "*tmp*")), "the kill did not land while a save was in flight"
    steps_before = len(_records(str(run_dir)))
    assert 0 < steps_before < len(want)

    done = _run(str(out), "killed", env)
    assert "resumed from step" in done.stderr
    assert _records(str(run_dir)) == want  # every loss, grad norm, lr and validation loss, bit for bit
    assert not glob.glob(str(ckpt_dir / "*tmp*"))  # the half-written checkpoint was never restored, and is gone


def test_sigterm_saves_and_resumes_bit_exact(reference):
    """SIGTERM (a preemption) mid-run: the step in hand is saved, the process exits 75, the same command resumes."""
    out, env, want = reference
    run_dir = out / "preempted"
    log = open(out / "preempted.log", "w")
    proc = subprocess.Popen(_cmd(str(out), "preempted"), cwd=REPO, env=env, stdout=log, stderr=log)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(run_dir / "metrics.jsonl") and len(_records(str(run_dir))) >= 7:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before SIGTERM:\n" + (out / "preempted.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 75, (out / "preempted.log").read_text()[-3000:]
    stopped = [r["step"] for r in _records(str(run_dir)) if "loss" in r][-1]
    assert f"SIGTERM: stopping after step {stopped}" in (out / "preempted.log").read_text()
    steps = sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())
    assert steps[-1] == stopped and stopped < 40

    done = _run(str(out), "preempted", env)
    assert f"resumed from step {stopped}" in done.stderr
    assert _records(str(run_dir)) == want


def test_damaged_newest_checkpoint_is_passed_over(reference):
    out, env, want = reference
    run_dir = out / "reference"
    steps = sorted(int(os.path.basename(d)) for d in glob.glob(str(run_dir / "checkpoints" / "*"))
                   if os.path.basename(d).isdigit())
    assert steps == [35, 40]
    for path in glob.glob(str(run_dir / "checkpoints" / "40" / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:  # garbage over every byte of the newest parameters and moments
                size = f.seek(0, 2)
                f.seek(0)
                f.write(b"\x5a" * size)
    done = _run(str(out), "reference", env)
    assert "checkpoint at step 40 cannot be restored" in done.stderr
    assert "resumed from step 35" in done.stderr
    assert _records(str(run_dir)) == want  # steps 36..40 recomputed from step 35, identically
    # The damaged checkpoint was moved aside, not deleted, with one line and no traceback.
    assert os.listdir(run_dir / "checkpoints" / "damaged") == ["40"]
    assert done.stderr.count("cannot be restored") == 1 and "Traceback" not in done.stderr
