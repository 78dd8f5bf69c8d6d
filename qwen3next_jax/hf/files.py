"""The files of a Hugging Face checkpoint directory, and the errors that name them."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is on disk; the message names the file (and the tensors)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model its config.json describes (all problems listed)."""


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document at `path`; a file that is not JSON is a CheckpointError naming it and the line."""
    try:
        return json.loads(epath.Path(path).read_bytes())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{os.fspath(path)}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") \
            from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{os.fspath(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def write_json(path: str | os.PathLike, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
