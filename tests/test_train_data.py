"""The grain pipeline: every file format, globs, tokenizers, packing metadata, iterator state round trip."""
import json
import re

import numpy as np
import pytest

from qwen3next_train.config import DataConfig
from qwen3next_train.data import BYTE_EOS, ByteTokenizer, Documents, HFTokenizer, packed_batches, split_documents, train_and_val

TEXTS = [f"document number {i}: " + "abc " * (i % 7) for i in range(40)]


@pytest.fixture
def corpus(tmp_path):
    """The same 40 documents as .txt files, JSONL, Parquet and ArrayRecord."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    files = {}
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(TEXTS):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(t)
    files["txt"] = str(tmp_path / "txt")
    files["jsonl"] = str(tmp_path / "d.jsonl")
    with open(files["jsonl"], "w") as f:
        f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS))
    files["parquet"] = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"text": TEXTS}), files["parquet"], row_group_size=16)
    files["array_record"] = str(tmp_path / "d.array_record")
    writer = ArrayRecordWriter(files["array_record"], "group_size:1")
    for t in TEXTS:
        writer.write(t.encode())
    writer.close()
    return files


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet", "array_record"])
def test_every_format_reads_the_same_documents(corpus, fmt):
    from qwen3next_train.data import expand_sources

    docs = Documents(expand_sources([corpus[fmt]]), "text")
    assert sorted(docs[i] for i in range(len(docs))) == sorted(TEXTS)


def test_packing_metadata_and_end_of_document(corpus):
    docs = Documents([corpus["jsonl"]], "text")
    batch = next(iter(packed_batches(docs, ByteTokenizer(), seq_len=64, batch_size=3, seed=None)))
    ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
    assert ids.shape == seg.shape == pos.shape == (3, 64) and ids.dtype == np.int32
    assert (seg > 0).all()  # concat-then-split leaves no padding
    stream = np.concatenate([ids[r] for r in range(3)])
    first = np.frombuffer(TEXTS[0].encode(), np.uint8)
    np.testing.assert_array_equal(stream[:len(first)], first)
    assert stream[len(first)] == BYTE_EOS
    for r in range(3):
        starts = np.flatnonzero(np.diff(seg[r], prepend=0) != 0)
        for s, e in zip(starts, list(starts[1:]) + [64]):
            np.testing.assert_array_equal(pos[r, s:e], np.arange(e - s))


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    hf = HFTokenizer(path, eos_id=3)
    assert hf.vocab_size == 4
    np.testing.assert_array_equal(hf.encode("a b zz a"), [1, 2, 0, 1])


def test_split_is_disjoint_and_the_stream_holds_every_training_document(corpus):
    cfg = DataConfig(sources=[corpus["jsonl"]], val_fraction=0.1)
    train, val = split_documents(cfg)
    assert len(val) == 4 and len(train) == 36
    assert not {train[i] for i in range(len(train))} & {val[i] for i in range(len(val))}
    ds = packed_batches(train, ByteTokenizer(), seq_len=4096, batch_size=1, seed=None)
    row = next(iter(ds))["input_ids"][0]  # longer than all training documents: every one in it
    seen = re.findall(r"document number (\d+)", bytes(row[row < 256].astype(np.uint8)).decode())
    assert set(seen) == {re.search(r"document number (\d+)", train[i]).group(1) for i in range(len(train))}


@pytest.mark.parametrize("num_workers, window", [(0, 0), (0, 8), (0, 100), (1, 8)])
def test_iterator_state_round_trip(corpus, num_workers, window):
    cfg = DataConfig(sources=[corpus["jsonl"]], seq_len=16, batch_size=2, packing_streams=4,
                     row_shuffle_window=window, num_workers=num_workers)
    train, _ = train_and_val(cfg, ByteTokenizer())
    it = iter(train)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what grain's Orbax handler writes and reads back
    expected = [next(it) for _ in range(60)]  # past the end of the first epoch: the reshuffled second one
    it.close()
    again = iter(train)
    again.set_state(state)
    for want in expected:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    again.close()


def test_globs_match_as_the_standard_library_does(tmp_path, monkeypatch):
    """Sources are listed through epath (a bucket has no glob module); the result is glob.glob's, hidden names and
    recursive ** included."""
    import glob
    import os

    from qwen3next_train.data import expand_sources

    for name in ["x.txt", "a/y.txt", "a/b/z.txt", "a/b/z.md", ".h/w.txt", "a/.q.txt", "a/.d/v.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    monkeypatch.chdir(tmp_path)
    for pattern in ["*.txt", "**/*.txt", "a/**", "*/b/*", "a/*/*.md", ".h/*", "?.txt", "[ax]/?.t[x]t",
                    str(tmp_path / "**" / "*.txt")]:
        want = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        assert expand_sources([pattern]) == want, pattern
    assert expand_sources(["a"]) == sorted(p for p in glob.glob("a/**/*", recursive=True) if os.path.isfile(p))
