"""The Gated DeltaNet input conv: in_proj_qkvz's output split into q, k, v, z, with a causal depthwise conv and SiLU
over q, k, v (plain JAX reference, Mosaic GPU kernels)."""
from qwen3next_kernels.conv.dispatch import split_conv
from qwen3next_kernels.conv.reference import reference_split_conv

__all__ = ["split_conv", "reference_split_conv"]
