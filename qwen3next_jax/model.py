"""Qwen3NextForCausalLM: embedding, the scanned decoder stack, final norm, LM head and the MTP module.

The parameter tree mirrors the Hugging Face checkpoint (`model.embed_tokens`, `model.layers`, `model.norm`,
`lm_head`, `mtp`), so the name table in `hf/names.py` is a table of small differences, not a translation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.decoder import DecoderStack
from qwen3next_jax.execution import Execution
from qwen3next_jax.interface import Aux, Context
from qwen3next_jax.layers import Embed, Linear
from qwen3next_jax.mtp import MultiTokenPrediction
from qwen3next_jax.norms import RMSNorm
from qwen3next_jax.rope import rope_tables
from qwen3next_jax.sharding import SUMMED, per_shard
from qwen3next_kernels.registry import FAMILIES, Platform


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where the segment id changes. [B, T] -> [B, T]."""
    T = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
    is_start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
    return idx - start


def loss_site(cfg: Qwen3NextConfig, dtype) -> dict:
    return dict(hidden=cfg.hidden_size, vocab=cfg.vocab_size, dtype=jnp.dtype(dtype).name)


class Qwen3NextModel(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, execution: Execution, platform: Platform):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=execution.dtype,
                                  param_dtype=execution.params, std=cfg.initializer_range)
        self.layers = DecoderStack(cfg, rngs=rngs, execution=execution, platform=platform)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=execution.params)


class Qwen3NextForCausalLM(nnx.Module):
    """Qwen3-Next with its LM head and multi-token prediction.

    execution: dtypes, rematerialisation and kernel choices (qwen3next_jax.execution), resolved for `platform`
    (default: the running one) as the model is built. segment_ids (int, 0 = padding) mark packed documents,
    each one run of its row; positions default to 0.. within each document.
    """

    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, execution: Execution = Execution(),
                 platform: Platform | None = None):
        platform = platform or Platform.current()
        self.config = cfg
        self.dtype = execution.dtype
        self.model = Qwen3NextModel(cfg, rngs=rngs, execution=execution, platform=platform)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, dtype=execution.dtype,
            param_dtype=execution.params, std=cfg.initializer_range)
        self.mtp = None if cfg.mtp_num_hidden_layers == 0 else MultiTokenPrediction(
            cfg, rngs=rngs, execution=execution, platform=platform)
        self.kernels = {"loss": execution.resolve("loss", loss_site(cfg, execution.dtype), platform)}

    def _context(self, input_ids, segment_ids, positions) -> Context:
        if positions is None:
            positions = (positions_from_segments(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape))
        token_mask = jnp.ones(input_ids.shape, bool) if segment_ids is None else segment_ids != 0
        return Context(rope_tables(self.config, positions, self.dtype), segment_ids, token_mask)

    def hidden_states(self, input_ids, segment_ids=None, positions=None) -> tuple[jax.Array, Aux]:
        """input_ids [B, T] -> (final hidden state after model.norm [B, T, D], router statistics of the stack)."""
        ctx = self._context(input_ids, segment_ids, positions)
        with jax.named_scope("embed"):
            x = self.model.embed_tokens(input_ids)
        x, aux = self.model.layers(x, ctx)
        return self.model.norm(x), aux

    def lm_head_weight(self) -> jax.Array:
        """[D, V] in the compute dtype: the LM head, or the embedding transposed when they are tied."""
        w = self.model.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return w.astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return jnp.dot(hidden.astype(self.dtype), self.lm_head_weight())

    def cross_entropy(self, hidden: jax.Array, targets: jax.Array, chunk_tokens: int = 2048):
        """Per-token (cross entropy, logsumexp) of the LM head on hidden [B, T, D] against targets [B, T], both
        fp32 [B, T] and differentiable, through the registry's "loss" family (chunk_tokens bounds the chunked form's
        fp32 logits on each device). Evaluation's form: training takes `objective`, whose gradient costs less."""
        return self._head_loss(chunk_tokens, None)(hidden.astype(self.dtype), self.lm_head_weight(), targets, None)

    def objective(self, hidden: jax.Array, targets: jax.Array, ce_weight: jax.Array, z_weight: jax.Array,
                  chunk_tokens: int = 2048):
        """The LM head's training objective  sum(ce * ce_weight + lse**2 * z_weight)  (weights fp32 [B, T]: the
        masked mean's and the z-loss's), differentiable, and the per-token (ce, lse) as values (not differentiable).

        The loss family computes the objective's gradient in its forward pass, while each chunk's logits are live
        (kernels_pallas/cross_entropy/chunked.py): three products of [tokens, D] x [D, V] instead of four."""
        head = self._head_loss(chunk_tokens, (("batch", "seq"), ("batch", "seq")))

        def forward(hidden, w, ce_weight, z_weight):
            ce, lse, grads = head(hidden, w, targets, (ce_weight, z_weight))
            return (jnp.sum(ce * ce_weight + lse ** 2 * z_weight), ce, lse), (grads, ce, lse)

        weighted = jax.custom_vjp(lambda *args: forward(*args)[0])

        def backward(residuals, cotangents):
            (d_hidden, d_w), ce, lse = residuals
            g = cotangents[0]  # (ce, lse) leave through stop_gradient below: their cotangents are zero
            return (g * d_hidden).astype(d_hidden.dtype), (g * d_w).astype(self.dtype), g * ce, g * lse ** 2

        weighted.defvjp(forward, backward)
        total, ce, lse = weighted(hidden.astype(self.dtype), self.lm_head_weight(), ce_weight.astype(jnp.float32),
                                  z_weight.astype(jnp.float32))
        return total, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(lse)

    def _head_loss(self, chunk_tokens: int, weight_axes):
        """The loss family's function, run per shard of the batch and the sequence with the head's weight whole on
        every device (gathered like any FSDP weight): the chunked form flattens the tokens into chunks, and XLA,
        partitioning that, had every device form the whole batch's logits in the forward pass. With a tensor axis
        each of its devices computes the same rows over the whole vocabulary (the family does not split the
        vocabulary). The weight's gradient is summed over the devices that split the tokens."""
        fn = functools.partial(FAMILIES["loss"].function(self.kernels["loss"]), chunk_tokens=chunk_tokens)
        tokens = ("batch", "seq")
        out_axes = (tokens, tokens) if weight_axes is None else (tokens, tokens, (tokens + (None,), SUMMED))
        sharded = per_shard(fn, in_axes=(tokens + (None,), (None, None), tokens, weight_axes), out_axes=out_axes)

        def head(*args):
            with jax.named_scope("lm_head_loss"):
                return sharded(*args)
        return head

    def __call__(self, input_ids, segment_ids=None, positions=None) -> jax.Array:
        """input_ids [B, T] -> logits [B, T, V]."""
        return self.logits(self.hidden_states(input_ids, segment_ids, positions)[0])

    def mtp_hidden_states(self, hidden, input_ids, segment_ids=None, positions=None) -> list[tuple[jax.Array, Aux]]:
        """[(hidden_d, aux_d) for each MTP depth d]; position t of depth d predicts x_{t+1+d}."""
        if self.mtp is None:
            return []
        ctx = self._context(input_ids, segment_ids, positions)
        with jax.named_scope("mtp"):
            return self.mtp(hidden, self.model.embed_tokens, input_ids, ctx)
