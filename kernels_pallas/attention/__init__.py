"""Causal softmax attention within packed documents: plain XLA (the reference) and cuDNN flash attention."""
