"""Orbax checkpoints of the trainer, without a model: the data iterator travels with the arrays, a restore lands
on whatever mesh the abstract state names, and a half-written (temporary) checkpoint is never restored."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from qwen3next_jax.sharding import make_mesh
from qwen3next_train.checkpoint import Checkpoints
from qwen3next_train.config import CheckpointConfig, DataConfig, TrainConfig
from qwen3next_train.data import ByteTokenizer, train_and_val


CONFIG = TrainConfig().to_dict()


def _data_iter(tmp_path):
    (tmp_path / "docs").mkdir(exist_ok=True)
    for i in range(12):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"text {i} " * 9)
    train, _ = train_and_val(DataConfig(sources=[str(tmp_path / "docs")], seq_len=8, batch_size=2,
                                        packing_streams=3, row_shuffle_window=4), ByteTokenizer())
    return train


def test_restore_onto_another_mesh_with_the_data_position(tmp_path):
    mesh_a, mesh_b = make_mesh(data=-1), make_mesh(fsdp=2, tensor=-1)
    value = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    state = {"w": jax.device_put(value, NamedSharding(mesh_a, P("data", None))), "step": jnp.int32(7)}
    train = _data_iter(tmp_path)
    it = iter(train)
    for _ in range(3):
        next(it)
    ckpt = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig(every=1, keep=2))
    ckpt.save(3, state, it, CONFIG)
    following = [next(it) for _ in range(4)]  # the iterator moves on while the save completes
    ckpt.wait()

    target = NamedSharding(mesh_b, P("fsdp", "tensor"))
    abstract = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=target),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    fresh = iter(train)
    restored = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig()).restore_newest(abstract, lambda: fresh, CONFIG)
    step, restored, fresh = restored.step, restored.state, restored.data_iter
    assert step == 3 and int(restored["step"]) == 7
    assert restored["w"].sharding == target
    np.testing.assert_array_equal(np.asarray(restored["w"]), value)
    for want in following:
        np.testing.assert_array_equal(next(fresh)["input_ids"], want["input_ids"])


def test_half_written_checkpoint_is_never_restored(tmp_path):
    train = _data_iter(tmp_path)
    it = iter(train)
    ckpt = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig(every=1, keep=3))
    ckpt.save(1, {"x": jnp.ones(4)}, it, CONFIG)
    ckpt.wait()
    # What a run killed mid-save leaves: Orbax's temporary directory for step 2, never renamed to "2".
    partial = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 10)
    restored = Checkpoints(str(tmp_path / "ckpt"), CheckpointConfig()).restore_newest(
        {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}, lambda: iter(train), CONFIG)
    step, restored = restored.step, restored.state
    assert step == 1
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.ones(4))
    assert not os.path.exists(partial)  # and Orbax cleans it up
