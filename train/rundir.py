"""The files of a run directory besides its checkpoints: written atomically, and never overwritten with a change.

Paths are etils.epath paths: local, or a bucket's (gs://...). A local file is written to `<name>.tmp` and renamed
over the old one, so a kill leaves either the old or the new file, never a partial one; a bucket's object is
replaced whole by one upload, which is atomic by itself (and a bucket has no atomic rename). A file about to be
replaced by different content is first kept beside it as `<stem>.<n><suffix>` (config.yaml -> config.1.yaml, ...).
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
    """Whether `path` is a URI (gs://bucket/...) rather than a local path."""
    return "://" in os.fspath(path)


def write_atomically(path: epath.PathLike, text: str) -> None:
    path = epath.Path(path)
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def keep_earlier_version(path: epath.PathLike) -> epath.Path:
    """Renames `path` to the first free `<stem>.<n><suffix>`; returns the new name."""
    path = epath.Path(path)
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(kept)
    return kept


def write_versioned(path: epath.PathLike, text: str) -> epath.Path | None:
    """Writes `text` to `path`, keeping a different earlier content beside it; returns where that went."""
    path = epath.Path(path)
    kept = None
    if path.exists():
        if path.read_text() == text:
            return None
        kept = keep_earlier_version(path)
    write_atomically(path, text)
    return kept
