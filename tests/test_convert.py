"""The converter's commands (qwen3next_jax.convert) and the Orbax side of conversion (qwen3next_jax.orbax_io).

hf-to-orbax spreads the model over a mesh of the 8 fake CPU devices; orbax-to-hf and train-to-hf read the Orbax
arrays one (leaf, repeat) at a time; a run that trained on a tokenizer.json brings it along; every bad argument
ends the command with status 2 and one message naming it before anything is loaded or written. The export from a
real trainer run is tests/test_train_to_hf.py.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file

from qwen3next_jax import convert, orbax_io
from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import Execution
from qwen3next_jax.hf import load_hf_checkpoint
from qwen3next_jax.hf import load as hf_load, names as hf_names, tokenizer as hf_tokenizer

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def params_of(model) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def wide_model(mtp=1):
    """Expert leaves dominate; 8 layers = period 4 x 2 repeats, so stacked leaves have a repeat axis to slice."""
    cfg = Qwen3NextConfig.preset("tiny").replace(
        vocab_size=64, hidden_size=64, num_hidden_layers=8, num_experts=16, num_experts_per_tok=2,
        moe_intermediate_size=24, shared_expert_intermediate_size=16, intermediate_size=32, mtp_num_hidden_layers=mtp,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, eos_token_id=5, bos_token_id=4)
    model = hf_load.abstract_model(cfg, Execution())
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32)),
                                   nnx.state(model)))
    return model


def fake_run(run_dir, model, tokenizer="bytes", steps=(2,)) -> str:
    """A run directory laid out as qwen3next_train.checkpoint writes one: checkpoints/<step>/{state, config}, the
    state a dict whose `params` is nnx.state(model, nnx.Param) (the `data` item is not read by the converter)."""
    config = {"model": model.config.to_dict(), "data": {"tokenizer": tokenizer}}
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"), options=options,
                               item_names=("state", "config")) as manager:
        for step in steps:
            state = {"params": nnx.state(model, nnx.Param), "step": jnp.asarray(step, jnp.int32)}
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       config=ocp.args.JsonSave(config)))
    return str(run_dir)


# ----------------------------------------------------------------------------------------------- hf-to-orbax mesh

@pytest.mark.parametrize("mesh_arg", [["--mesh", "fsdp=8"], []])  # [] : the default, every device on fsdp
def test_hf_to_orbax_spreads_the_model_over_the_mesh(tmp_path, mesh_arg):
    assert len(jax.devices()) == 8
    src = os.path.join(GOLDEN, "tiny_mtp")
    out = tmp_path / "orb"
    model = convert.hf_to_orbax(src, out, mesh=convert.make_mesh_arg((mesh_arg or ["", convert.DEFAULT_MESH])[1]),
                                progress=False)
    embed = model.model.embed_tokens.embedding[...]                                # [300, 16]
    experts = model.model.layers.blocks[0].mlp.experts.gate_proj[...]              # [1, 8, 16, 32]
    for arr, spec in ((embed, (None, "fsdp")), (experts, (None, None, "fsdp", None))):
        assert arr.sharding.spec == jax.sharding.PartitionSpec(*spec) and len(arr.sharding.device_set) == 8
        assert arr.addressable_shards[0].data.shape[spec.index("fsdp")] == arr.shape[spec.index("fsdp")] // 8
    # the checkpoint records the sharding it was written from, and reads back bit for bit
    arrays = orbax_io.ParamArrays(out / "params")
    meta = arrays.meta(("model", "embed_tokens", "embedding")).sharding
    assert tuple(meta.partition_spec) == (None, "fsdp") and list(meta.shape)[1] == 8
    assert convert.main(["hf-to-orbax", "--hf", src, "--out", str(tmp_path / "cli"), "--no-progress", *mesh_arg]) == 0
    p, q = params_of(load_hf_checkpoint(src)), params_of(orbax_io.load_orbax_params(tmp_path / "cli"))
    assert sorted(p) == sorted(q) and all(p[k].tobytes() == q[k].tobytes() for k in p)


def test_load_orbax_params_dtype_rules(tmp_path):
    """dtype wins; else the execution's param_dtype; else each array's stored dtype (mixed dtypes kept)."""
    model = load_hf_checkpoint(os.path.join(GOLDEN, "odd"))
    alog = model.model.layers.blocks[0].mixer.A_log
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
    alog.set_value(alog.get_value().astype(jnp.float32))
    orbax_io.save_orbax_params(model, tmp_path)
    kept = convert.load_orbax_params(tmp_path)
    assert kept.model.layers.blocks[0].mixer.A_log.dtype == jnp.float32
    assert kept.model.embed_tokens.embedding.dtype == jnp.bfloat16
    p, q = params_of(model), params_of(kept)
    assert all(p[k].tobytes() == q[k].tobytes() for k in p)
    trained = convert.load_orbax_params(tmp_path, execution=Execution(compute_dtype="bfloat16"))
    assert {v.dtype for v in params_of(trained).values()} == {np.dtype(np.float32)}
    cast = convert.load_orbax_params(tmp_path, dtype=jnp.bfloat16, execution=Execution())
    assert {v.dtype for v in params_of(cast).values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_load_orbax_params_names_mismatched_arrays(tmp_path):
    model = load_hf_checkpoint(os.path.join(GOLDEN, "tiny_mtp"))
    orbax_io.save_orbax_params(model, tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg.update(mtp_num_hidden_layers=0, moe_intermediate_size=cfg["moe_intermediate_size"] + 1)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(orbax_io.CheckpointMismatchError) as e:
        convert.load_orbax_params(tmp_path)
    msg = str(e.value)
    assert "unexpected array(s)" in msg and "mtp.fc.kernel" in msg
    assert "model.layers.blocks.0.mlp.experts.down_proj  expected [1, 8, 9, 16], found [1, 8, 8, 16]" in msg


# ------------------------------------------------------------------------------------------- streaming the arrays

def test_orbax_export_reads_one_leaf_repeat_at_a_time(tmp_path, monkeypatch):
    """orbax-to-hf asks tensorstore for one (leaf, repeat) at a time, each once, and writes the same tensors as
    the export from the model on its devices."""
    model = wide_model()
    orbax_io.save_orbax_params(model, tmp_path / "orb")
    reads = []
    original = orbax_io.ParamArrays.read

    def recording(self, spec, r):
        host = original(self, spec, r)
        reads.append((spec.path, r, host.shape))
        return host
    monkeypatch.setattr(orbax_io.ParamArrays, "read", recording)
    convert.orbax_to_hf(tmp_path / "orb", tmp_path / "hf", max_shard_size="200KB", progress=False)
    specs = hf_names.leaf_specs(model)
    assert sorted((p, r) for p, r, _ in reads) == sorted((s.path, r) for s in specs for r in range(len(s.hf_names)))
    for spec in specs:  # a stacked leaf arrives without its repeat axis
        shapes = {shape for p, _, shape in reads if p == spec.path}
        assert shapes == {spec.shape[1:] if spec.stacked else spec.shape}, spec.key
    assert max(np.prod(s) for _, _, s in reads) == 16 * 64 * 24  # one layer's experts of one projection
    from qwen3next_jax.hf import save_hf_checkpoint
    save_hf_checkpoint(model, tmp_path / "ref", max_shard_size="200KB")
    ours, ref = (load_file_all(tmp_path / d) for d in ("hf", "ref"))
    assert sorted(ours) == sorted(ref) and all(ours[k].tobytes() == ref[k].tobytes() for k in ref)


def load_file_all(path) -> dict:
    out = {}
    for fn in os.listdir(path):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, fn)))
    return out


# ------------------------------------------------------------------------------------------------ train-to-hf

def test_train_to_hf_of_a_tokenizer_json_run(tmp_path):
    """A run trained on a tokenizer.json brings it (under that name) and its siblings; generation_config.json
    carries the model config's ids; --step picks an older checkpoint and --dtype casts."""
    model = wide_model()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tok_dir / "mine.json"))
    (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    run = fake_run(tmp_path / "run", model, tokenizer=str(tok_dir / "mine.json"), steps=(1, 2))
    out = tmp_path / "hf"
    assert convert.main(["train-to-hf", "--run", run, "--step", "1", "--out", str(out), "--dtype", "bf16",
                         "--no-progress"]) == 0
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "mine.json").read_bytes()
    assert (out / "tokenizer_config.json").read_text() == '{"eos_token": "<|endoftext|>"}'
    assert not (out / "special_tokens_map.json").exists()
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 4, "eos_token_id": 5}
    loaded = load_hf_checkpoint(out)
    assert loaded.config == model.config and loaded.mtp is not None
    p, q = params_of(model), params_of(loaded)
    assert all(q[k].dtype == ml_dtypes.bfloat16 and q[k].tobytes() == p[k].astype(ml_dtypes.bfloat16).tobytes()
               for k in p)


TEXTS = ["hello, world", "é ü 漢字 🙂\n\ttabs  and\r\nCRLF", "\x00\x01\x7f", "<0x41>", "",
         "".join(chr(c) for c in range(0x20, 0x2500, 7))]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_json_encodes_to_the_trainers_byte_ids(text):
    from qwen3next_train.data import BYTE_EOS, ByteTokenizer

    tok = hf_tokenizer.byte_tokenizer(BYTE_EOS)
    ids = tok.encode(text).ids
    assert ids == list(text.encode("utf-8")) == ByteTokenizer().encode(text).tolist()
    assert tok.decode(ids) == text
    assert tok.token_to_id(hf_tokenizer.EOS_TOKEN) == BYTE_EOS and tok.get_vocab_size() == BYTE_EOS + 1
    assert tok.decode([*ids, BYTE_EOS]) == text  # the end-of-document token is special: skipped when decoding
    assert tok.decode([*ids, BYTE_EOS], skip_special_tokens=False) == text + hf_tokenizer.EOS_TOKEN


# ---------------------------------------------------------------------------------------------- bad arguments

def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A run with checkpoints at steps 1 and 2, a params checkpoint, an HF checkpoint, and damaged variants."""
    root = tmp_path_factory.mktemp("inputs")
    model = load_hf_checkpoint(os.path.join(GOLDEN, "tiny_mtp"))
    fake_run(root / "run", model, steps=(1, 2))
    fake_run(root / "run_lost_tok", model, tokenizer=str(root / "gone" / "tokenizer.json"))
    (root / "run_bad_tok").mkdir()
    (root / "bad_tokenizer.json").write_text("{not json")
    fake_run(root / "run_bad_tok", model, tokenizer=str(root / "bad_tokenizer.json"))
    (root / "run_empty" / "checkpoints").mkdir(parents=True)
    (root / "no_ckpts").mkdir()
    orbax_io.save_orbax_params(model, root / "orb")
    (root / "orb_no_params").mkdir()
    (root / "orb_no_params" / "config.json").write_text((root / "orb" / "config.json").read_text())
    (root / "hf_no_tensors").mkdir()
    (root / "hf_no_tensors" / "config.json").write_text("{}")
    (root / "a_file").write_text("x")
    return root


H, R, O = os.path.join(GOLDEN, "tiny_mtp"), "{root}/run", "{root}/orb"
BAD_ARGUMENTS = [  # (argv, substrings the message must hold)
    (["hf-to-orbax", "--hf", "{root}/nowhere", "--out", "{out}"], ["--hf {root}/nowhere: does not exist"]),
    (["hf-to-orbax", "--hf", "{root}/a_file", "--out", "{out}"], ["--hf {root}/a_file: not a directory"]),
    (["hf-to-orbax", "--hf", "{root}/no_ckpts", "--out", "{out}"], ["has no config.json"]),
    (["hf-to-orbax", "--hf", "{root}/hf_no_tensors", "--out", "{out}"],
     ["has neither model.safetensors nor model.safetensors.index.json"]),
    (["hf-to-orbax", "--hf", H, "--out", H], ["--out", "is the directory being read"]),
    (["hf-to-orbax", "--hf", H, "--out", "{root}/a_file"], ["--out {root}/a_file: exists and is not a directory"]),
    (["hf-to-orbax", "--hf", H, "--out", "{out}", "--mesh", "fsdp=3"], ["--mesh 'fsdp=3'", "needs 3 devices, have 8"]),
    (["hf-to-orbax", "--hf", H, "--out", "{out}", "--mesh", "fsdp"], ["--mesh 'fsdp'", "axis=size"]),
    (["hf-to-orbax", "--hf", H, "--out", "{out}", "--mesh", "pipeline=8"], ["unknown mesh axes ['pipeline']"]),
    (["hf-to-orbax", "--hf", H, "--out", "{out}", "--dtype", "int8"], ["--dtype", "invalid choice: 'int8'"]),
    (["orbax-to-hf", "--orbax", O, "--out", "{out}", "--max-shard-size", "lots"],
     ["--max-shard-size: cannot parse size 'lots'"]),
    (["orbax-to-hf", "--orbax", O, "--out", "{out}", "--max-shard-size", "0GB"], ["--max-shard-size", "positive"]),
    (["orbax-to-hf", "--orbax", "{root}/orb_no_params", "--out", "{out}"], ["has no params"]),
    (["orbax-to-hf", "--orbax", "{root}/nowhere", "--out", "{out}"], ["--orbax {root}/nowhere: does not exist"]),
    (["train-to-hf", "--run", "{root}/nowhere", "--out", "{out}"], ["--run {root}/nowhere: does not exist"]),
    (["train-to-hf", "--run", "{root}/no_ckpts", "--out", "{out}"], ["no checkpoints/ (not a trainer run"]),
    (["train-to-hf", "--run", "{root}/run_empty", "--out", "{out}"], ["no complete checkpoint in checkpoints/"]),
    (["train-to-hf", "--run", R, "--step", "7", "--out", "{out}"],
     ["no complete checkpoint at step 7; the run has steps [1, 2]"]),
    (["train-to-hf", "--run", R, "--step", "two", "--out", "{out}"], ["--step", "invalid int value: 'two'"]),
    (["train-to-hf", "--run", R, "--out", "{out}", "--max-shard-size", "5 parsecs"], ["--max-shard-size"]),
    (["train-to-hf", "--run", "{root}/run_lost_tok", "--out", "{out}"],
     ["data.tokenizer '{root}/gone/tokenizer.json' (step 2) is not a file here"]),
    (["train-to-hf", "--run", "{root}/run_bad_tok", "--out", "{out}"],
     ["data.tokenizer '{root}/bad_tokenizer.json' cannot be read"]),
    (["train-to-hf", "--run", R, "--out", R], ["is the directory being read"]),
]


@pytest.mark.parametrize("argv,parts", BAD_ARGUMENTS, ids=[" ".join(a[:1] + a[2:3]).replace("/", "|") + f"-{i}"
                                                          for i, (a, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_fail_before_anything_loads(inputs, tmp_path, capsys, monkeypatch, argv, parts):
    def nothing(*a, **k):
        raise AssertionError("a conversion started despite a bad argument")
    for name in ("hf_to_orbax", "orbax_to_hf", "train_to_hf", "write_hf_from_arrays", "load_hf_checkpoint"):
        monkeypatch.setattr(convert, name, nothing)
    before = _files(inputs)
    fill = dict(root=str(inputs), out=str(tmp_path / "out"))
    with pytest.raises(SystemExit) as e:
        convert.main([a.format(**fill) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for part in parts:
        assert part.format(**fill) in err, err
    assert not (tmp_path / "out").exists() and _files(inputs) == before
