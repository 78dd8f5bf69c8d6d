"""Gated DeltaNet (gated delta rule) op: token-by-token reference, chunked pure JAX, Pallas kernels."""
from kernels_pallas.gdn.chunked import chunked_gated_delta_rule
from kernels_pallas.gdn.dispatch import KERNELS, Kernel, gated_delta_rule
from kernels_pallas.gdn.reference import reference_gated_delta_rule

__all__ = ["gated_delta_rule", "chunked_gated_delta_rule", "reference_gated_delta_rule", "KERNELS", "Kernel"]
