"""The non-finite policy: a step whose gradient is not finite is skipped (no update, the schedule does not move),
training goes on, and N such steps in a row stop the run without saving the state they produced."""
import json
import math
import os

import numpy as np
import pytest

from qwen3next_train import loop
from qwen3next_train.config import load_config


def test_nan_step_is_skipped_and_a_run_of_them_stops(tmp_path, monkeypatch):
    cfg = load_config("configs/smoke.yaml", [
        f"train.out_dir={tmp_path}", "train.steps=10", "train.eval_every=0", "checkpoint.every=2",
        "optim.max_nonfinite_steps=2", "data.batch_size=8"])
    poisoned_steps, calls = {3, 5, 6}, iter(range(1, 100))
    real_global_batch = loop._global_batch

    def global_batch(batch, sharding):
        if next(calls) in poisoned_steps:  # a token id outside the vocabulary embeds as NaN
            batch = dict(batch, input_ids=np.where(np.arange(batch["input_ids"].shape[1]) == 0,
                                                   cfg.model.vocab_size, batch["input_ids"]))
        return real_global_batch(batch, sharding)

    monkeypatch.setattr(loop, "_global_batch", global_batch)
    with pytest.raises(loop.NonFiniteError, match="2 non-finite steps in a row"):
        loop.train(cfg)

    run_dir = tmp_path / "smoke"
    with open(run_dir / "metrics.jsonl") as f:
        steps = {r["step"]: r for r in map(json.loads, f)}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert steps[3]["skipped"] == 1 and math.isnan(steps[3]["loss"])
    assert steps[4]["skipped"] == 0 and math.isfinite(steps[4]["loss"])  # the NaN update was never applied
    assert steps[4]["lr"] == steps[3]["lr"]  # nor did the skipped step advance the schedule
    assert steps[5]["skipped"] == steps[6]["skipped"] == 1
    saved = sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())
    assert saved == [2, 4]  # the run stopped before saving step 6


def test_no_checkpoint_is_written_during_a_nonfinite_streak(tmp_path, monkeypatch):
    """Steps 3, 4 and 5 are non-finite. The save due at step 4 would hold a non-zero streak counter and a data
    position past the bad batches; it is not written, and the stop names step 2 as the last healthy checkpoint."""
    cfg = load_config("configs/smoke.yaml", [
        f"train.out_dir={tmp_path}", "train.steps=10", "train.eval_every=0", "checkpoint.every=2",
        "optim.max_nonfinite_steps=3", "data.batch_size=8"])
    poisoned_steps, calls = {3, 4, 5}, iter(range(1, 100))
    real_global_batch = loop._global_batch

    def global_batch(batch, sharding):
        if next(calls) in poisoned_steps:
            batch = dict(batch, input_ids=np.full_like(batch["input_ids"], cfg.model.vocab_size))
        return real_global_batch(batch, sharding)

    monkeypatch.setattr(loop, "_global_batch", global_batch)
    run_dir = tmp_path / "smoke"
    with pytest.raises(loop.NonFiniteError) as e:
        loop.train(cfg)
    assert "3 non-finite steps in a row (step 5)" in str(e.value)
    assert f"The last healthy checkpoint is step 2 ({run_dir / 'checkpoints' / '2'})" in str(e.value)
    saved = sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())
    assert saved == [2]
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["skipped"] for r in records] == [0, 0, 1, 1, 1]
    assert all("expert_load_max" in r and "dropped" in r for r in records)  # the router statistics are logged
    assert records[0]["expert_load_max"] >= 1 and records[0]["dropped"] == 0
