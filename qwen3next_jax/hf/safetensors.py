"""The tensors of a Hugging Face checkpoint directory, read lazily by name.

One `model.safetensors`, or the shards that `model.safetensors.index.json` names, opened with `safetensors.safe_open`
(memory-mapped: a tensor is read when asked for). A file that safetensors cannot parse (truncated, corrupt header,
not a safetensors file) or an index that is not what transformers writes is a CheckpointError naming the file.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from qwen3next_jax.hf.files import INDEX_FILE, SINGLE_FILE, CheckpointError, CheckpointMismatchError, read_json

# The dtypes a parameter may be stored in. Integer, bool and fp8 tensors (fp8 needs its scales) are refused.
FLOAT_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                "BF16": np.dtype(ml_dtypes.bfloat16)}


def _read_index(path: str) -> dict[str, str]:
    """The weight map of an index file: tensor name -> shard file name."""
    index = read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: expected an object with a \"weight_map\" of tensor name -> shard file name")
    return weight_map


class SafetensorsReader:
    """The tensors of a checkpoint directory (one file, or the shards an index names), read lazily by name."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.exists(index):
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(self.path, SINGLE_FILE)):
            files, weight_map = [SINGLE_FILE], None
        else:
            raise FileNotFoundError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self._handles = {}
        self.file_of: dict[str, str] = {}
        self.shape: dict[str, tuple] = {}
        self.dtype: dict[str, str] = {}
        try:
            for fn in files:
                self._open(fn, weight_map)
            absent = sorted(n for n in weight_map or () if n not in self.file_of)
            if absent:
                raise CheckpointMismatchError(
                    f"{self.path}: {INDEX_FILE} maps {len(absent)} tensor(s) to shards that do not hold them: "
                    + ", ".join(f"{n} -> {weight_map[n]}" for n in absent[:20]))
        except BaseException:
            self.close()
            raise

    def _open(self, fn: str, weight_map: dict[str, str] | None) -> None:
        full = os.path.join(self.path, fn)
        if not os.path.exists(full):
            raise FileNotFoundError(f"{self.path}: shard {fn} named in {INDEX_FILE} is missing")
        try:
            handle = safe_open(full, framework="numpy")
        except SafetensorError as e:
            raise CheckpointError(f"{full}: not a readable safetensors file ({e})") from None
        self._handles[fn] = handle
        for name in handle.keys():
            if weight_map is not None and weight_map.get(name) != fn:
                continue  # the index is authoritative (a tensor in a shard but not mapped there is ignored)
            sl = handle.get_slice(name)
            self.file_of[name] = fn
            self.shape[name] = tuple(sl.get_shape())
            self.dtype[name] = sl.get_dtype()

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> np.ndarray:
        try:
            return self._handles[self.file_of[name]].get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{os.path.join(self.path, self.file_of[name])}: cannot read {name} ({e})") \
                from None

    def np_dtype(self, name: str) -> np.dtype:
        return FLOAT_DTYPES[self.dtype[name]]

    def close(self):
        for h in self._handles.values():
            close = getattr(h, "__exit__", None)
            if close:
                close(None, None, None)
        self._handles = {}
