"""Gated DeltaNet (gated delta rule) op: token-by-token reference, chunked pure JAX, Pallas kernels."""
from qwen3next_kernels.gdn.chunked import chunked_gated_delta_rule
from qwen3next_kernels.gdn.dispatch import gated_delta_rule
from qwen3next_kernels.gdn.reference import reference_gated_delta_rule

__all__ = ["gated_delta_rule", "chunked_gated_delta_rule", "reference_gated_delta_rule"]
