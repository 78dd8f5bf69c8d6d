"""The trainer's config: one schema filled from YAML, gin and the command line; bad keys and values are named."""
import copy

import pytest

from qwen3next_train.config import ConfigError, load_config
from qwen3next_train.__main__ import main


def test_defaults_presets_and_precedence(tmp_path):
    cfg = load_config()
    assert cfg.model.hidden_size == 128 and cfg.data.tokenizer == "bytes"  # the CPU default: the tiny preset
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  preset: bench-1p3b\n  num_hidden_layers: 4\ndata:\n  seq_len: 64\n")
    gin_file = tmp_path / "c.gin"
    gin_file.write_text("data.seq_len = 96\noptim.lr = 1e-4\n")
    cfg = load_config(str(yaml_file), ["optim.lr=2e-4", "optim.decay=linear"], [str(gin_file)])
    assert cfg.model.hidden_size == 1024 and cfg.model.num_hidden_layers == 4  # preset, then its override
    assert len(cfg.model.layer_types) == 4
    assert cfg.data.seq_len == 96  # gin over YAML
    assert cfg.optim.lr == 2e-4 and cfg.optim.decay == "linear"  # command line over gin
    assert load_config(None, ["data.sources=a.txt,b.jsonl"]).data.sources == ["a.txt", "b.jsonl"]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["model.num_hidden_layers=8"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, message", [
    ("data.seqlen=64", "unknown config key data.seqlen (did you mean 'seq_len'?)"),
    ("model.hiden_size=64", "unknown config key model.hiden_size (did you mean 'hidden_size'?)"),
    ("optimm.lr=1", "unknown config section 'optimm' in 'optimm.lr' (did you mean 'optim'?)"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("data.seq_len=1.5", "data.seq_len: expected int, got 1.5"),
    ("optim.decay=cos", "optim.decay: 'cos' is not one of ['cosine', 'linear', 'constant']"),
    ("steps=10", "unknown config section 'steps'"),
])
def test_bad_override_is_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_bad_yaml_and_gin_keys_are_named(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim:\n  warmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"optim.warmup_step \(did you mean 'warmup_steps'\?\)"):
        load_config(str(bad_yaml))
    bad_gin = tmp_path / "bad.gin"
    bad_gin.write_text("checkpoint.evry = 3\n")
    with pytest.raises(ConfigError, match=r"checkpoint.evry \(did you mean 'every'\?\)"):
        load_config(None, [], [str(bad_gin)])


def test_cli_reports_config_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/tiny.yaml", "train.stesp=3"])
    assert e.value.code == 2
    assert "unknown config key train.stesp (did you mean 'steps'?)" in capsys.readouterr().err


def test_shipped_configs_load():
    for name in ("tiny", "smoke", "bench-1p3b", "qwen3-next-80b-a3b", "tpu-pod", "slurm-gpu"):
        load_config(f"configs/{name}.yaml")
    for name in ("tpu-pod", "slurm-gpu"):  # a launch config: a host that finds no cluster must not train alone
        assert load_config(f"configs/{name}.yaml").distributed.initialize == "always"
    load_config(None, [], ["configs/tiny.gin"])


def test_execution_section_round_trips(tmp_path):
    yaml_file = tmp_path / "e.yaml"
    yaml_file.write_text("execution:\n  compute_dtype: float32\n  remat: dots\n  gdn: chunked\n  conv: xla\n"
                         "  attention: xla\n  moe: ragged_dot\n  loss: reference\n")
    cfg = load_config(str(yaml_file), ["execution.param_dtype=bfloat16", "execution.moe=tiled"])
    e = cfg.execution
    assert (e.compute_dtype, e.param_dtype, e.remat, e.gdn, e.conv, e.attention, e.moe, e.loss) == (
        "float32", "bfloat16", "dots", "chunked", "xla", "xla", "tiled", "reference")
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg
    assert load_config().execution.compute_dtype == "bfloat16"  # the trainer's default: bf16 over fp32 masters


@pytest.mark.parametrize("family", ["gdn", "conv", "attention", "moe", "loss"])
def test_unknown_implementation_names_the_choices(family):
    from qwen3next_kernels.registry import FAMILIES

    with pytest.raises(ConfigError) as e:
        load_config(None, [f"execution.{family}=warp_drive"])
    assert f"unknown {family} implementation 'warp_drive'" in str(e.value)
    assert str(FAMILIES[family].choices) in str(e.value)


def test_moved_keys_name_their_new_place():
    with pytest.raises(ConfigError, match="config key train.gdn_impl is now execution.gdn"):
        load_config(None, ["train.gdn_impl=chunked"])


def test_gin_files_bind_values_and_run_no_code(tmp_path):
    (tmp_path / "base.gin").write_text("data.seq_len = 64\n")
    (tmp_path / "main.gin").write_text("include 'base.gin'\n# a comment\noptim.lr = 5e-4\n")
    cfg = load_config(None, [], [str(tmp_path / "main.gin")])
    assert cfg.data.seq_len == 64 and cfg.optim.lr == 5e-4
    (tmp_path / "evil.py").write_text("raise SystemExit('imported')\n")
    (tmp_path / "import.gin").write_text("data.seq_len = 64\nimport evil\n")
    with pytest.raises(ConfigError, match=r"import.gin, line 2: `import evil`: gin imports run code"):
        load_config(None, [], [str(tmp_path / "import.gin")])
    (tmp_path / "ref.gin").write_text("optim.lr = @some_function()\n")
    with pytest.raises(ConfigError, match="gin references are not allowed"):
        load_config(None, [], [str(tmp_path / "ref.gin")])
    (tmp_path / "scope.gin").write_text("eval/data.seq_len = 64\n")
    with pytest.raises(ConfigError, match="line 1: gin scopes and macros are not allowed"):
        load_config(None, [], [str(tmp_path / "scope.gin")])


def test_the_current_directory_is_off_the_import_path(monkeypatch, capsys):
    """`python -m` puts the current directory first on sys.path; the trainer takes it off before reading gin or
    importing anything else."""
    import os
    import sys

    monkeypatch.setattr(sys, "path", [os.getcwd()] + [p for p in sys.path if p != os.getcwd()])
    with pytest.raises(SystemExit):
        main(["train.stesp=3"])
    assert os.getcwd() not in sys.path


def test_resume_changes_split_by_the_table():
    from qwen3next_train.config import resume_changes

    stored = load_config().to_dict()
    new = load_config(None, ["execution.gdn=chunked", "execution.param_dtype=bfloat16", "mesh.fsdp=2",
                             "train.steps=500", "model.router_aux_loss_coef=0.01", "model.num_experts=4"]).to_dict()
    structural, changeable = resume_changes(stored, new)
    assert structural == ["execution.param_dtype: 'float32' -> 'bfloat16'", "mesh.fsdp: 1 -> 2",
                          "model.num_experts: 8 -> 4"]
    assert changeable == ["execution.gdn: 'auto' -> 'chunked'", "model.router_aux_loss_coef: 0.001 -> 0.01",
                          "train.steps: 200 -> 500"]
    # A checkpoint of an older version: a moved key is compared under its new name, a new field is only noted.
    older = copy.deepcopy(stored)
    older["train"]["remat"] = "full"
    del older["checkpoint"]["init_from_params"], older["execution"]["remat"]
    structural, changeable = resume_changes(older, stored)
    assert structural == []
    assert changeable == ["checkpoint.init_from_params: '(not recorded)' -> None", "execution.remat: 'full' -> 'none'"]
