"""The Qwen3-Next trainer: config schema, grain data with exact packing, losses, Optax, Orbax checkpoints, logging."""
