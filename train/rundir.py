"""The files of a run directory besides its checkpoints: written atomically, and never overwritten with a change.

A file is written to `<name>.tmp` and renamed over the old one, so a kill leaves either the old or the new file,
never a partial one. A file about to be replaced by different content is first kept beside it as
`<stem>.<n><suffix>` (config.yaml -> config.1.yaml, config.2.yaml, ...).
"""

from __future__ import annotations

import os


def write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def keep_earlier_version(path: str) -> str:
    """Renames `path` to the first free `<stem>.<n><suffix>`; returns the new name."""
    stem, suffix = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{suffix}"):
        n += 1
    os.rename(path, f"{stem}.{n}{suffix}")
    return f"{stem}.{n}{suffix}"


def write_versioned(path: str, text: str) -> str | None:
    """Writes `text` to `path`, keeping a different earlier content beside it; returns where that went."""
    kept = None
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return None
        kept = keep_earlier_version(path)
    write_atomically(path, text)
    return kept
