"""Bad input ends the run before any compute with exit status 2 and one `config error:` line naming the key, file,
line or value; no case builds the model or writes config.yaml."""
import json
import logging
import os

import jax
import pytest

from qwen3next_train import loop
from qwen3next_train.__main__ import main
from qwen3next_train.config import load_config


@pytest.fixture
def inputs(tmp_path):
    """Files for the cases below, and a guard that fails any case reaching the model."""
    (tmp_path / "bad.yaml").write_text("model:\n  preset: tiny\ndata:\n  seq_len: [32\n  batch_size: 8\n")
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    # The broken line is line 5 of the file, blank lines counted.
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n\n{"text": "c",\n{"text": "d"}\n')
    (tmp_path / "no_field.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp_path / "number.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": 17}\n')
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    (tmp_path / "import.gin").write_text("data.seq_len = 32\nimport os\n")
    return tmp_path


CASES = {
    "missing config file": (["--config", "{tmp}/nope.yaml"], "{tmp}/nope.yaml: cannot read the config file"),
    "bad YAML": (["--config", "{tmp}/bad.yaml"], "{tmp}/bad.yaml, line 5"),
    "unknown preset": (["model.preset=qwen9"], "model.preset: unknown preset 'qwen9'"),
    "invalid model": (["model.num_experts=4", "model.num_experts_per_tok=6"],
                      "model: invalid Qwen3NextConfig: num_experts_per_tok 6 must be in 1..num_experts (4)"),
    "zero batch": (["data.batch_size=0"], "data.batch_size must be at least 1, got 0"),
    "negative batch": (["data.batch_size=-8"], "data.batch_size must be at least 1, got -8"),
    "zero seq_len": (["data.seq_len=0"], "data.seq_len must be at least 1, got 0"),
    "zero steps": (["train.steps=0"], "train.steps must be at least 1, got 0"),
    "zero grad_accum": (["optim.grad_accum_steps=0"], "optim.grad_accum_steps must be at least 1, got 0"),
    "zero eval_batches": (["train.eval_batches=0"], "train.eval_batches must be at least 1, got 0"),
    "zero max_nonfinite": (["optim.max_nonfinite_steps=0"], "optim.max_nonfinite_steps must be at least 1, got 0"),
    "zero log_every": (["train.log_every=0"], "train.log_every must be at least 1, got 0"),
    "negative keep": (["checkpoint.keep=-1"], "checkpoint.keep must be at least 0, got -1"),
    "batch over the mesh": (["data.batch_size=4"], "data.batch_size 4 / optim.grad_accum_steps 1 = 4 rows per "
                            "micro-batch do not split over the mesh's data x fsdp x expert = 8 x 1 x 1 = 8"),
    "micro-batch over the mesh": (["optim.grad_accum_steps=2"], "= 4 rows per micro-batch do not split"),
    "mesh the devices cannot form": (["mesh.data=3"], "mesh: mesh {'data': 3"),
    "sources match nothing": (["data.sources={tmp}/missing/*.jsonl"], "data.sources: no file matches "
                              "'{tmp}/missing/*.jsonl'"),
    "malformed JSONL": (["data.sources={tmp}/good.jsonl,{tmp}/broken.jsonl"],
                        "data.sources: {tmp}/broken.jsonl, line 5: not valid JSON"),
    "record without the field": (["data.sources={tmp}/no_field.jsonl"],
                                 "{tmp}/no_field.jsonl, line 2: no field 'text' (data.text_field) in the record "
                                 "(it has ['body'])"),
    "non-string text": (["data.sources={tmp}/number.jsonl"], "{tmp}/number.jsonl, line 3: field 'text' is a int"),
    "missing tokenizer": (["data.tokenizer={tmp}/none/tokenizer.json"],
                          "data.tokenizer: '{tmp}/none/tokenizer.json' does not exist"),
    "corrupt tokenizer": (["data.tokenizer={tmp}/tokenizer.json"],
                          "data.tokenizer: {tmp}/tokenizer.json is not a readable tokenizer.json"),
    "gin import": (["--gin", "{tmp}/import.gin"], "{tmp}/import.gin, line 2: `import os`: gin imports run code"),
    "slices the devices do not form": (["mesh.slices=2"], "mesh: slices is 2 but the devices form 1 granule(s) by "
                                       "process_index"),
    "process beyond the processes": (["distributed.num_processes=2", "distributed.process_id=2"],
                                     "distributed.process_id 2 must be below distributed.num_processes 2"),
    "zero processes": (["distributed.num_processes=0"], "distributed.num_processes must be at least 1, got 0"),
    "coordinator without a port": (["distributed.coordinator_address=node0"],
                                   "distributed.coordinator_address must be host:port (a port 1-65535), got 'node0'"),
    "one process, yet told the others": (["distributed.initialize=never", "distributed.process_id=1"],
                                         "distributed.initialize is 'never' (one process) but distributed.process_id "
                                         "is set"),
}


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(loop, "Qwen3NextForCausalLM", refuse)
    cache = jax.config.jax_compilation_cache_dir  # main() points it into the run directory
    yield
    jax.config.update("jax_compilation_cache_dir", cache)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named_before_any_compute(case, inputs, no_model, capsys):
    args, message = CASES[case]
    fill = lambda s: s.replace("{tmp}", str(inputs))  # noqa: E731
    argv = ["--config", "configs/smoke.yaml", f"train.out_dir={inputs}/runs", "data.batch_size=8"]
    with pytest.raises(SystemExit) as e:
        main(argv + [fill(a) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen3next-train: config error: ") and fill(message) in err, err
    assert "Traceback" not in err
    assert not os.path.exists(inputs / "runs" / "smoke" / "config.yaml")


def test_always_distributed_without_a_cluster_is_named(tmp_path):
    """distributed.initialize=always where JAX detects no cluster and nothing is given (a fresh process: JAX's
    distributed system starts only before its backend)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "qwen3next_train", "--config", "configs/smoke.yaml",
                           f"train.out_dir={tmp_path}", "distributed.initialize=always"],
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "config error: distributed: coordinator_address should be defined" in done.stderr
    assert "Set the missing distributed.* fields" in done.stderr and "Traceback" not in done.stderr


def test_null_texts_are_counted_and_skipped(tmp_path, caplog):
    from qwen3next_train.data import Documents

    path = tmp_path / "nulls.jsonl"
    path.write_text('{"text": "a"}\n{"text": null}\n{"text": "b"}\n{"text": null}\n')
    with caplog.at_level(logging.WARNING):
        docs = Documents([str(path)], "text")
    assert [docs[i] for i in range(len(docs))] == ["a", "b"]
    assert f"{path}: 2 record(s) have text null (the first at line 2); they are skipped" in caplog.text


def test_null_parquet_texts_are_counted_and_skipped(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qwen3next_train.data import Documents

    path = str(tmp_path / "nulls.parquet")
    pq.write_table(pa.table({"text": ["a", None, "b", "c"]}), path, row_group_size=2)
    with caplog.at_level(logging.WARNING):
        docs = Documents([path], "text")
    assert [docs[i] for i in range(len(docs))] == ["a", "b", "c"]
    assert "1 record(s) have text null (the first at row 2)" in caplog.text
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(Exception, match="column 'text' is int64, not a string"):
        Documents([path], "text")


def test_seq_len_beyond_the_model_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        load_config("configs/smoke.yaml", ["data.seq_len=8192"])
    assert "data.seq_len 8192 is beyond model.max_position_embeddings 4096" in caplog.text
