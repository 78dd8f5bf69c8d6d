"""The tensors of a Hugging Face checkpoint directory, read lazily by name.

One `model.safetensors`, or the shards that `model.safetensors.index.json` names, opened with `safetensors.safe_open`
(memory-mapped: a tensor is read when asked for). A file that safetensors cannot parse (truncated, corrupt header,
not a safetensors file) or an index that is not what transformers writes is a CheckpointError naming the file.

Paths are etils.epath paths. A file in a bucket (gs://...), which a memory map cannot reach, is read by byte ranges
instead (`_RangedFile`: the header once, each tensor when asked for).
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import SafetensorError, safe_open

from qwen3next_jax.hf.files import INDEX_FILE, SINGLE_FILE, CheckpointError, CheckpointMismatchError, read_json

# The dtypes a parameter may be stored in. Integer, bool and fp8 tensors (fp8 needs its scales) are refused.
FLOAT_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                "BF16": np.dtype(ml_dtypes.bfloat16)}


# Every dtype a safetensors header may name, for files read by byte ranges.
_ALL_DTYPES = {**FLOAT_DTYPES, "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
               "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
               "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


def _is_remote(path: str) -> bool:
    return "://" in path


class _RangedFile:
    """A safetensors file in a bucket, read by byte ranges through epath (the format: an 8-byte little-endian header
    length, a JSON header of name -> dtype, shape, data_offsets, then the data). It answers the calls of a
    safe_open handle that SafetensorsReader makes."""

    class _Slice:
        def __init__(self, info: dict):
            self._info = info

        def get_shape(self) -> list[int]:
            return list(self._info["shape"])

        def get_dtype(self) -> str:
            return self._info["dtype"]

    def __init__(self, path: str):
        self.path = epath.Path(path)
        with self.path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n))
                self._tensors = {k: v for k, v in header.items() if k != "__metadata__"}
                self._ranges = {k: (int(v["data_offsets"][0]), int(v["data_offsets"][1]))
                                for k, v in self._tensors.items()}
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                raise SafetensorError(f"the header is not a safetensors header ({type(e).__name__}: {e})") from None
        self._data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_slice(self, name: str) -> "_RangedFile._Slice":
        return self._Slice(self._tensors[name])

    def get_tensor(self, name: str) -> np.ndarray:
        info, (begin, end) = self._tensors[name], self._ranges[name]
        if info["dtype"] not in _ALL_DTYPES:
            raise SafetensorError(f"dtype {info['dtype']} is not one this reader knows")
        with self.path.open("rb") as f:
            f.seek(self._data_start + begin)
            data = f.read(end - begin)
        if len(data) != end - begin:
            raise SafetensorError(f"the file ends before {name}'s data does (truncated)")
        return np.frombuffer(data, _ALL_DTYPES[info["dtype"]]).reshape(info["shape"])


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
        if epath.Path(index).exists():
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
        elif epath.Path(self.path, SINGLE_FILE).exists():
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
        if not epath.Path(full).exists():
            raise FileNotFoundError(f"{self.path}: shard {fn} named in {INDEX_FILE} is missing")
        try:
            handle = _RangedFile(full) if _is_remote(full) else safe_open(full, framework="numpy")
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
