"""Exact packing: a packed batch computes, token for token, what its documents compute run one by one.

The documents come through the real pipeline (grain, ConcatThenSplit packing). Each packed piece is then run alone
at the start of its own row (the rest of the row is padding, which causal attention and the causal recurrence never
let it see), and the per-token next-token and MTP losses and the gradients of their sum must match the packed run:
no attention across segments, and the Gated DeltaNet state and conv window restart at every document. The same
batch with its segments ignored gives other losses, so the comparison can fail.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3next_jax import Qwen3NextForCausalLM
from qwen3next_train import losses
from qwen3next_train.config import load_config
from qwen3next_train.data import ByteTokenizer, Documents, packed_batches

TEXTS = ["def f(x):\n    return x", "import os", "class A:\n    pass\n", "print(1 + 2)", "a = [i for i in b]",
         "# a comment", "while True:\n    break", "x = {'k': 1}"]


def _packed_batch(tmp_path, seq_len, rows):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    ds = packed_batches(Documents([str(path)], "text"), ByteTokenizer(), seq_len=seq_len, batch_size=rows, seed=None)
    return {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}


def _one_by_one(packed):
    """Every (row, segment) piece of the packed batch at the start of its own padded row."""
    ids, seg = np.asarray(packed["input_ids"]), np.asarray(packed["segment_ids"])
    T = ids.shape[1]
    rows, where = [], []
    for r in range(ids.shape[0]):
        for s in np.unique(seg[r][seg[r] > 0]):
            cols = np.flatnonzero(seg[r] == s)
            rows.append(np.pad(ids[r, cols], (0, T - len(cols))))
            where.append((r, cols))
    lengths = [len(c) for _, c in where]
    seg1 = np.stack([np.pad(np.ones(L, np.int32), (0, T - L)) for L in lengths])
    pos1 = np.stack([np.pad(np.arange(L, dtype=np.int32), (0, T - L)) for L in lengths])
    return {"input_ids": jnp.asarray(np.stack(rows)), "segment_ids": jnp.asarray(seg1),
            "positions": jnp.asarray(pos1)}, where


def test_packed_equals_one_by_one(tmp_path):
    cfg = load_config("configs/smoke.yaml")
    packed = _packed_batch(tmp_path, cfg.data.seq_len, rows=2)
    seg = np.asarray(packed["segment_ids"])
    assert (seg > 0).all() and seg.max() >= 3, "the rows should hold several documents"
    # positions restart at 0 with each piece
    positions = np.asarray(packed["positions"])
    for r in range(seg.shape[0]):
        for s in np.unique(seg[r]):
            np.testing.assert_array_equal(positions[r][seg[r] == s], np.arange((seg[r] == s).sum()))
    single, where = _one_by_one(packed)

    model = Qwen3NextForCausalLM(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def summed(p, batch):
        """The sum of every per-token loss (its gradient is additive over documents), as the training objective the
        heads differentiate themselves, and the per-token losses."""
        weigh = lambda depth, mask: (mask, jnp.zeros_like(mask))
        (ce, _, mask), mtp, _, total = losses.per_token_losses(nnx.merge(graphdef, p), batch, 48, weigh)
        return total, [(ce, mask)] + mtp

    grad_fn = jax.jit(jax.grad(summed, has_aux=True))
    g_packed, got = grad_fn(params, packed)
    g_single, want = grad_fn(params, single)
    for (ce_p, mask_p), (ce_1, mask_1) in zip(got, want):
        ce_p, mask_p, ce_1, mask_1 = map(np.asarray, (ce_p, mask_p, ce_1, mask_1))
        for i, (r, cols) in enumerate(where):
            np.testing.assert_array_equal(mask_p[r, cols], mask_1[i, :len(cols)])
            valid = mask_1[i, :len(cols)] > 0
            np.testing.assert_allclose(ce_p[r, cols][valid], ce_1[i, :len(cols)][valid], rtol=2e-5, atol=2e-5)
    assert sum(float(m.sum()) for _, m in got) > 0

    # The comparison can fail: with the segments ignored (each row one document, positions running on), a token
    # after its row's first piece attends to and carries state from the pieces before it, and its loss moves away
    # from the one-by-one loss.
    T = seg.shape[1]
    ignored = dict(packed, segment_ids=jnp.ones_like(packed["segment_ids"]),
                   positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), seg.shape))
    leaky = np.asarray(jax.jit(summed)(params, ignored)[1][0][0])
    ce_1, mask_1 = np.asarray(want[0][0]), np.asarray(want[0][1])
    moved = [np.abs(leaky[r, cols] - ce_1[i, :len(cols)])[mask_1[i, :len(cols)] > 0].max()
             for i, (r, cols) in enumerate(where) if cols[0] > 0 and mask_1[i, :len(cols)].any()]
    assert moved and max(moved) > 1e-2

    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_packed), jax.tree_util.tree_leaves(g_single)):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(np.abs(b).max(), 1e-6)
        np.testing.assert_allclose(a / scale, b / scale, atol=1e-4, err_msg=jax.tree_util.keystr(path))
