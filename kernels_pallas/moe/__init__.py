"""The experts' SwiGLU MLP over rows grouped by expert: jax.lax.ragged_dot (the reference; native on TPU) and a
tiled grouped matmul that runs anywhere in bounded memory."""
