"""Nothing a run wrote is lost: a changed config is compared with the checkpoint's before anything is restored, a
damaged checkpoint is set aside (never deleted) and the restore takes state and data position from the same
checkpoint, keep=0 keeps everything, a failed save is reported, and metrics.jsonl is rewritten atomically."""
import hashlib
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from qwen3next_jax import Qwen3NextForCausalLM
from qwen3next_jax import sharding as shd
from qwen3next_train import loop
from qwen3next_train.__main__ import main
from qwen3next_train.checkpoint import CheckpointSaveError, Checkpoints
from qwen3next_train.config import CheckpointConfig, DataConfig, TrainConfig, load_config
from qwen3next_train.data import ByteTokenizer, make_tokenizer, train_and_val
from qwen3next_train.metrics import MetricsLog
from qwen3next_train.optim import make_optimizer
from qwen3next_train.state import init_state, state_shardings

SMOKE = ["--config", "configs/smoke.yaml", "data.batch_size=8", "train.steps=1", "train.eval_every=0"]


@pytest.fixture
def jax_cache_dir():
    cache = jax.config.jax_compilation_cache_dir  # main() points it into the run directory
    yield
    jax.config.update("jax_compilation_cache_dir", cache)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeded")
    _seed_run(out)
    return out


@pytest.fixture
def out_dir(seeded, tmp_path):
    """A copy of the seeded run's out_dir for one test (the run is out_dir/smoke)."""
    shutil.copytree(seeded, tmp_path / "out")
    return tmp_path / "out"


def _seed_run(out_dir) -> str:
    """A run directory as the trainer leaves it after step 1 (checkpoint, config.yaml, metrics.jsonl), made from
    the trainer's own parts without compiling a step: the checkpoint holds the initial state."""
    cfg = load_config(SMOKE[1], SMOKE[2:] + [f"train.out_dir={out_dir}"])
    run_dir = os.path.join(out_dir, cfg.train.name)
    mesh = loop.make_mesh(cfg)
    train_ds, _ = train_and_val(cfg.data, make_tokenizer(cfg.data.tokenizer, cfg.model.eos_token_id))
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg.model, rngs=nnx.Rngs(0),
                                                                     execution=cfg.execution)), nnx.Param)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    shardings = state_shardings(shd.state_shardings(abstract, mesh), tx, abstract, mesh)
    state = init_state(loop.initial_params(cfg, mesh), tx, cfg.train.seed, shardings)
    it = iter(train_ds)
    next(it)
    ckpt = Checkpoints(os.path.join(run_dir, "checkpoints"), cfg.checkpoint)
    ckpt.save(1, state, it, cfg.to_dict())
    ckpt.wait()
    ckpt.close()
    it.close()
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(cfg.to_yaml())
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    return run_dir


def _tree_digest(directory) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("change, named", [
    ("model.hidden_size=64", "model.hidden_size: 32 -> 64"),
    ("data.packing_streams=4", "data.packing_streams: 16 -> 4"),
    ("execution.param_dtype=bfloat16", "execution.param_dtype: 'float32' -> 'bfloat16'"),
    ("data.seq_len=64", "data.seq_len: 32 -> 64"),
])
def test_a_changed_structure_refuses_and_keeps_every_file(out_dir, change, named, capsys, monkeypatch,
                                                          jax_cache_dir):
    run_dir = out_dir / "smoke"
    before = _tree_digest(run_dir)
    monkeypatch.setattr(loop, "initial_params", lambda *a: pytest.fail("a fresh model was built"))
    with pytest.raises(SystemExit) as e:
        main(SMOKE + [f"train.out_dir={out_dir}", change])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "config error: cannot resume from" in err and named in err and "Every checkpoint is left as it is" in err
    assert _tree_digest(run_dir) == before  # checkpoints, config.yaml and metrics.jsonl untouched


def test_a_changed_learning_rate_resumes(out_dir, caplog, jax_cache_dir):
    run_dir = out_dir / "smoke"
    with open(os.path.join(run_dir, "config.yaml")) as f:
        first_config = f.read()
    with caplog.at_level(logging.INFO):
        assert main(SMOKE + [f"train.out_dir={out_dir}", "optim.lr=1e-4", "optim.clip_norm=0"]) == 0
    assert "resuming with a changed optim.lr: 0.003 -> 0.0001" in caplog.text
    assert "resuming with a changed optim.clip_norm: 1.0 -> 0.0" in caplog.text
    assert "resumed from step 1" in caplog.text
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["1"]
    # config.yaml is the new config (with the kernels it resolved to as comments), the earlier one kept beside it
    with open(os.path.join(run_dir, "config.1.yaml")) as f:
        assert f.read() == first_config
    with open(os.path.join(run_dir, "config.yaml")) as f:
        text = f.read()
    assert "# The kernels execution.* resolved to on this machine" in text and "gdn=" in text
    assert load_config(os.path.join(run_dir, "config.yaml")) == load_config(
        SMOKE[1], SMOKE[2:] + [f"train.out_dir={out_dir}", "optim.lr=1e-4", "optim.clip_norm=0"])


def test_resume_false_over_checkpoints_refuses(out_dir, capsys, jax_cache_dir):
    run_dir = out_dir / "smoke"
    before = _tree_digest(run_dir)
    with pytest.raises(SystemExit) as e:
        main(SMOKE + [f"train.out_dir={out_dir}", "checkpoint.resume=false"])
    assert e.value.code == 2
    assert "checkpoint.resume is false but" in capsys.readouterr().err
    assert _tree_digest(run_dir) == before


# ------------------------------------------------------------------------------------------ checkpoints alone

CONFIG = TrainConfig().to_dict()


def _stream(tmp_path):
    (tmp_path / "docs").mkdir(exist_ok=True)
    for i in range(12):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"text {i} " * 9)
    return train_and_val(DataConfig(sources=[str(tmp_path / "docs")], seq_len=8, batch_size=2, packing_streams=3,
                                    row_shuffle_window=4), ByteTokenizer())[0]


def _damage(step_dir, item):
    if item == "data":
        for name in os.listdir(step_dir / "data"):
            os.remove(step_dir / "data" / name)
        return
    for root, _, files in os.walk(step_dir / item):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                size = f.seek(0, 2)
                f.seek(0)
                f.write(b"\x5a" * size)


@pytest.mark.parametrize("item", ["state", "config", "data"])
def test_a_damaged_newest_checkpoint_is_set_aside_with_its_data_position(tmp_path, item, caplog):
    """The restored checkpoint's state and data position belong together: the damaged step 2 neither moves the
    iterator nor is deleted; it goes to damaged/2, logged in one line, and step 2 can be saved again."""
    train = _stream(tmp_path)
    it = iter(train)
    ckpt = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig(every=1, keep=2))
    batches = []
    for step in (1, 2):
        batches.append(next(it))
        ckpt.save(step, {"x": np.full(4, step, np.float32)}, it, CONFIG)
        ckpt.wait()
    it.close()
    _damage(tmp_path / "ckpt" / "2", item)

    made = []

    def new_iterator():
        made.append(iter(train))
        return made[-1]

    with caplog.at_level(logging.INFO):
        restored = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig(keep=2)).restore_newest(
            {"x": jax.ShapeDtypeStruct((4,), np.float32)}, new_iterator, CONFIG)
    assert restored.step == 1 and float(restored.state["x"][0]) == 1
    assert len(made) == 1  # one iterator, made for the checkpoint that restored
    fresh = iter(train)
    next(fresh)
    np.testing.assert_array_equal(next(restored.data_iter)["input_ids"], next(fresh)["input_ids"])
    restored.data_iter.close()
    fresh.close()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "damaged"]
    assert os.listdir(tmp_path / "ckpt" / "damaged") == ["2"]
    # Orbax's own lines name paths, and this test's tmp_path holds the word "damaged": count the trainer's lines.
    lines = [r for r in caplog.records if r.name == "qwen3next_train.checkpoint" and "damaged" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint at step 2 cannot be restored" in lines[0].getMessage()
    assert "Traceback" not in caplog.text

    again = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig(every=1, keep=2))
    it = iter(train)
    again.save(2, {"x": np.full(4, 2, np.float32)}, it, CONFIG)  # the damaged step is written again
    again.wait()
    it.close()
    assert again.steps() == [1, 2]


def test_an_only_damaged_checkpoint_leaves_a_fresh_start(tmp_path):
    train = _stream(tmp_path)
    it = iter(train)
    ckpt = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig(every=1))
    next(it)
    ckpt.save(1, {"x": np.ones(4, np.float32)}, it, CONFIG)
    ckpt.wait()
    it.close()
    _damage(tmp_path / "ckpt" / "1", "state")
    restored = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig()).restore_newest(
        {"x": jax.ShapeDtypeStruct((4,), np.float32)}, lambda: pytest.fail("no iterator is needed"), CONFIG)
    assert restored is None
    assert os.listdir(tmp_path / "ckpt" / "damaged") == ["1"]


def test_keep_zero_keeps_every_checkpoint(tmp_path):
    train = _stream(tmp_path)
    it = iter(train)
    ckpt = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig(every=1, keep=0))
    for step in range(1, 6):
        ckpt.save(step, {"x": np.ones(4, np.float32)}, it, CONFIG)
    ckpt.wait()
    it.close()
    assert ckpt.steps() == [1, 2, 3, 4, 5]
    assert load_config(None, ["checkpoint.keep=0"]).checkpoint.keep == 0


def test_a_failed_asynchronous_save_is_reported(tmp_path, monkeypatch):
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    train = _stream(tmp_path)
    it = iter(train)
    ckpt = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig(every=1))
    ckpt.save(1, {"x": np.ones(4, np.float32)}, it, CONFIG)
    ckpt.wait()
    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", disk_full)
    ckpt.save(2, {"x": np.ones(4, np.float32)}, it, CONFIG)
    with pytest.raises(CheckpointSaveError, match=r"checkpoint of step 2 was not written .* the newest complete one "
                                                  r"is step 1"):
        ckpt.wait()
    it.close()
    ckpt.close()


# ------------------------------------------------------------------------------------------ metrics.jsonl

class SimulatedKill(BaseException):
    pass


def test_a_kill_during_the_metrics_rewrite_loses_nothing(tmp_path, monkeypatch):
    """Resuming from step 2 drops the records after it. The process dies at the first byte written during that
    rewrite: the file still holds every record."""
    import builtins

    path = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
    path.write_text(original)
    real_open = builtins.open

    class DiesOnWrite:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            raise SimulatedKill

        writelines = write

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def dying_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return DiesOnWrite(f) if any(m in mode for m in "wax+") else f

    monkeypatch.setattr(builtins, "open", dying_open)
    with pytest.raises(SimulatedKill):
        MetricsLog(str(tmp_path), resume_step=2, tensorboard=False)
    monkeypatch.setattr(builtins, "open", real_open)
    assert path.read_text() == original
    log = MetricsLog(str(tmp_path), resume_step=2, tensorboard=False)  # the next start truncates for real
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_state_tree_unlike_the_models_refuses(tmp_path):
    """A checkpoint whose state tree differs (another trainer version wrote it) is not damage: it is refused, named,
    and left in place."""
    from qwen3next_train.config import ConfigError

    train = _stream(tmp_path)
    it = iter(train)
    ckpt = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig(every=1))
    ckpt.save(1, {"x": np.ones(4, np.float32), "old": np.ones(2, np.float32)}, it, CONFIG)
    ckpt.wait()
    it.close()
    with pytest.raises(ConfigError, match=r"its state does not have this model's tree \(2 differences: unexpected "
                                          r"old; x has shape \(4,\), the model's is \(5,\)\)"):
        Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig()).restore_newest(
            {"x": jax.ShapeDtypeStruct((5,), np.float32)}, lambda: pytest.fail("nothing is restored"), CONFIG)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]
