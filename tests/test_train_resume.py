"""Checkpoints: a run killed with SIGKILL (mid-save when we can catch one) resumes to exactly the losses of the
uninterrupted run, bit for bit; a damaged newest checkpoint is passed over for the previous complete one."""
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
    proc = subprocess.Popen(_cmd(str(out), "killed"), cwd=REPO, env=env, stdout=log, stderr=log)
    # Kill once a checkpoint is complete and the next one is being written (a tmp directory), or past step 20.
    killed_mid_save = False
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        complete = [d for d in glob.glob(str(ckpt_dir / "*")) if os.path.basename(d).isdigit()]
        in_flight = glob.glob(str(ckpt_dir / "*tmp*"))
        if complete and in_flight:
            killed_mid_save = True
            break
        if complete and max(int(os.path.basename(d)) for d in complete) >= 20:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + (out / "killed.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_before = len(_records(str(run_dir)))
    assert 0 < steps_before < len(want)

    done = _run(str(out), "killed", env)
    assert "resumed from step" in done.stderr
    assert _records(str(run_dir)) == want  # every loss, grad norm, lr and validation loss, bit for bit
    print(f"killed mid-save: {killed_mid_save}; resumed after {steps_before} records")


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
