"""Feed-forward blocks: the dense SwiGLU MLP and the ultra-sparse mixture of experts with a gated shared expert.

Routing: softmax over all experts in fp32, top-k, optional renormalisation of the k weights, cast to the activation
dtype. Dispatch is dropless and sort-based: the N*k (token, expert) assignments are sorted by expert, so each
expert's rows are contiguous, and the experts' SwiGLU MLP (the registry's "moe" family) runs every expert at once
on the sorted rows. Dispatch and combine are gathers whose transposes are gathers too (by the inverse permutation):
no scatter-add in the forward or the backward.

Expert parallelism. Under a context mesh (sharding.in_mesh) whose `expert` axis has n > 1 devices, each device
holds E/n experts, and the dispatch runs per device (jax.shard_map): the tokens are split over the batch axes (data,
fsdp, expert), each device sorts its own tokens' assignments, sends each expert's rows to the device holding it
(the registry's "exchange" family), runs its experts on what it received and sends the results back. Expert weights
enter split over `expert` (FSDP gathers their embed dimension at the edge, as for every weight); the routing, the
router statistics and the weighted sum of each token's k results stay outside, on the whole micro-batch, so the
load-balancing loss is that of the global batch. docs/moe.md gives the buffer sizes and the capacity rule.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import ROUTING, Execution
from qwen3next_jax.interface import Aux, Context
from qwen3next_jax.layers import Linear, param
from qwen3next_jax.sharding import logical_to_spec
from qwen3next_kernels.moe.permute import permute
from qwen3next_kernels.registry import FAMILIES, Platform


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)): a dense feed-forward block, and the MoE's shared expert."""

    def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, dtype, param_dtype, std: float):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=std)
        self.gate_proj = Linear(hidden, intermediate, ("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden, intermediate, ("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, ctx: Context | None = None) -> tuple[jax.Array, Aux]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)), Aux.zero()


def moe_site(cfg: Qwen3NextConfig, dtype) -> dict:
    return dict(experts=cfg.num_experts, hidden=cfg.hidden_size, width=cfg.moe_intermediate_size,
                dtype=jnp.dtype(dtype).name)


def exchange_site(cfg: Qwen3NextConfig, dtype) -> dict:
    return dict(experts=cfg.num_experts, hidden=cfg.hidden_size, dtype=jnp.dtype(dtype).name)


# The logical axes of the expert weights as each device computes with them: split over experts (and over the
# tensor axis along the width), the embed dimension whole (FSDP gathers it at the shard_map's edge).
EXPERT_WEIGHT_AXES = (("experts", None, "expert_mlp"), ("experts", None, "expert_mlp"), ("experts", "expert_mlp", None))
TOKENS = ("batch", None)


class Experts(nnx.Module):
    """E SwiGLU experts stored stacked: gate_proj, up_proj [E, D, I]; down_proj [E, I, D]."""

    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, execution: Execution, platform: Platform):
        E, D, I, std = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.initializer_range
        self.gate_proj = param(rngs, (E, D, I), execution.params, ("experts", "embed", "expert_mlp"), std=std)
        self.up_proj = param(rngs, (E, D, I), execution.params, ("experts", "embed", "expert_mlp"), std=std)
        self.down_proj = param(rngs, (E, I, D), execution.params, ("experts", "expert_mlp", "embed"), std=std)
        self.dtype = execution.dtype
        self.kernels = {"moe": execution.resolve("moe", moe_site(cfg, execution.dtype), platform)}

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.gate_proj[...], self.up_proj[...], self.down_proj[...]

    def __call__(self, x_sorted: jax.Array, group_sizes: jax.Array, weights=None) -> jax.Array:
        """x_sorted [M, D], rows grouped by expert; group_sizes [G] rows per expert -> [M, D]. weights: (gate, up,
        down) of these G experts (one device's under expert parallelism), the module's own by default. What rows past
        sum(group_sizes) come out as depends on the implementation (the family's contract, moe/reference.py)."""
        # Cast here, not before: under a mesh the weights' gradient is summed over the batch shards in their dtype.
        gate, up, down = (w.astype(self.dtype) for w in (weights or self.weights()))
        expert_mlp = FAMILIES["moe"].function(self.kernels["moe"])
        return expert_mlp(x_sorted, gate, up, down, group_sizes)


# ------------------------------------------------------------------------------------------- the permutations

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_to_experts(x, order, inverse, k):
    """x [N, D] -> [N*k, D] in expert order: row m is token order[m] // k. Its transpose gathers each token's k
    rows back (by the inverse permutation) and sums them, instead of a k-way contended scatter-add."""
    return x[order // k]


def _gather_to_experts_fwd(x, order, inverse, k):
    return x[order // k], inverse


def _gather_to_experts_bwd(k, inverse, g):
    N = inverse.shape[0] // k
    dx = g[inverse].reshape(N, k, g.shape[-1]).astype(jnp.float32).sum(1)
    return dx.astype(g.dtype), None, None


gather_to_experts.defvjp(_gather_to_experts_fwd, _gather_to_experts_bwd)


@jax.custom_vjp
def combine_from_experts(y_sorted, weights, order, inverse):
    """out[n] = sum_j weights[n, j] y_sorted[inverse[n k + j]]: each token's k expert outputs, weighted.
    y_sorted [N*k, D] in expert order, weights [N, k]. The backward gathers too: d y_sorted[m] is token
    order[m] // k's output gradient times its weight (one pass), d weights a gathered dot."""
    return _combine(y_sorted, weights, inverse)


def _combine(y_sorted, weights, inverse):
    N, k = weights.shape
    y = y_sorted[inverse].reshape(N, k, y_sorted.shape[-1])                  # [N, k, D]
    return jnp.einsum("nkd,nk->nd", y, weights)


def _combine_fwd(y_sorted, weights, order, inverse):
    return _combine(y_sorted, weights, inverse), (y_sorted, weights, order, inverse)


def _combine_bwd(res, dout):
    y_sorted, weights, order, inverse = res
    N, k = weights.shape
    d_y_sorted = (weights.reshape(-1)[order][:, None] * dout[order // k]).astype(y_sorted.dtype)
    y = y_sorted[inverse].reshape(N, k, y_sorted.shape[-1])
    d_weights = jnp.einsum("nkd,nd->nk", y, dout, preferred_element_type=jnp.float32).astype(weights.dtype)
    return d_y_sorted, d_weights, None, None


combine_from_experts.defvjp(_combine_fwd, _combine_bwd)


def sort_by_expert(top_idx: jax.Array, num_experts: int):
    """top_idx [N, k] (any shape of keys in [0, num_experts)) -> (order, inverse [N*k], group_sizes [E] int32):
    order[m] is the flat (token * k + slot) of sorted row m, stable within an expert; inverse[a] is the sorted row
    of flat assignment a."""
    flat = top_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32),
                                                  unique_indices=True)
    group_sizes = jnp.sum(flat[:, None] == jnp.arange(num_experts, dtype=flat.dtype), axis=0, dtype=jnp.int32)
    return order, inverse, group_sizes


def dispatch(x: jax.Array, top_idx: jax.Array, top_w: jax.Array, num_experts: int, experts):
    """x [N, D], top_idx and top_w [N, k] -> (sum_i top_w[n, i] * expert top_idx[n, i]'s output for token n [N, D],
    extra). experts(x_sorted [N*k, D] grouped by expert, group_sizes [E]) -> (y_sorted [N*k, D], extra)."""
    N, k = top_idx.shape
    order, inverse, group_sizes = checkpoint_name(sort_by_expert(top_idx, num_experts), ROUTING)
    y_sorted, extra = experts(gather_to_experts(x, order, inverse, k), group_sizes)
    return combine_from_experts(y_sorted, top_w, order, inverse), extra


def exchange_capacity(tokens: int, top_k: int, devices: int, local_experts: int, factor: float) -> int:
    """The rows one device may send to one device of the expert axis. Dropless (factor 0): all that can go there,
    tokens * min(k, L): a token's k experts are distinct, so at most min(k, L) of them are among one device's L.
    Otherwise a factor of the balanced share tokens * k / devices, if that is less."""
    dropless = tokens * min(top_k, local_experts)
    return dropless if factor == 0 else max(1, min(dropless, math.ceil(factor * tokens * top_k / devices)))


# ------------------------------------------------------------------------------------------------- statistics

def router_stats(probs: jax.Array, top_idx: jax.Array, token_mask: jax.Array, dropped: jax.Array,
                 total=lambda x: x) -> Aux:
    """Aux over the real tokens: load balancing E * sum_e f_e P_e (f_e the share of top-k assignments to e, P_e the
    mean router probability; 1 when balanced), the largest expert load over the mean, and the assignments a
    capacity dropped.

    probs [N, E] fp32; top_idx [N, k]; token_mask [N]. `total` sums a statistic over every shard of the batch
    (a psum under shard_map), so that the statistics are those of the whole batch."""
    E, k = probs.shape[-1], top_idx.shape[-1]
    mask = token_mask.astype(jnp.float32)
    counts = total(jnp.einsum("nke,n->e", jax.nn.one_hot(top_idx, E, dtype=jnp.float32), mask))
    prob_sums = total(jnp.einsum("ne,n->e", probs, mask))
    n = jnp.maximum(total(mask.sum()), 1.0)
    f, P = counts / (n * k), prob_sums / n
    mean_load = n * k / E
    return Aux(E * jnp.sum(f * P), jnp.max(counts) / mean_load, total(dropped.astype(jnp.float32)))


class SparseMoE(nnx.Module):
    def __init__(self, cfg: Qwen3NextConfig, *, rngs: nnx.Rngs, execution: Execution, platform: Platform):
        D, std = cfg.hidden_size, cfg.initializer_range
        kw = dict(rngs=rngs, dtype=execution.dtype, param_dtype=execution.params, std=std)
        self.gate = Linear(D, cfg.num_experts, ("embed", None), **kw)
        self.experts = Experts(cfg, rngs=rngs, execution=execution, platform=platform)
        self.shared_expert = MLP(D, cfg.shared_expert_intermediate_size, **kw)
        self.shared_expert_gate = Linear(D, 1, ("embed", None), **kw)
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.dtype, self.capacity_factor = execution.dtype, execution.moe_capacity_factor
        self.kernels = {"exchange": execution.resolve("exchange", exchange_site(cfg, execution.dtype), platform)}

    def route(self, x2: jax.Array, gate: Linear):
        """x2 [N, D] -> (router probabilities [N, E] fp32, top-k weights [N, k] in the compute dtype, top-k
        experts [N, k])."""
        probs = checkpoint_name(jax.nn.softmax(gate(x2).astype(jnp.float32), axis=-1), ROUTING)
        # The choice is made without a gradient and the weights gathered by it (top_k's own derivative, so the same
        # values and gradients): remat then keeps the choice (ROUTING) instead of recomputing top-k for the gather.
        top_idx = checkpoint_name(jax.lax.top_k(jax.lax.stop_gradient(probs), self.top_k)[1], ROUTING)
        top_w = jnp.take_along_axis(probs, top_idx, axis=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(-1, keepdims=True)
        return probs, top_w.astype(self.dtype), top_idx

    def routed(self, x2: jax.Array, token_mask: jax.Array, gate: Linear, experts, total=lambda x: x):
        """The routed experts' part for tokens x2 [N, D] -> ([N, D], router statistics), through
        experts(x_sorted, group_sizes) -> (y_sorted, dropped assignments) (see dispatch)."""
        probs, top_w, top_idx = self.route(x2, gate)
        y, dropped = dispatch(x2, top_idx, top_w, self.num_experts, experts)
        return y, router_stats(probs, top_idx, token_mask, dropped, total)

    def __call__(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, Aux]:
        """x [B, T, D] -> (y [B, T, D], router statistics)."""
        B, T, D = x.shape
        x2, mask = x.reshape(B * T, D), ctx.token_mask.reshape(B * T)
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.shape.get("expert", 1) == 1:
            every_expert = lambda x_sorted, sizes: (self.experts(x_sorted, sizes), jnp.zeros((), jnp.int32))
            routed, aux = self.routed(x2, mask, self.gate, every_expert)
        else:
            routed, aux = self.expert_parallel(x2, mask, mesh)
        shared = self.shared_expert(x2)[0] * jax.nn.sigmoid(self.shared_expert_gate(x2))
        return (routed + shared).reshape(B, T, D), aux

    def expert_parallel(self, x2: jax.Array, token_mask: jax.Array, mesh) -> tuple[jax.Array, Aux]:
        """routed() per device, with the experts split over the mesh's expert axis (module docstring)."""
        n, E, k = mesh.shape["expert"], self.num_experts, self.top_k
        if E % n:
            raise ValueError(f"expert parallelism over mesh expert={n} needs num_experts ({E}) divisible by {n}")
        L = E // n
        weights = self.experts.weights()
        weight_specs = tuple(logical_to_spec(axes, w.shape, mesh) for axes, w in zip(EXPERT_WEIGHT_AXES, weights))
        token_spec = logical_to_spec(TOKENS, x2.shape, mesh)
        batch_axes = token_spec[0] if isinstance(token_spec[0], tuple) else (token_spec[0],)
        if "expert" not in batch_axes:
            sizes = {a: mesh.shape[a] for a in ("data", "fsdp", "expert")}
            raise ValueError(f"expert parallelism splits a micro-batch's {x2.shape[0]} tokens (batch x seq_len) over "
                             f"the batch axes {sizes}: make it a multiple of {math.prod(sizes.values())}")
        width_axis = weight_specs[0][2]  # the mesh axis splitting each expert's width (tensor parallelism), if any
        exchange = FAMILIES["exchange"].function(self.kernels["exchange"])
        gate_def, gate_state = nnx.split(self.gate)  # the router, whole on every device

        def per_device(x, mask, gate_state, *weights):  # this device's tokens x [T, D], mask [T]; its L experts
            C = exchange_capacity(x.shape[0], k, n, L, self.capacity_factor)

            def over_the_axis(x_sorted, group_sizes):  # [T*k, D] in expert order; group_sizes [E]
                send_sizes = group_sizes.reshape(n, L).sum(1)
                received, back = exchange(x_sorted, send_sizes, capacity=C, axis_name="expert", axis_size=n)
                # received [n*C, D]: from each source, its rows for this device's experts in expert order, cut at C.
                from_source = jax.lax.all_to_all(group_sizes.reshape(n, L), "expert", 0, 0, tiled=True)  # [n, L]
                ends = jnp.minimum(jnp.cumsum(from_source, axis=1), C)
                slot_expert = jnp.sum(jnp.arange(C)[None, :, None] >= ends[:, None, :], axis=2)  # [n, C]; L: empty
                order, inverse, local_sizes = sort_by_expert(slot_expert, L + 1)  # empty slots last
                y = self.experts(permute(received, order, inverse), local_sizes[:L], weights)
                # Rows past the real ones belong to no expert: whatever the implementation left there goes nowhere.
                y = jnp.where(jnp.arange(y.shape[0])[:, None] < jnp.sum(local_sizes[:L]), y, jnp.zeros((), y.dtype))
                if width_axis is not None:
                    y = jax.lax.psum(y, width_axis)
                return back(permute(y, inverse, order)), jnp.sum(send_sizes - jnp.minimum(send_sizes, C))

            return self.routed(x, mask, nnx.merge(gate_def, gate_state), over_the_axis,
                               total=lambda v: jax.lax.psum(v, batch_axes))

        # check_vma=False: the kernels are not annotated for shard_map's varying-value types. The statistics leave
        # replicated (P()): they were summed over the batch axes, and the tensor axis computes them alike.
        in_specs = (token_spec, P(token_spec[0]), jax.tree.map(lambda _: P(), gate_state), *weight_specs)
        return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=(token_spec, P()),
                             check_vma=False)(x2, token_mask, gate_state, *weights)
