"""The training losses: next-token cross entropy, multi-token prediction, router load balancing and z-loss.

Cross entropy is computed in fp32 by the model's LM-head loss (the registry's "loss" family; by default over chunks
of `chunk_tokens` tokens, so at a 150K vocabulary the step holds C * V fp32 values instead of B * T * V). For
training, each head's terms are weights of one objective whose gradient the head forms beside its logits.

Targets and masks. Position t of the main head predicts x_{t+1}; position t of MTP depth d predicts x_{t+1+d}.
A position counts only if it is a real token (segment id != 0) and its target lies in the same packed document
(segment_ids[t] == segment_ids[t+1+d]): nothing is learned across a document boundary or past the row's end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shifted_targets(input_ids: jax.Array, segment_ids: jax.Array, shift: int) -> tuple[jax.Array, jax.Array]:
    """(targets x_{t+shift} [B, T], mask [B, T] float32) with the document-boundary rule above."""
    targets = jnp.pad(input_ids[:, shift:], ((0, 0), (0, shift)))
    ahead = jnp.pad(segment_ids[:, shift:], ((0, 0), (0, shift)))  # segment 0 past the row's end
    mask = (segment_ids != 0) & (segment_ids == ahead)
    return targets, mask.astype(jnp.float32)


def token_counts(segment_ids: jax.Array, mtp_depths: int) -> dict[str, jax.Array]:
    """Predicted-token counts of a whole (accumulated) batch: the denominators of the mean losses."""
    counts = {"main": shifted_targets(segment_ids, segment_ids, 1)[1].sum()}
    for d in range(1, mtp_depths + 1):
        counts[f"mtp{d}"] = shifted_targets(segment_ids, segment_ids, 1 + d)[1].sum()
    return {k: jnp.maximum(v, 1.0) for k, v in counts.items()}


def per_token_losses(model, batch: dict[str, jax.Array], chunk_tokens: int, weigh=None):
    """The forward pass and every per-token loss, unreduced: what evaluation sums and the packing test compares.

    weigh(depth, mask) -> (ce_weight, z_weight) [B, T] (depth 0: the main head): with it, each head computes the
    training objective  sum(ce * ce_weight + lse**2 * z_weight)  and its gradient in one pass
    (Qwen3NextForCausalLM.objective), and the per-token losses are values only. Without it they are differentiable.

    Returns (main: (ce, lse, mask) [B, T], mtp: list over depths of (ce, mask), router statistics (interface.Aux)
    of the main and MTP MoE layers, the objective summed over the heads (None without weigh)).
    """
    ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
    objective = []

    def head(hidden, depth):
        targets, mask = shifted_targets(ids, seg, 1 + depth)
        if weigh is None:
            return (*model.cross_entropy(hidden, targets, chunk_tokens), mask)
        total, ce, lse = model.objective(hidden, targets, *weigh(depth, mask), chunk_tokens)
        objective.append(total)
        return ce, lse, mask

    hidden, aux = model.hidden_states(ids, seg, pos)
    main = head(hidden, 0)
    mtp = []
    for d, (hidden_d, aux_d) in enumerate(model.mtp_hidden_states(hidden, ids, seg, pos), start=1):
        ce_d, _, mask_d = head(hidden_d, d)
        mtp.append((ce_d, mask_d))
        aux = aux.combine(aux_d)
    return main, mtp, aux, sum(objective) if weigh else None


def loss_and_metrics(model, batch, counts: dict[str, jax.Array], *, mtp_weight: float, aux_coef: float,
                     z_loss_coef: float, chunk_tokens: int, n_micro: int) -> tuple[jax.Array, dict]:
    """This micro-batch's share of the batch loss: token sums are divided by the whole batch's counts and the
    router loss by the number of micro-batches, so summing over micro-batches gives the full batch's loss.

    The heads' terms (cross entropy, z-loss, the MTP mean over depths) enter as per-token weights of the heads'
    objective, so that their gradient is formed with the logits (per_token_losses)."""
    depths = len(counts) - 1

    def weigh(depth, mask):
        if depth == 0:
            return mask / counts["main"], z_loss_coef * mask / counts["main"]
        return mtp_weight / depths * mask / counts[f"mtp{depth}"], jnp.zeros_like(mask)

    (ce, lse, mask), mtp, aux, objective = per_token_losses(model, batch, chunk_tokens, weigh)
    metrics = {"ce": jnp.sum(ce * mask) / counts["main"], "aux": aux.load_balancing / n_micro,
               "expert_load_max": aux.load_max_over_mean / n_micro, "dropped": aux.dropped}
    if z_loss_coef:
        metrics["z_loss"] = jnp.sum(jnp.square(lse) * mask) / counts["main"]
    if mtp:
        metrics["mtp"] = sum(jnp.sum(ce_d * mask_d) / counts[f"mtp{d}"]
                             for d, (ce_d, mask_d) in enumerate(mtp, start=1)) / len(mtp)
    metrics["loss"] = loss = objective + aux_coef * metrics["aux"]
    return loss, metrics
