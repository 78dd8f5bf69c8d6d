"""Training data on grain: documents from files, tokenised, shuffled, packed into rows, batched.

The pipeline (one global stream; every process runs the same one):

    documents (random access)
    -> shuffle(seed)  -> `packing_streams` disjoint slices, each reshuffled every epoch, repeated forever,
       tokenised (+ end-of-document token) and packed by grain's ConcatThenSplit into rows of seq_len
    -> rows taken from the streams in turn, shuffled within a window  -> batch  -> worker processes (optional)

Packing concatenates documents and splits at row ends, so no token is dropped and rows need no padding. Each row
carries `segment_ids` (1, 2, ... per document piece, 0 = padding) and `positions` (restarting at 0 at each piece);
a document split across two rows continues in the next row as a new piece starting at position 0. The model masks
attention by segment and restarts the Gated DeltaNet state at each piece, so a packed row computes exactly what its
pieces would compute run one by one (tests/test_train_packing.py).

The stream does not depend on the number of processes. Each batch is the global batch [data.batch_size, seq_len];
every process builds all of it and hands its own devices' rows to JAX (loop._global_batch), so one process with 8
devices and two with 4 each train on the same rows in the same order (tests/test_multihost.py). The cost: every host
reads, tokenises and packs the whole global batch, so the host work per token grows with the number of hosts (the
packing itself is cheap; tokenisation is the part to watch: data.num_workers spreads it over worker processes).
Because all processes hold the same iterator state, a checkpoint's data position restores on any number of
processes (train/checkpoint.py).

The iterator is a grain DatasetIterator: its state (a small dict) is saved with every checkpoint through grain's
Orbax handler, and restoring it continues with the very next batch.

Paths (sources, tokenizer) are etils.epath paths: local, or a bucket (gs://...) read through epath's backends.
Text, JSONL and Parquet files are read with epath (a JSONL document or a Parquet row group per read); ArrayRecord
files are read by array_record's own reader, which opens local paths and gs:// itself.

Bad input is found when the sources are opened, before any model exists: a pattern that matches nothing, a JSONL
line that is not JSON (file and line number), a record without the text field or with a non-string one, a Parquet
file without the column or with a non-string one, a missing or unreadable tokenizer.json. Each is a ConfigError
naming the key, file and line. Records whose text is null are skipped and counted in one warning per file.
"""

from __future__ import annotations

import bisect
import fnmatch
import functools
import glob
import json
import logging
import os
import sysconfig

import grain
from absl import flags
import numpy as np
from etils import epath

from qwen3next_train.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

BYTE_VOCAB = 257  # bytes 0..255 and the end-of-document token 256
BYTE_EOS = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids, and 256 closing every document: needs no vocabulary file."""

    vocab_size = BYTE_VOCAB
    eos_id = BYTE_EOS

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


class HFTokenizer:
    """Any Hugging Face `tokenizer.json`, read by the `tokenizers` library (picklable, so it runs in workers)."""

    def __init__(self, path: str, eos_id: int | None):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_str(epath.Path(path).read_text())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)


def make_tokenizer(spec: str, eos_id: int | list[int] | None):
    """"bytes", or a tokenizer.json (or a directory holding one); a missing or unreadable file is a ConfigError."""
    if spec == "bytes":
        return ByteTokenizer()
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    path = epath.Path(spec)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.exists():
        raise ConfigError(f"data.tokenizer: {os.fspath(path)!r} does not exist (give 'bytes' or the path of a "
                          "tokenizer.json)")
    try:
        return HFTokenizer(path, eos_id)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a malformed file
        raise ConfigError(f"data.tokenizer: {path} is not a readable tokenizer.json ({e})") from None


# ---------------------------------------------------------------------------------------------------- documents

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".text")


class _WholeFile:
    """One document: the file's text."""

    def __init__(self, path: str, field: str):
        self.path = path

    def __len__(self):
        return 1

    def __getitem__(self, i: int) -> str:
        return epath.Path(self.path).read_bytes().decode("utf-8", errors="replace")


class _JsonLines:
    """One document per line: line[field]. The file is read once when opened: every line is parsed (so a bad one
    is named before training starts) and the offsets of the documents kept, so any one is read with one seek."""

    def __init__(self, path: str, field: str):
        self.path, self.field = path, field
        offsets, pos, self.nulls, self.first_null = [], 0, 0, None
        with epath.Path(path).open("rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    text = self._text(line, number)
                    if text is None:
                        self.nulls += 1
                        self.first_null = self.first_null or number
                    else:
                        offsets.append(pos)
                pos += len(line)
        self.offsets = np.asarray(offsets, np.int64)

    def _text(self, line: bytes, number: int) -> str | None:
        where = f"data.sources: {self.path}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise ConfigError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or self.field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError(f"{where}: no field {self.field!r} (data.text_field) in the record (it has {keys})")
        text = record[self.field]
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"{where}: field {self.field!r} is a {type(text).__name__}, not a string")
        return text

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i: int) -> str:
        with epath.Path(self.path).open("rb") as f:
            f.seek(int(self.offsets[i]))
            return json.loads(f.readline())[self.field]


class _Parquet:
    """One document per row of column `field`; a row group is read whole and the last one kept. The column's type
    is checked when the file is opened; rows where it is null are skipped (the column is read once to find them,
    only when the file's statistics do not rule nulls out)."""

    def __init__(self, path: str, field: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.field = path, field
        with epath.Path(path).open("rb") as f:
            self._read_schema(pa, pq, f)

    def _read_schema(self, pa, pq, f) -> None:
        path, field = self.path, self.field
        try:
            file = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"data.sources: {path}: not a readable Parquet file ({e})") from None
        schema = file.schema_arrow
        if field not in schema.names:
            raise ConfigError(f"data.sources: {path}: no column {field!r} (data.text_field); it has {schema.names}")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ConfigError(f"data.sources: {path}: column {field!r} is {kind}, not a string")
        meta = file.metadata
        self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self.rows, self.nulls, self.first_null = None, 0, None
        if self._may_hold_nulls(meta, schema.get_field_index(field)):
            valid = file.read(columns=[field]).column(0).is_valid().to_numpy(zero_copy_only=False)
            self.nulls = int((~valid).sum())
            if self.nulls:
                self.rows = np.flatnonzero(valid)
                self.first_null = int(np.flatnonzero(~valid)[0]) + 1

    @staticmethod
    def _may_hold_nulls(meta, column: int) -> bool:
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(column).statistics
            if stats is None or not stats.has_null_count or stats.null_count:
                return True
        return False

    def __len__(self):
        return int(self.starts[-1]) if self.rows is None else len(self.rows)

    @functools.lru_cache(maxsize=1)
    def _group(self, g: int) -> list:
        import pyarrow.parquet as pq

        with epath.Path(self.path).open("rb") as f:
            return pq.ParquetFile(f).read_row_group(g, columns=[self.field]).column(0).to_pylist()

    def __getitem__(self, i: int) -> str:
        if self.rows is not None:
            i = int(self.rows[i])
        g = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self._group(g)[i - int(self.starts[g])]


class _ArrayRecord:
    """One UTF-8 document per record."""

    def __init__(self, path: str, field: str):
        self.source = grain.sources.ArrayRecordDataSource([path])

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i: int) -> str:
        record = self.source[i]
        return record.decode("utf-8", errors="replace") if isinstance(record, bytes) else record


def _reader(path: str):
    if path.endswith((".jsonl", ".json")):
        return _JsonLines
    if path.endswith(".parquet"):
        return _Parquet
    if path.endswith((".array_record", ".arrayrecord")) or ".array_record-" in path:
        return _ArrayRecord
    return _WholeFile


def default_sources() -> list[str]:
    """The built-in corpus: the Python standard library's own source (without site-packages)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return [p for p in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True) if "site-packages" not in p]


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Whether path components `parts` match glob components `pattern` ("**" = any number of directories; as in
    glob, a name starting with "." is matched only by a pattern component starting with ".")."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    return (bool(parts) and (not parts[0].startswith(".") or pattern[0].startswith("."))
            and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(pattern[1:], parts[1:]))


def _files(pattern: str) -> list[str]:
    """The files a path, directory (all its files, recursively) or glob names, through epath: a bucket's too."""
    path = epath.Path(pattern)
    if not glob.has_magic(pattern):
        if path.is_dir():
            pattern = str(path / "**" / "*")
        else:
            return [str(path)] if path.exists() else []
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    root = epath.Path("/".join(parts[:fixed]) or ".")
    if not root.is_dir():
        return []
    # Listed directory by directory (epath's walk loses a bucket's scheme with its fsspec backend); without "**",
    # no deeper than the pattern reaches: on a bucket, every directory listed is a request.
    pattern, found, todo = parts[fixed:], [], [(root, ())]
    while todo:
        directory, relative = todo.pop()
        for child in directory.iterdir():
            where = (*relative, child.name)
            if child.is_dir():
                if "**" in pattern or len(where) < len(pattern):
                    todo.append((child, where))
            elif _glob_match(pattern, list(where)):
                found.append(str(child))
    return found


def expand_sources(patterns: list[str]) -> list[str]:
    """Files named by paths, directories (their files, recursively) and globs; sorted, so every host agrees."""
    files = []
    for pattern in patterns:
        matches = _files(pattern)
        if not matches:
            raise ConfigError(f"data.sources: no file matches {pattern!r}")
        files += matches
    return sorted(set(files))


class Documents:
    """A grain random-access source over all documents of many files; `indices` selects a subset (a split)."""

    def __init__(self, files: list[str], field: str, indices: np.ndarray | None = None):
        self.files = [_reader(f)(f, field) for f in files]
        for f in self.files:
            if getattr(f, "nulls", 0):
                log.warning("data.sources: %s: %d record(s) have %s null (the first at %s %d); they are skipped",
                            f.path, f.nulls, field, "row" if isinstance(f, _Parquet) else "line", f.first_null)
        self.starts = np.cumsum([0] + [len(f) for f in self.files])
        self.indices = np.arange(self.starts[-1]) if indices is None else indices

    def subset(self, indices: np.ndarray) -> "Documents":
        sub = object.__new__(Documents)
        sub.files, sub.starts, sub.indices = self.files, self.starts, self.indices[indices]
        return sub

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        j = int(self.indices[i])
        f = bisect.bisect_right(self.starts, j) - 1
        return self.files[f][j - int(self.starts[f])]


def split_documents(cfg: DataConfig) -> tuple[Documents, Documents]:
    """(train, validation): a fixed random share val_fraction of the documents (at least one) is held out."""
    docs = Documents(expand_sources(cfg.sources) if cfg.sources else default_sources(), cfg.text_field)
    n = len(docs)
    n_val = max(1, int(round(n * cfg.val_fraction))) if cfg.val_fraction > 0 else 0
    if n - n_val < 1:
        raise ConfigError(f"data.sources: {n} documents are too few to hold out {n_val} for validation "
                          f"(data.val_fraction {cfg.val_fraction})")
    order = np.random.default_rng(cfg.seed).permutation(n)
    return docs.subset(np.sort(order[n_val:])), docs.subset(np.sort(order[:n_val]))


# ---------------------------------------------------------------------------------------------------- pipeline


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def map(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text)
        if self.tokenizer.eos_id is not None:
            ids = np.append(ids, np.int32(self.tokenizer.eos_id))
        return {"tokens": ids}


def _rename(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"input_ids": batch["tokens"], "segment_ids": batch["tokens_segment_ids"],
            "positions": batch["tokens_positions"]}


def _slices_as_tuples(state):
    """grain's ConcatThenSplit marks "no remainder" with the tuple (-1, -1) and compares its state against it, but
    a state read back from grain's JSON checkpoint holds lists; turn its `remainder_slices` back into tuples."""
    if isinstance(state, dict):
        return {k: {f: tuple(sl) for f, sl in v.items()} if k == "remainder_slices" else _slices_as_tuples(v)
                for k, v in state.items()}
    if isinstance(state, list):
        return [_slices_as_tuples(v) for v in state]
    return state


class _CheckpointableIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(_slices_as_tuples(state))


class _Checkpointable(grain.IterDataset):
    """The pipeline's outermost stage: restores exactly from a state that went through JSON."""

    def __iter__(self):
        return _CheckpointableIterator(self._parent.__iter__())


def packed_batches(docs: Documents, tokenizer, *, seq_len: int, batch_size: int, seed: int | None,
                   streams: int = 1, row_shuffle_window: int = 0, num_workers: int = 0) -> grain.IterDataset:
    """Global batches {input_ids, segment_ids, positions} of shape [batch_size, seq_len], int32, forever.

    seed=None keeps the document order (validation).
    """
    ds = grain.MapDataset.source(docs)
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    # Concat-then-split packing turns a long document into many consecutive rows. Packing `streams` disjoint
    # slices of the documents side by side and taking rows from each in turn gives every batch rows of many
    # documents; rows are then also shuffled within windows. All of it is checkpointed with the iterator.
    streams = min(streams, len(ds))
    packed = grain.experimental.InterleaveIterDataset([
        grain.experimental.ConcatThenSplitIterDataset(
            ds[i::streams].repeat(None).map(_Tokenize(tokenizer)).to_iter_dataset(), length_struct={"tokens": seq_len})
        for i in range(streams)], cycle_length=streams)
    if seed is not None and row_shuffle_window > 1:
        packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=row_shuffle_window, seed=seed)
    batches = packed.batch(batch_size, drop_remainder=True).map(_rename)
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags, which a non-absl program never parses
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return _Checkpointable(batches)


def train_and_val(cfg: DataConfig, tokenizer) -> tuple[grain.IterDataset, grain.IterDataset]:
    """The training stream and the validation stream (global batches: the same on every process)."""
    train_docs, val_docs = split_documents(cfg)
    kw = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size)
    train = packed_batches(train_docs, tokenizer, seed=cfg.seed, streams=cfg.packing_streams,
                           row_shuffle_window=cfg.row_shuffle_window, num_workers=cfg.num_workers, **kw)
    val = packed_batches(val_docs, tokenizer, seed=None, **kw)
    return train, val
