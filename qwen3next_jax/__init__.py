"""Qwen3-Next in JAX / Flax NNX: the exact model, and Hugging Face checkpoints in and out."""

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.hf import CheckpointError, CheckpointMismatchError, load_hf_checkpoint, save_hf_checkpoint
from qwen3next_jax.model import Qwen3NextForCausalLM

__all__ = ["Qwen3NextConfig", "Qwen3NextForCausalLM", "load_hf_checkpoint", "save_hf_checkpoint",
           "CheckpointError", "CheckpointMismatchError"]
