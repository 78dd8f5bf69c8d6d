"""A run whose directory, data sources and tokenizer are in a bucket (gs://, served by tests/fake_bucket.py)
trains, checkpoints and resumes exactly as the same run on local paths, and a Hugging Face checkpoint in a bucket
loads as the local one does. Every path goes through etils.epath and Orbax's gs:// code path; none through a
local-only call (the current directory stays empty: an os.makedirs or open on "gs://..." would make a gs: folder)."""
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

import fake_bucket
from qwen3next_jax.hf import load_hf_checkpoint
from qwen3next_jax.hf.files import CheckpointError
from qwen3next_jax.hf.safetensors import SafetensorsReader
from qwen3next_jax.hf.tokenizer import byte_tokenizer
from qwen3next_jax.orbax_io import load_orbax_params, save_orbax_params
from qwen3next_train import loop
from qwen3next_train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden", "tiny_mtp")
TIMING = {"step_time", "tokens_per_s_per_device", "mfu"}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The later runs load the steps the first one compiled."""
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://b/ served from tmp_path/bucket/b; the current directory an empty folder."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield fake_bucket.install(monkeypatch, tmp_path / "bucket")
    assert os.listdir(tmp_path / "cwd") == [], "a local-only call wrote beside the run"


def _inputs(root: epath.Path) -> None:
    """Documents (JSONL and text files) and a tokenizer.json under root, written through epath."""
    (root / "data" / "txt").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": f"document {i}: " + "the quick brown fox " * (i % 9)}) for i in range(60)]
    (root / "data" / "a.jsonl").write_text("\n".join(lines) + "\n")
    for i in range(20):
        (root / "data" / "txt" / f"{i}.txt").write_text(f"text file {i} " * (1 + i % 5))
    (root / "tok").mkdir(exist_ok=True)
    (root / "tok" / "tokenizer.json").write_text(byte_tokenizer(256).to_str())


def _config(root: str):
    return load_config(f"{REPO}/configs/smoke.yaml", [
        f"train.out_dir={root}/runs", "train.steps=6", "checkpoint.every=3", "train.eval_every=0",
        "data.batch_size=8", f"data.sources=[{root}/data/*.jsonl,{root}/data/txt]", f"data.tokenizer={root}/tok"])


def _records(run_dir: epath.Path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_in_a_bucket_trains_and_resumes_like_a_local_one(bucket, tmp_path, caplog):
    local, remote = str(tmp_path / "local"), "gs://b"
    for root in (local, remote):
        _inputs(epath.Path(root))
    loop.train(_config(local))
    want = _records(epath.Path(local) / "runs" / "smoke")

    loop.train(_config(remote))
    run_dir = epath.Path(remote) / "runs" / "smoke"
    assert _records(run_dir) == want  # the same documents, tokens, batches and steps, bit for bit
    on_disk = tmp_path / "bucket" / "b" / "runs" / "smoke"
    assert (on_disk / "config.yaml").exists() and os.listdir(on_disk / "tensorboard")
    assert sorted(os.listdir(on_disk / "checkpoints")) == ["3", "6"]
    assert (on_disk / "checkpoints" / "6" / "commit_success.txt").exists()  # Orbax's GCS commit, not a rename

    # Resume: without its newest checkpoint the run restores step 3 from the bucket (state, data position,
    # config) and computes steps 4-6 again, identically.
    (run_dir / "checkpoints" / "6").rmtree()
    with caplog.at_level(logging.INFO, logger="qwen3next_train.loop"):
        loop.train(_config(remote))
    assert "resumed from step 3" in caplog.text
    assert _records(run_dir) == want


def test_checkpoints_to_start_from_load_from_a_bucket_as_from_a_local_folder(bucket, tmp_path):
    """checkpoint.init_from_hf (safetensors) and checkpoint.init_from_params (an Orbax params checkpoint)."""
    shutil.copytree(GOLDEN, tmp_path / "bucket" / "b" / "hf")
    local, remote = SafetensorsReader(GOLDEN), SafetensorsReader("gs://b/hf")  # a memory map / byte ranges
    assert remote.names() == local.names() and remote.shape == local.shape and remote.dtype == local.dtype
    for name in local.names():
        np.testing.assert_array_equal(remote.get(name), local.get(name))
    a, b = (nnx.state(load_hf_checkpoint(p), nnx.Param) for p in (GOLDEN, "gs://b/hf"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    cfg = load_config(f"{REPO}/configs/smoke.yaml", ["checkpoint.init_from_hf=gs://b/hf"])
    assert loop.model_config(cfg) == load_hf_checkpoint(GOLDEN).config

    save_orbax_params(load_hf_checkpoint(GOLDEN), tmp_path / "params")
    shutil.copytree(tmp_path / "params", tmp_path / "bucket" / "b" / "params")
    a, b = (nnx.state(load_orbax_params(p), nnx.Param) for p in (tmp_path / "params", "gs://b/params"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    cfg = load_config(f"{REPO}/configs/smoke.yaml", ["checkpoint.init_from_params=gs://b/params"])
    assert loop.model_config(cfg) == load_hf_checkpoint(GOLDEN).config

    # A truncated file in the bucket is named, as a local one is.
    data = (tmp_path / "bucket" / "b" / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "bucket" / "b" / "hf" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="gs://b/hf/model.safetensors"):
        reader = SafetensorsReader("gs://b/hf")
        for name in reader.names():
            reader.get(name)
