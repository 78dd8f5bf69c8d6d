"""scripts/random_hf_checkpoint.py: a random-weight checkpoint has exactly the names, shapes and files layout the
exporter writes for the same config, loads with load_hf_checkpoint, and a shorter one is the first layers of a
longer one; the 80B plan (names and shapes only) is the real checkpoint's."""
import importlib.util
import os
import re
from collections import Counter

import jax
import numpy as np
from flax import nnx

from qwen3next_jax import Qwen3NextForCausalLM
from qwen3next_jax.execution import Execution
from qwen3next_jax.hf import load_hf_checkpoint, save_hf_checkpoint
from qwen3next_jax.hf.files import read_json
from qwen3next_jax.hf.safetensors import SafetensorsReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("random_hf_checkpoint",
                                               os.path.join(ROOT, "scripts", "random_hf_checkpoint.py"))
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def _tensors(path):
    reader = SafetensorsReader(path)
    return {n: (reader.shape[n], reader.dtype[n]) for n in reader.names()}, reader


def test_random_checkpoint_matches_the_exporter_and_loads(tmp_path):
    plan = script.main(["--preset", "tiny", str(tmp_path / "rand"), "--max-shard-size", "200KB", "--workers", "2"])
    cfg = script.preset_config("tiny")
    bf16 = Execution(compute_dtype="bfloat16", param_dtype="bfloat16")
    model = Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0), execution=bf16)
    save_hf_checkpoint(model, tmp_path / "export", max_shard_size="200KB")
    ours, reader = _tensors(tmp_path / "rand")
    theirs, other = _tensors(tmp_path / "export")
    assert ours == theirs and len(ours) == len(plan.entries)
    assert sorted(os.listdir(tmp_path / "rand")) == sorted(os.listdir(tmp_path / "export"))
    assert read_json(tmp_path / "rand" / "config.json") == read_json(tmp_path / "export" / "config.json")
    assert read_json(tmp_path / "rand" / "model.safetensors.index.json") == \
        read_json(tmp_path / "export" / "model.safetensors.index.json")
    loaded = load_hf_checkpoint(tmp_path / "rand")
    leaves = jax.tree.leaves(nnx.state(loaded, nnx.Param))
    assert sum(x.size for x in leaves) == plan.parameters
    w = reader.get("model.layers.0.mlp.experts.3.up_proj.weight").astype(np.float32)
    assert np.all(np.isfinite(w)) and 0.6 * cfg.initializer_range < w.std() < 1.4 * cfg.initializer_range
    reader.close()
    other.close()


def test_fewer_layers_are_the_first_layers(tmp_path):
    script.main(["--preset", "tiny", "--layers", "2", str(tmp_path / "two")])
    script.main(["--preset", "tiny", str(tmp_path / "four")])
    two, four = SafetensorsReader(tmp_path / "two"), SafetensorsReader(tmp_path / "four")
    assert set(two.names()) < set(four.names())
    for name in two.names():
        np.testing.assert_array_equal(two.get(name), four.get(name), err_msg=name)
    two.close()
    four.close()


def test_80b_plan_has_every_expert_and_mtp():
    plan = script.main(["--plan-only"])
    names = [t.name for t in plan.entries]
    experts = Counter()
    for name in names:
        if m := re.match(r"^(model|mtp)\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$", name):
            experts[m.group(1), int(m.group(2))] += 1
    assert sorted(experts) == [("model", i) for i in range(48)] + [("mtp", 0)]
    assert set(experts.values()) == {512 * 3}
    shapes = {t.name: t.spec.hf_shape for t in plan.entries}
    assert shapes["mtp.fc.weight"] == (2048, 4096)
    assert shapes["model.layers.0.mlp.experts.511.down_proj.weight"] == (2048, 512)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (16 * 256 * 2, 2048)
    assert shapes["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (2 * 16 * 128 + 2 * 32 * 128, 2048)
    assert {"mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
            "mtp.layers.0.self_attn.o_proj.weight", "lm_head.weight"} <= set(names)
    assert plan.parameters == 81_324_862_720  # DESIGN.md: 81.3B with MTP
    assert len(names) == len(set(names)) == 75_944
    assert all(t.spec.dtype == np.dtype("bfloat16") for t in plan.entries) and plan.nbytes == 2 * plan.parameters
