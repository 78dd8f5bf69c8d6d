"""Hugging Face checkpoints in and out, one module per concern:

- `files`: the file names of a checkpoint directory, JSON reading, and the errors (CheckpointError and its
  CheckpointMismatchError) that name the bad file or tensor;
- `names`: the one table from our parameter tree to HF tensor names and layouts (`leaf_specs`);
- `safetensors`: the lazy reader of one file or an index's shards;
- `load`: import (`load_hf_checkpoint`), streaming tensor by tensor onto an optional mesh;
- `save`: export (`save_hf_checkpoint`, and `write_hf_checkpoint` from any source of (leaf, repeat) slices);
- `tokenizer`: the tokenizer files and generation_config.json that go beside an exported trained model.
"""

from qwen3next_jax.hf.files import CheckpointError, CheckpointMismatchError
from qwen3next_jax.hf.load import load_hf_checkpoint, read_hf_config
from qwen3next_jax.hf.save import save_hf_checkpoint, write_hf_checkpoint

__all__ = ["CheckpointError", "CheckpointMismatchError", "load_hf_checkpoint", "read_hf_config",
           "save_hf_checkpoint", "write_hf_checkpoint"]
