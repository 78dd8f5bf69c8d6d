"""A memory model of the trainer: bytes per device of a config on a mesh, before anything is compiled.

`predict_memory(cfg, mesh_shape)` returns, per device:
- `params`, `mu`, `nu` (the train state): exact, from the abstract state's shapes and dtypes and the shardings the
  trainer gives them (`state.state_shardings` over an abstract mesh of that shape);
- `grads` (like the parameters, in their dtype) and `updates` (one more parameter-sized tree, the optimizer's
  output before it is added): exact sizes, though XLA may overlap or fuse them away;
- `activations`: an estimate for one micro-batch at `execution.remat` (the terms are in `activation_bytes`);
- `total`: their sum. XLA's own accounting of a compiled step (`compiled.memory_analysis()`) puts the state in its
  arguments and the rest in its temporaries; `tests/test_multi_gpu.py` compares the two on fake CPU devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from qwen3next_jax import Qwen3NextForCausalLM
from qwen3next_jax import sharding as shd
from qwen3next_jax.config import FULL
from qwen3next_train.config import TrainConfig
from qwen3next_train.optim import make_optimizer
from qwen3next_train.state import state_shardings


def _per_device(abstract, shardings) -> int:
    return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
               for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


def activation_bytes(cfg: TrainConfig, mesh_shape: dict[str, int]) -> dict[str, float]:
    """Activation bytes per device for one micro-batch: what the backward pass keeps of every layer (`saved`), one
    layer's working set while it runs (`layer`: the largest of its kinds) and the loss's (`loss`)."""
    m, x = cfg.model, cfg.execution
    c = np.dtype(x.compute_dtype).itemsize
    batch_shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1) * mesh_shape.get("expert", 1)
    N = cfg.data.batch_size // cfg.optim.grad_accum_steps // batch_shards * cfg.data.seq_len \
        // mesh_shape.get("context", 1)  # tokens per device
    D, k, E, I = m.hidden_size, m.num_experts_per_tok, m.num_experts, m.moe_intermediate_size
    n = mesh_shape.get("expert", 1)
    # Rows the experts run per device: N*k on one device; with an expert axis the dropless receive buffer n*C,
    # C = N*min(k, E/n) (qwen3next_jax.moe.exchange_capacity); a capacity factor shrinks it.
    rows = N * k if n == 1 else n * N * min(k, E // n)
    if n > 1 and x.moe_capacity_factor:
        rows = n * min(N * min(k, E // n), math.ceil(x.moe_capacity_factor * N * k / n))
    moe_width = 2 * D + 3 * I  # rows in, gate and up, their product, rows out
    gdn_width = (2 * m.linear_num_key_heads * m.linear_key_head_dim + 2 * m.linear_num_value_heads
                 * m.linear_value_head_dim) * 2 + 2 * m.linear_num_value_heads + D  # projections, conv out, out_proj
    attn_width = (2 * m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim + m.num_attention_heads \
        * m.head_dim + D
    shared = 2 * m.shared_expert_intermediate_size + D + 1
    moe_layer = rows * moe_width * c + N * k * D * c + 3 * N * E * 4 + N * shared * c  # routed, sorted, router fp32
    mixer = {FULL: N * attn_width * c, "linear_attention": N * gdn_width * c}
    kinds = set(m.layer_types) | ({FULL} if m.mtp_num_hidden_layers else set())
    layer = 2 * max(mixer[t] for t in kinds) + 2 * moe_layer  # forward values and their cotangents
    n_layers = m.num_hidden_layers + m.mtp_num_hidden_layers
    saved_per_layer = {"full": N * D * c,
                       "dots": N * D * c + N * c * (max(mixer[t] for t in kinds) / (N * c) + shared + E),
                       "none": layer / 2}[x.remat]
    chunk = min(cfg.loss.chunk_tokens, N)
    loss = (1 + m.mtp_num_hidden_layers) * (2 * chunk * m.vocab_size * 4 + N * D * 4)  # fp32 logits and grads
    return {"saved": n_layers * saved_per_layer, "layer": layer, "loss": loss}


def predict_memory(cfg: TrainConfig, mesh_shape: dict[str, int]) -> dict[str, float]:
    """Bytes per device (module docstring) of training `cfg` on a mesh of `mesh_shape` ({axis: size})."""
    sizes = tuple(mesh_shape.get(a, 1) for a in shd.MESH_AXES)
    mesh = jax.sharding.AbstractMesh(sizes, shd.MESH_AXES)
    model = nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg.model, rngs=nnx.Rngs(0), execution=cfg.execution))
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    shardings = state_shardings(shd.state_shardings(params, mesh), tx, params, mesh)
    opt = jax.eval_shape(tx.init, params)
    adam = opt.inner_state[1][0]  # apply_if_finite(chain(clip, adamw)): adamw's scale_by_adam state
    adam_sh = shardings.opt_state.inner_state[1][0]
    out = {"params": _per_device(params, shardings.params),
           "mu": _per_device(adam.mu, adam_sh.mu), "nu": _per_device(adam.nu, adam_sh.nu)}
    out["grads"] = out["updates"] = out["params"]
    acts = activation_bytes(cfg, mesh_shape)
    out["activations"] = sum(acts.values())
    out["total"] = sum(out.values())
    return out


def with_layers(cfg: TrainConfig, layers: int) -> TrainConfig:
    """cfg with its model cut to the first `layers` decoder layers (their kinds as in the full model)."""
    return dataclasses.replace(cfg, model=cfg.model.replace(num_hidden_layers=layers,
                                                            layer_types=cfg.model.layer_types[:layers]))
