"""Multi-token prediction (as the checkpoint names it and vLLM / SGLang run it).

Depth d (1-based) at position t combines the embedding of token x_{t+d} with the hidden state h_t of the depth
before (depth 0 is the main model's final hidden state, after model.norm):
  h'_t = fc(cat[pre_fc_norm_embedding(embed(x_{t+d})), pre_fc_norm_hidden(h_t)]) -> layers[d-1] -> norm,
and the shared lm_head on the result predicts x_{t+1+d}. Positions t + d past the end read token 0; the loss masks
them, and any t whose target lies in another packed document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax.config import FULL, Qwen3NextConfig
from qwen3next_jax.decoder import DecoderLayer
from qwen3next_jax.execution import Execution
from qwen3next_jax.interface import Aux, Context
from qwen3next_jax.layers import Embed, Linear
from qwen3next_jax.norms import RMSNorm
from qwen3next_kernels.registry import Platform


class MultiTokenPrediction(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, execution: Execution, platform: Platform):
        D, eps, param_dtype = cfg.hidden_size, cfg.rms_norm_eps, execution.params
        self.fc = Linear(2 * D, D, ("mtp_concat", "embed"), rngs=rngs, dtype=execution.dtype,
                         param_dtype=param_dtype, std=cfg.initializer_range)
        self.pre_fc_norm_embedding = RMSNorm(D, eps, param_dtype=param_dtype)
        self.pre_fc_norm_hidden = RMSNorm(D, eps, param_dtype=param_dtype)
        # Each MTP layer is a full-attention decoder layer with its own MoE (a dense MLP if the model has no experts).
        self.layers = nnx.List([
            DecoderLayer(cfg, FULL, cfg.num_experts > 0, rngs=rngs, execution=execution, platform=platform)
            for _ in range(cfg.mtp_num_hidden_layers)])
        self.norm = RMSNorm(D, eps, param_dtype=param_dtype)

    def __call__(self, hidden, embed: Embed, input_ids, ctx: Context) -> list[tuple[jax.Array, Aux]]:
        """hidden [B, T, D] after model.norm -> [(hidden_d [B, T, D] after mtp.norm, aux_d) for d = 1..depth]."""
        outputs = []
        for d, layer in enumerate(self.layers, start=1):
            ahead = jnp.pad(input_ids[:, d:], ((0, 0), (0, d)))            # x_{t+d}, token 0 past the end
            h = self.fc(jnp.concatenate([self.pre_fc_norm_embedding(embed(ahead)),
                                         self.pre_fc_norm_hidden(hidden)], axis=-1))
            h, aux = layer(h, ctx)
            hidden = self.norm(h)
            outputs.append((hidden, aux))
        return outputs
