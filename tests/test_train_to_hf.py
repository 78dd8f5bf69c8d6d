"""A trained model leaves the trainer: train the smoke preset a few steps, `qwen3next-convert train-to-hf`, and load
the result with load_hf_checkpoint (and transformers, when PyTorch is installed). Its parameters are the trainer's
checkpoint bit for bit and its logits match the trainer's model restored from the same step in fp32 (rel err 1e-4,
as tests/test_hf_parity.py measures); the run's byte tokenizer comes along as a tokenizer.json."""
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tokenizers
from flax import nnx

from qwen3next_jax import convert
from qwen3next_jax.execution import Execution
from qwen3next_jax.hf import load_hf_checkpoint
from qwen3next_jax.hf.load import abstract_model
from qwen3next_jax.hf.tokenizer import EOS_TOKEN
from qwen3next_train import loop
from qwen3next_train.config import load_config
from qwen3next_train.data import BYTE_EOS, ByteTokenizer
from test_convert import TEXTS
from test_hf_io import _HF_RUN, _torch_python

TOL = 1e-4
FP32 = Execution(compute_dtype="float32", param_dtype="float32")


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return max(np.abs(ours - ref).max() / np.abs(ref).max(), np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The smoke preset with 4 layers (2 repeats of the scanned block, so stacked leaves are sliced), MTP, two
    checkpoints (steps 1 and 2)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("configs/smoke.yaml", [f"train.out_dir={out}", "train.steps=2", "train.eval_every=0",
                                              "checkpoint.every=1", "model.num_hidden_layers=4", "data.batch_size=8"])
    assert cfg.model.layer_types == ["linear_attention", "full_attention"] * 2 and cfg.model.mtp_num_hidden_layers
    loop.train(cfg)
    return os.path.join(out, cfg.train.name), cfg


def trainer_model(run_dir, step, cfg):
    """The trainer's model at `step`, restored by Orbax itself (the whole train state) and computing in fp32."""
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(run_dir, "checkpoints", str(step), "state"))

    def pure(tree):  # an nnx.State saved as a pytree: {"value": array} under each parameter, list indices as str
        if isinstance(tree, dict):
            if set(tree) == {"value"}:
                return np.asarray(tree["value"])
            return {int(k) if k.isdigit() else k: pure(v) for k, v in tree.items()}
        return np.asarray(tree)
    model = abstract_model(cfg.model, FP32)
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, pure(state["params"])))
    nnx.update(model, params)
    return model


def flat_params(model) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.slow  # one training run (compiling the step takes most of a minute on 2 cores); every check uses it
def test_train_to_hf_round_trip(run, tmp_path):
    run_dir, cfg = run
    out = tmp_path / "hf"
    assert convert.main(["train-to-hf", "--run", run_dir, "--out", str(out), "--dtype", "fp32",
                         "--max-shard-size", "40KB", "--no-progress"]) == 0
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(os.listdir(out))
    ours = load_hf_checkpoint(out)
    assert ours.config == cfg.model and ours.mtp is not None  # MTP included
    ref = trainer_model(run_dir, 2, cfg)  # the newest complete checkpoint
    p, q = flat_params(ref), flat_params(ours)
    assert sorted(p) == sorted(q)
    assert all(q[k].dtype == np.float32 and q[k].tobytes() == p[k].tobytes() for k in p)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, BYTE_EOS + 1, (2, 37)), jnp.int32)
    logits = nnx.jit(lambda m, x: m(x))
    assert rel_err(logits(ours, ids), logits(ref, ids)) < TOL
    # the byte tokenizer: the trainer's ids, and the end-of-document id as eos
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode(text).ids == ByteTokenizer().encode(text).tolist()
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id(EOS_TOKEN) == BYTE_EOS
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": BYTE_EOS}
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == EOS_TOKEN

    # an older step, cast to bf16
    convert.train_to_hf(run_dir, tmp_path / "hf16", step=1, dtype="bf16", progress=False)
    with open(tmp_path / "hf16" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    ours16, ref1 = flat_params(load_hf_checkpoint(tmp_path / "hf16")), flat_params(trainer_model(run_dir, 1, cfg))
    assert all(ours16[k].dtype == ml_dtypes.bfloat16 and
               ours16[k].tobytes() == ref1[k].astype(ml_dtypes.bfloat16).tobytes() for k in ref1)
    assert any(not np.array_equal(ref1[k], p[k]) for k in p)  # step 1 is not step 2


_TOKENIZER_RUN = r"""
import sys, json
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
print(json.dumps([tok(t, add_special_tokens=True)["input_ids"] for t in texts] + [tok.eos_token_id]))
"""


@pytest.mark.torch
def test_transformers_loads_a_trained_model(request, tmp_path):
    """transformers' Qwen3NextForCausalLM gives the trainer's logits on the exported run, and its AutoTokenizer the
    trainer's byte ids."""
    python = _torch_python()
    if python is None:
        pytest.skip("torch + transformers not installed")
    run_dir, cfg = request.getfixturevalue("run")  # train only where the test runs
    convert.train_to_hf(run_dir, tmp_path / "trained", dtype="fp32", progress=False)
    ids = np.random.default_rng(1).integers(0, BYTE_EOS + 1, (2, 37)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    r = subprocess.run([python, "-c", _HF_RUN, str(tmp_path), str(tmp_path / "ids.npy"), "trained"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = nnx.jit(lambda m, x: m(x))(trainer_model(run_dir, 2, cfg), jnp.asarray(ids, jnp.int32))
    assert rel_err(np.load(tmp_path / "trained.logits.npy"), ref) < TOL
    r = subprocess.run([python, "-c", _TOKENIZER_RUN, str(tmp_path / "trained"), json.dumps(TEXTS)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    *encoded, eos = json.loads(r.stdout.strip().splitlines()[-1])
    assert encoded == [list(t.encode("utf-8")) for t in TEXTS] and eos == BYTE_EOS
