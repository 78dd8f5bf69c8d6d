"""Fine-tuning starts from a Hugging Face checkpoint or an Orbax params checkpoint: its config.json defines the
model, its tensors the weights."""
import dataclasses
import os

import numpy as np
import orbax.checkpoint as ocp
import yaml
from safetensors.numpy import load_file

from qwen3next_jax import sharding as shd
from qwen3next_train import loop
from qwen3next_train.checkpoint import Checkpoints
from qwen3next_train.config import CheckpointConfig, load_config

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_mtp")


def test_init_from_hf_checkpoint(tmp_path):
    cfg = load_config("configs/smoke.yaml", [
        f"train.out_dir={tmp_path}", "train.steps=1", "train.eval_every=0", "checkpoint.every=1",
        f"checkpoint.init_from_hf={GOLDEN}", "optim.lr=0", "optim.weight_decay=0", "data.batch_size=8"])
    last = loop.train(cfg)
    assert np.isfinite(last["loss"])
    run_dir = tmp_path / "smoke"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["model"]["hidden_size"] == 16 and resolved["model"]["vocab_size"] == 300  # from config.json

    # With a zero learning rate the saved step-1 parameters are the checkpoint's tensors.
    manager = Checkpoints(str(run_dir / "checkpoints"), CheckpointConfig()).manager
    state = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    lm_head = np.asarray(state["params"]["lm_head"]["kernel"]["value"])
    hf = load_file(os.path.join(GOLDEN, "model.safetensors"))
    np.testing.assert_array_equal(lm_head, hf["lm_head.weight"].T)
    np.testing.assert_array_equal(np.asarray(state["params"]["mtp"]["fc"]["kernel"]["value"]), hf["mtp.fc.weight"].T)

    # The run resumes without its source: its config.yaml holds the source's model.
    again = load_config(str(run_dir / "config.yaml"), ["checkpoint.init_from_hf=null"])
    assert loop.train(again) == {}  # resumed at step 1 of 1: nothing left to run


def test_init_from_params_checkpoint(tmp_path):
    """checkpoint.init_from_params: the Orbax params checkpoint's config.json defines the model and its arrays are
    step 0's parameters, each placed in its shard of the run's mesh."""
    import jax
    from flax import nnx

    from qwen3next_jax import Qwen3NextForCausalLM
    from qwen3next_jax.convert import save_orbax_params

    source_cfg = load_config("configs/smoke.yaml").model.replace(hidden_size=48)
    source = Qwen3NextForCausalLM(source_cfg, rngs=nnx.Rngs(7))
    save_orbax_params(source, tmp_path / "params")
    cfg = load_config("configs/smoke.yaml", [f"checkpoint.init_from_params={tmp_path / 'params'}",
                                             "data.batch_size=8"])
    assert loop.model_config(cfg) == source_cfg  # its config wins over the YAML's model section
    cfg = dataclasses.replace(cfg, model=loop.model_config(cfg))
    mesh = loop.make_mesh(cfg)
    params = loop.initial_params(cfg, mesh)
    want = nnx.state(source, nnx.Param)
    shardings = shd.state_shardings(want, mesh)
    got_leaves = jax.tree.leaves(params)
    assert len(got_leaves) == len(jax.tree.leaves(want))
    for got, expected, sharding in zip(got_leaves, jax.tree.leaves(want), jax.tree.leaves(shardings)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
        assert got.sharding == sharding
