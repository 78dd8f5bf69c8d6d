"""Hugging Face checkpoint import/export (qwen3next_jax.hf) and the Orbax converter (qwen3next_jax.convert).

Round trips are bit exact (same names, dtypes, shapes, bytes) on the transformers-written goldens, sharded and single
file, fp32 and bf16, with and without MTP; malformed checkpoints raise one error naming every bad tensor; the
transformers 4.57 config layout reads like the 5.x one. The `torch` test loads our export with transformers itself.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen3next_jax import convert
from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import Execution
from qwen3next_jax.hf import CheckpointMismatchError, load_hf_checkpoint, save_hf_checkpoint
from qwen3next_jax.hf import files as hf_files, load as hf_load, names as hf_names, save as hf_save
from qwen3next_jax.hf.safetensors import SafetensorsReader

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_all(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (via the index when there is one)."""
    reader = SafetensorsReader(path)
    try:
        return {n: reader.get(n) for n in reader.names()}
    finally:
        reader.close()


def assert_bit_exact(a_dir, b_dir):
    a, b = read_all(a_dir), read_all(b_dir)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:20]
    bad = [n for n in a if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape
           or a[n].tobytes() != b[n].tobytes()]
    assert not bad, f"tensors differ: {bad[:20]}"


def params_of(model) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def copy_golden(name, tmp_path) -> str:
    dst = os.path.join(tmp_path, name)
    shutil.copytree(os.path.join(GOLDEN, name), dst)
    return dst


def rewrite_single(path, edit):
    """Apply edit(dict of tensors) to a single-file checkpoint in place."""
    f = os.path.join(path, "model.safetensors")
    tensors = read_all(path)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("name", ["tiny", "odd", "tiny_mtp"])
@pytest.mark.parametrize("shard", ["60KB", "5GB"])
def test_round_trip_bit_exact(name, shard, tmp_path):
    src = os.path.join(GOLDEN, name)
    model = load_hf_checkpoint(src)
    files = save_hf_checkpoint(model, tmp_path / "out", max_shard_size=shard)
    sharded = shard == "60KB"
    assert ("model.safetensors.index.json" in files) == sharded
    assert os.path.exists(tmp_path / "out" / ("model.safetensors.index.json" if sharded else "model.safetensors"))
    assert_bit_exact(src, tmp_path / "out")
    if sharded:
        with open(tmp_path / "out" / "model.safetensors.index.json") as f:
            index = json.load(f)
        assert set(index["weight_map"].values()) == {x for x in files if x.endswith(".safetensors")}
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in read_all(src).values())
        for fn in set(index["weight_map"].values()):  # max_shard_size respected (no single tensor is larger)
            assert os.path.getsize(tmp_path / "out" / fn) < 60_000 + 10_000
    # and back in: the same parameters, the same config
    again = load_hf_checkpoint(tmp_path / "out")
    p, q = params_of(model), params_of(again)
    assert sorted(p) == sorted(q) and all(p[k].tobytes() == q[k].tobytes() for k in p)
    assert again.config == model.config


def test_export_writes_per_expert_layout_and_transformers5_config(tmp_path):
    model = load_hf_checkpoint(os.path.join(GOLDEN, "tiny"))
    save_hf_checkpoint(model, tmp_path)
    names = set(read_all(tmp_path))
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "qwen3_next" and cfg["architectures"] == ["Qwen3NextForCausalLM"]
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.25 and "rope_theta" not in cfg
    assert cfg["dtype"] == "float32" and cfg["mtp_num_hidden_layers"] == 0


def test_stacked_layout_matches_hf_layer_index():
    """HF layer i lives at (r, j) = divmod(i, period) of the stacked blocks, kernels transposed."""
    src = os.path.join(GOLDEN, "tiny")
    model, ref = load_hf_checkpoint(src), read_all(src)
    stack = model.model.layers
    assert (stack.period, stack.repeats) == (4, 2)
    for i in range(8):
        r, j = stack.layer_location(i)
        blk = stack.blocks[j]
        np.testing.assert_array_equal(blk.post_attention_layernorm.weight[...][r],
                                      ref[f"model.layers.{i}.post_attention_layernorm.weight"])
        np.testing.assert_array_equal(blk.mlp.experts.down_proj[...][r, 5],
                                      ref[f"model.layers.{i}.mlp.experts.5.down_proj.weight"].T)
        if i % 4 != 3:
            np.testing.assert_array_equal(blk.mixer.conv1d.kernel[...][r],
                                          ref[f"model.layers.{i}.linear_attn.conv1d.weight"][:, 0, :].T)
        else:
            np.testing.assert_array_equal(blk.mixer.q_proj.kernel[...][r],
                                          ref[f"model.layers.{i}.self_attn.q_proj.weight"].T)


def test_bf16_round_trip_and_cast(tmp_path):
    """dtype=bf16 casts; a bf16 checkpoint loads as bf16 with dtype=None and exports bit for bit."""
    model = load_hf_checkpoint(os.path.join(GOLDEN, "odd"),
                               execution=Execution(compute_dtype="bfloat16", param_dtype="bfloat16"))
    assert {v.dtype for v in params_of(model).values()} == {np.dtype(ml_dtypes.bfloat16)}
    save_hf_checkpoint(model, tmp_path / "bf16", max_shard_size="40KB")
    tensors = read_all(tmp_path / "bf16")
    ref = read_all(os.path.join(GOLDEN, "odd"))
    for n, t in tensors.items():
        assert t.dtype == ml_dtypes.bfloat16
        assert t.tobytes() == ref[n].astype(ml_dtypes.bfloat16).tobytes(), n
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    again = load_hf_checkpoint(tmp_path / "bf16")
    assert again.model.embed_tokens.embedding.dtype == jnp.bfloat16
    save_hf_checkpoint(again, tmp_path / "bf16b", max_shard_size="40KB")
    assert_bit_exact(tmp_path / "bf16", tmp_path / "bf16b")


def test_mixed_dtypes_are_kept_per_tensor(tmp_path):
    """dtype=None keeps every tensor's own dtype (e.g. fp32 A_log in a bf16 checkpoint)."""
    path = copy_golden("odd", tmp_path)

    def to_bf16_but_alog(t):
        for n in t:
            if not n.endswith("A_log"):
                t[n] = t[n].astype(ml_dtypes.bfloat16)
    rewrite_single(path, to_bf16_but_alog)
    model = load_hf_checkpoint(path)
    assert model.model.layers.blocks[0].mixer.A_log.dtype == jnp.float32
    assert model.model.layers.blocks[0].mixer.dt_bias.dtype == jnp.bfloat16
    save_hf_checkpoint(model, tmp_path / "out")
    assert_bit_exact(path, tmp_path / "out")


def test_large_stacked_leaves_assembled_per_repeat(tmp_path, monkeypatch):
    """The device-side, one-repeat-at-a-time assembly gives the same parameters as the host path."""
    monkeypatch.setattr(hf_load, "STACK_ON_HOST_BYTES", 0)
    src = os.path.join(GOLDEN, "tiny")
    model = load_hf_checkpoint(src)
    save_hf_checkpoint(model, tmp_path)
    assert_bit_exact(src, tmp_path)


@pytest.mark.parametrize("per_repeat", [False, True])
def test_load_onto_a_mesh(tmp_path, monkeypatch, per_repeat):
    from qwen3next_jax.sharding import make_mesh
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    if per_repeat:
        monkeypatch.setattr(hf_load, "STACK_ON_HOST_BYTES", 0)
    mesh = make_mesh(jax.devices()[:4], fsdp=2, expert=2)
    src = os.path.join(GOLDEN, "tiny")
    model = load_hf_checkpoint(src, mesh=mesh)
    experts = model.model.layers.blocks[0].mlp.experts.gate_proj[...]
    assert experts.sharding.spec[1] == "expert" and len(experts.sharding.device_set) == 4
    embed = model.model.embed_tokens.embedding[...]
    assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    save_hf_checkpoint(model, tmp_path, max_shard_size="60KB")
    assert_bit_exact(src, tmp_path)


# ---------------------------------------------------------------------------------------------------------- MTP

def test_mtp_weights_loaded_and_depth_inferred():
    src = os.path.join(GOLDEN, "tiny_mtp")
    with open(os.path.join(src, "config.json")) as f:
        assert "mtp_num_hidden_layers" not in json.load(f)  # like the real checkpoint
    model, ref = load_hf_checkpoint(src), read_all(src)
    assert model.config.mtp_num_hidden_layers == 1 and len(model.mtp.layers) == 1
    np.testing.assert_array_equal(model.mtp.fc.kernel[...], ref["mtp.fc.weight"].T)
    np.testing.assert_array_equal(model.mtp.pre_fc_norm_embedding.weight[...], ref["mtp.pre_fc_norm_embedding.weight"])
    np.testing.assert_array_equal(model.mtp.norm.weight[...], ref["mtp.norm.weight"])
    layer = model.mtp.layers[0]
    np.testing.assert_array_equal(layer.mixer.k_proj.kernel[...], ref["mtp.layers.0.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(layer.mlp.experts.up_proj[...][3], ref["mtp.layers.0.mlp.experts.3.up_proj.weight"].T)
    # HF-saved checkpoints have no mtp.*: depth 0, no MTP module
    assert load_hf_checkpoint(os.path.join(GOLDEN, "tiny")).mtp is None
    assert hf_load.infer_mtp_depth(["mtp.layers.0.x", "mtp.layers.2.y", "model.norm.weight"]) == 3


def test_mtp_tensors_against_explicit_zero_depth_are_unexpected(tmp_path):
    path = copy_golden("tiny_mtp", tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["mtp_num_hidden_layers"] = 0
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected tensor.*\n.*mtp\.fc\.weight"):
        load_hf_checkpoint(path)


# --------------------------------------------------------------------------------------------------- bad inputs

def test_missing_tensor_is_named(tmp_path):
    path = copy_golden("odd", tmp_path)
    rewrite_single(path, lambda t: t.pop("model.layers.2.self_attn.q_norm.weight"))
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf_checkpoint(path)
    assert "1 missing tensor" in str(e.value) and "model.layers.2.self_attn.q_norm.weight" in str(e.value)
    assert "[24]" in str(e.value)  # expected shape given


def test_missing_expert_in_a_shard_is_named(tmp_path):
    path = copy_golden("tiny", tmp_path)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    victim = "model.layers.5.mlp.experts.6.up_proj.weight"
    shard = os.path.join(path, index["weight_map"].pop(victim))
    with safe_open(shard, "numpy") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys() if n != victim}
    save_file(tensors, shard, metadata={"format": "pt"})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointMismatchError, match=victim.replace(".", r"\.")):
        load_hf_checkpoint(path)


def test_extra_tensor_is_named(tmp_path):
    path = copy_golden("odd", tmp_path)
    rewrite_single(path, lambda t: t.__setitem__("model.layers.9.mlp.gate.weight", np.zeros((6, 20), np.float32)))
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected tensor.*\n.*model\.layers\.9\.mlp\.gate\.weight"):
        load_hf_checkpoint(path)


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    path = copy_golden("odd", tmp_path)
    rewrite_single(path, lambda t: t.__setitem__("model.layers.0.linear_attn.conv1d.weight",
                                                 np.zeros((152, 1, 3), np.float32)))
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf_checkpoint(path)
    msg = str(e.value)
    assert "model.layers.0.linear_attn.conv1d.weight  expected [152, 1, 4], found [152, 1, 3]" in msg


def test_all_problems_reported_at_once(tmp_path):
    path = copy_golden("odd", tmp_path)

    def edit(t):
        t.pop("lm_head.weight", None)                         # tied: not there anyway
        t.pop("model.norm.weight")
        t["model.layers.1.mlp.experts.0.gate_proj.weight"] = np.zeros((8, 20), np.float32)  # layer 1 is dense
        t["model.layers.3.linear_attn.A_log"] = np.zeros((5,), np.float32)
    rewrite_single(path, edit)
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf_checkpoint(path)
    msg = str(e.value)
    for part in ("model.norm.weight", "model.layers.1.mlp.experts.0.gate_proj.weight",
                 "model.layers.3.linear_attn.A_log  expected [6], found [5]"):
        assert part in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("same", [True, False])
def test_tied_checkpoint_that_also_carries_lm_head(tmp_path, same):
    """transformers ties lm_head to the embedding and ignores a stored lm_head.weight; so do we (warning when the
    stored one differs), and the logits are the golden ones either way."""
    path = copy_golden("odd", tmp_path)
    ref = load_hf_checkpoint(path)

    def edit(t):
        emb = t["model.embed_tokens.weight"]
        t["lm_head.weight"] = emb.copy() if same else emb + 1.0
    rewrite_single(path, edit)
    if same:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = load_hf_checkpoint(path)
    else:
        with pytest.warns(UserWarning, match="lm_head.weight differs"):
            model = load_hf_checkpoint(path)
    ids = jnp.arange(12, dtype=jnp.int32)[None] % model.config.vocab_size
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(ref(ids)))


def test_wrong_model_type(tmp_path):
    path = copy_golden("odd", tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"] = "llama"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"config\.json.*model_type 'llama'"):
        load_hf_checkpoint(path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(tmp_path)
    path = copy_golden("tiny", tmp_path)
    os.remove(os.path.join(path, "model-00002-of-00004.safetensors"))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00004.safetensors"):
        load_hf_checkpoint(path)


def _truncate(file, keep):
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[:keep] if keep >= 0 else data[:len(data) + keep])


def _overwrite(file, content: bytes):
    with open(file, "wb") as f:
        f.write(content)


def _retype(tensors):
    tensors["model.layers.0.linear_attn.A_log"] = tensors["model.layers.0.linear_attn.A_log"].astype(np.int32)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] > 0


def _edit_json(file, edit):
    with open(file) as f:
        value = json.load(f)
    with open(file, "w") as f:
        json.dump(edit(value), f)


def _listed(index):
    return {"weight_map": {k: [f] for k, f in index["weight_map"].items()}}


SHARD2 = "model-00002-of-00004.safetensors"
INDEX = "model.safetensors.index.json"
# (case, golden, damage(path), error type, substrings the message must hold). Each names the file (and tensors).
BAD_HF_INPUTS = [
    ("truncated shard", "tiny", lambda p: _truncate(os.path.join(p, SHARD2), -100), hf_files.CheckpointError,
     [SHARD2, "not a readable safetensors file", "incomplete metadata"]),
    ("truncated header", "odd", lambda p: _truncate(os.path.join(p, "model.safetensors"), 50),
     hf_files.CheckpointError, ["model.safetensors", "not a readable safetensors file"]),
    ("empty file", "odd", lambda p: _overwrite(os.path.join(p, "model.safetensors"), b""), hf_files.CheckpointError,
     ["model.safetensors", "header too small"]),
    ("not safetensors", "odd", lambda p: _overwrite(os.path.join(p, "model.safetensors"), b"PK\x03\x04" * 64),
     hf_files.CheckpointError, ["model.safetensors", "not a readable safetensors file"]),
    ("integer and bool tensors", "odd", lambda p: rewrite_single(p, _retype), CheckpointMismatchError,
     ["2 tensor(s) stored as a non-floating dtype", "model.layers.0.linear_attn.A_log  I32  (in model.safetensors)",
      "model.norm.weight  BOOL"]),
    ("corrupt config.json", "odd",
     lambda p: _overwrite(os.path.join(p, "config.json"), b'{"model_type": "qwen3_next",\n  "hidden_size": }'),
     hf_files.CheckpointError, ["config.json", "not valid JSON (line 2"]),
    ("config.json not an object", "odd", lambda p: _overwrite(os.path.join(p, "config.json"), b"[1, 2]"),
     hf_files.CheckpointError, ["config.json", "expected a JSON object"]),
    ("config.json not UTF-8", "odd", lambda p: _overwrite(os.path.join(p, "config.json"), b'{"a": "\xff\xfe"}'),
     hf_files.CheckpointError, ["config.json", "not UTF-8"]),
    ("corrupt index", "tiny", lambda p: _truncate(os.path.join(p, INDEX), 40), hf_files.CheckpointError,
     [INDEX, "not valid JSON"]),
    ("index without weight_map", "tiny", lambda p: _edit_json(os.path.join(p, INDEX), lambda v: v["metadata"]),
     hf_files.CheckpointError, [INDEX, "weight_map"]),
    ("index mapping to a list", "tiny",
     lambda p: _edit_json(os.path.join(p, INDEX), _listed),
     hf_files.CheckpointError, [INDEX, "weight_map"]),
]


@pytest.mark.parametrize("case,golden,damage,error,parts", BAD_HF_INPUTS, ids=[c[0] for c in BAD_HF_INPUTS])
def test_bad_hf_input_is_named(tmp_path, capsys, case, golden, damage, error, parts):
    """Each damaged checkpoint raises one error naming the file (and tensors) from the API, and ends
    `qwen3next-convert hf-to-orbax` with exit status 1 and that message, without a traceback and without output."""
    path = copy_golden(golden, tmp_path)
    damage(path)
    with pytest.raises(error) as e:
        load_hf_checkpoint(path)
    for part in parts:
        assert part in str(e.value), (part, str(e.value))
    assert convert.main(["hf-to-orbax", "--hf", path, "--out", str(tmp_path / "orb"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(part in err for part in parts), err
    assert not os.path.exists(tmp_path / "orb" / "params")


# ------------------------------------------------------------------------------------------------------ configs

def test_config_457_layout_reads_like_5():
    d = os.path.join(GOLDEN, "config_457")
    with open(os.path.join(d, "expected.json")) as f:
        expected = json.load(f)
    old = Qwen3NextConfig.from_json_file(os.path.join(d, "config.json"))
    for k, v in expected.items():
        assert getattr(old, k) == v, k
    new = hf_load.read_hf_config(os.path.join(GOLDEN, "odd"))  # same model, transformers-5 layout
    # the 4.57 file says full_attention_interval, the 5.x one layer_types: both become the same layer_types
    assert old.replace(mtp_num_hidden_layers=0) == new


def test_config_written_reads_back(tmp_path):
    for name in ("tiny", "odd"):
        cfg = hf_load.read_hf_config(os.path.join(GOLDEN, name))
        for layout in ("5", "4.57"):
            d = tmp_path / f"{name}_{layout}"
            d.mkdir()
            with open(d / "config.json", "w") as f:
                json.dump(hf_save.hf_config_dict(cfg, "bfloat16", layout), f)
            assert hf_load.read_hf_config(d) == cfg


def test_parse_size():
    assert hf_save.parse_size("5GB") == 5 * 10**9
    assert hf_save.parse_size("70KiB") == 70 * 1024
    assert hf_save.parse_size(123) == 123
    with pytest.raises(ValueError):
        hf_save.parse_size("lots")


# ---------------------------------------------------------------------------------------------------- converter

def test_convert_cli_both_directions(tmp_path, capsys):
    src = os.path.join(GOLDEN, "tiny_mtp")
    assert convert.main(["hf-to-orbax", "--hf", src, "--out", str(tmp_path / "orb")]) == 0
    assert os.path.isdir(tmp_path / "orb" / "params") and os.path.exists(tmp_path / "orb" / "config.json")
    assert convert.main(["orbax-to-hf", "--orbax", str(tmp_path / "orb"), "--out", str(tmp_path / "hf"),
                         "--max-shard-size", "50KB"]) == 0
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    assert_bit_exact(src, tmp_path / "hf")
    # bf16 on the way in
    assert convert.main(["hf-to-orbax", "--hf", src, "--out", str(tmp_path / "orb16"), "--dtype", "bf16",
                         "--no-progress"]) == 0
    m = convert.load_orbax_params(tmp_path / "orb16")
    assert m.mtp.fc.kernel.dtype == jnp.bfloat16


def test_orbax_params_restore_onto_a_mesh(tmp_path):
    from qwen3next_jax.sharding import make_mesh
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    src = os.path.join(GOLDEN, "tiny")
    model = load_hf_checkpoint(src)
    convert.save_orbax_params(model, tmp_path / "orb")
    mesh = make_mesh(jax.devices()[:4], fsdp=2, expert=2)
    again = convert.load_orbax_params(tmp_path / "orb", mesh=mesh)
    experts = again.model.layers.blocks[1].mlp.experts.down_proj[...]
    assert experts.sharding.spec[1] == "expert" and len(experts.sharding.device_set) == 4
    p, q = params_of(model), params_of(again)
    assert sorted(p) == sorted(q) and all(p[k].tobytes() == q[k].tobytes() for k in p)
    assert again.config == model.config


def test_convert_as_a_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    src = os.path.join(GOLDEN, "odd")
    run = lambda *a: subprocess.run([sys.executable, "-m", "qwen3next_jax.convert", *a], env=env, cwd=ROOT,
                                    capture_output=True, text=True, timeout=300)
    r = run("hf-to-orbax", "--hf", src, "--out", str(tmp_path / "orb"))
    assert r.returncode == 0, r.stderr
    r = run("orbax-to-hf", "--orbax", str(tmp_path / "orb"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr
    assert_bit_exact(src, tmp_path / "hf")


# ------------------------------------------------------------------------------------------------- transformers

def _torch_python():
    """An interpreter with torch + transformers: this one, $QWEN3NEXT_TORCH_PYTHON, or `python3` on PATH."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    for cand in (os.environ.get("QWEN3NEXT_TORCH_PYTHON"), shutil.which("python3")):
        if cand and subprocess.run([cand, "-c", "import torch, transformers; transformers.Qwen3NextForCausalLM"],
                                   capture_output=True, timeout=120).returncode == 0:
            return cand
    return None


_HF_RUN = r"""
import sys, numpy as np, torch
from transformers import Qwen3NextForCausalLM
root, ids_file, *names = sys.argv[1:]
ids = torch.from_numpy(np.load(ids_file))
for name in names:
    model, info = Qwen3NextForCausalLM.from_pretrained(f"{root}/{name}", dtype=torch.float32,
                                                       attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "unexpected_keys"}
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith("mtp.")]
    assert not bad and not unexpected, (name, bad, unexpected)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    np.save(f"{root}/{name}.logits.npy", logits.float().numpy())
"""


@pytest.mark.torch
def test_transformers_loads_our_export(tmp_path):
    """Export models that are NOT the goldens (perturbed weights; one with MTP, one tied with biases and a dense
    layer), load them with transformers' Qwen3NextForCausalLM, and compare its logits with ours."""
    python = _torch_python()
    if python is None:
        pytest.skip("torch + transformers not installed")
    ids = np.asarray(jax.random.randint(jax.random.key(3), (2, 70), 0, 300), np.int64)
    np.save(tmp_path / "ids.npy", ids)
    ours = {}
    for k, name in enumerate(["tiny_mtp", "odd"]):
        model = load_hf_checkpoint(os.path.join(GOLDEN, name))
        state = nnx.state(model)
        keys = iter(jax.random.split(jax.random.key(7 + k), 1000))
        state = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape, a.dtype), state)
        nnx.update(model, state)
        save_hf_checkpoint(model, tmp_path / name, max_shard_size="100KB")
        ours[name] = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    r = subprocess.run([python, "-c", _HF_RUN, str(tmp_path), str(tmp_path / "ids.npy"), "tiny_mtp", "odd"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, logits in ours.items():
        theirs = np.load(tmp_path / f"{name}.logits.npy")
        err = np.abs(logits - theirs).max() / np.abs(theirs).max()
        assert err < 1e-4, (name, err)


# ------------------------------------------------------------------------------------------------------ streaming

def _wide_model():
    """A model whose expert leaves dominate: 8 layers (period 4, 2 repeats), 32 experts of 64 x 48."""
    cfg = Qwen3NextConfig.preset("tiny").replace(
        vocab_size=64, hidden_size=64, num_hidden_layers=8, num_experts=32, num_experts_per_tok=2,
        moe_intermediate_size=48, shared_expert_intermediate_size=16, intermediate_size=32, mtp_num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16)
    model = hf_load.abstract_model(cfg, Execution())  # filled with numpy randoms: much faster than eager init
    state = nnx.state(model)
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32)), state))
    return model


def test_streaming_host_memory_and_fetches(tmp_path, monkeypatch):
    """Export fetches each (leaf, repeat) once; import and export keep host memory near one layer's experts."""
    import tracemalloc
    model = _wide_model()
    group = 32 * 64 * 48 * 4                                  # one leaf of one layer's experts, fp32: 393 KB
    total = sum(v.nbytes for v in params_of(model).values())  # ~10 MB
    assert total > 20 * group

    fetchers = []

    class Counting(hf_save.DeviceLeafFetcher):
        def __init__(self, m):
            super().__init__(m)
            fetchers.append(self)
    monkeypatch.setattr(hf_save, "DeviceLeafFetcher", Counting)
    monkeypatch.setattr(hf_load, "STACK_ON_HOST_BYTES", group)  # stacked expert leaves (2 groups) go per repeat

    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        save_hf_checkpoint(model, tmp_path, max_shard_size="1MB")
        end, peak = tracemalloc.get_traced_memory()
        export_transient = peak - max(start, end)
        tracemalloc.reset_peak()
        again = load_hf_checkpoint(tmp_path)
        # On the CPU backend device arrays may alias the numpy buffers they were made from, so what the loaded
        # model retains counts as traced memory: measure the transient above it.
        end2, peak2 = tracemalloc.get_traced_memory()
        import_transient = peak2 - max(end, end2)
    finally:
        tracemalloc.stop()
    specs = hf_names.leaf_specs(model)
    assert fetchers[0].fetches == sum(len(s.hf_names) for s in specs)  # each (leaf, repeat) fetched once
    assert export_transient < 1_000_000 + 4 * group, export_transient  # one shard + one fetched group
    assert import_transient < 4 * group, import_transient
    p, q = params_of(model), params_of(again)
    assert all(p[k].tobytes() == q[k].tobytes() for k in p)
