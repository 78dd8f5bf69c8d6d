"""A stand-in for a Cloud Storage bucket: `gs://<bucket>/<key>` is stored as `<root>/<bucket>/<key>`.

It replaces only the two places where bytes leave the process for GCS, and one question Orbax asks the GCS API:
- etils.epath's backend for `gs://` (gcsfs or TensorFlow's gfile on a real host): every epath call of the trainer,
  grain and Orbax on a gs:// path reaches this class instead;
- Orbax's TensorStore kvstore spec for a gs:// path (TensorStore's own GCS driver on a real host): a file kvstore
  under root;
- whether the bucket has a hierarchical namespace (Orbax asks google-cloud-storage when it deletes): no, as a
  default bucket.
Everything between stays the real code path for gs://: Orbax takes its GCS branch (commit files instead of atomic
renames), paths keep their scheme, and any os.path / open / glob on one would miss (or write a local `gs:` folder,
which the tests look for). Like a bucket, it refuses to append to an object.
"""
from __future__ import annotations

import os

from etils.epath import backend as epath_backend

SCHEME = "gs://"


class FakeBucket(epath_backend._OsPathBackend):  # epath's local backend, behind a URI mapping
    def __init__(self, root):
        self.root = os.fspath(root)

    def local(self, path) -> str:
        path = os.fspath(path)
        if not path.startswith(SCHEME):
            raise ValueError(f"not a {SCHEME} path: {path!r}")
        return os.path.join(self.root, path[len(SCHEME):])

    def uri(self, local) -> str:
        return SCHEME + os.path.relpath(os.fspath(local), self.root)

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"{path}: a Cloud Storage object cannot be appended to or updated "
                                      f"(mode {mode!r})")
        if "w" in mode:  # a bucket has no directories to make first
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
        return super().open(self.local(path), mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return [self.uri(p) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.uri(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        return super().rmtree(self.local(path))

    def remove(self, path):
        return super().remove(self.local(path))

    def rename(self, path, dst):
        return super().rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        return super().replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(self.local(path), self.local(dst), overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


def install(monkeypatch, root) -> FakeBucket:
    """Serves gs:// from `root` for the rest of the test."""
    from etils.epath import gpath
    from orbax.checkpoint._src.path import gcs_utils

    bucket = FakeBucket(root)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", bucket)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": bucket.local(path)})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    return bucket
