"""The LM head's cross entropy: logits = hidden @ w, reduced per token to (cross entropy, logsumexp) in fp32."""
