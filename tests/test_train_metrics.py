"""The FLOP count behind MFU agrees with the model's own parameter tree on every preset, so it cannot drift from the
model: the matmul part of flops_per_token is 6 x the matmul weights a token uses, counted here from the abstract
parameters (each parameter's logical axes say what it is) rather than from the config."""
import math

import pytest
from flax import nnx

from qwen3next_jax import Qwen3NextForCausalLM
from qwen3next_jax.config import PRESETS, Qwen3NextConfig
from qwen3next_train.metrics import flops_per_token


def active_matmul_weights(model) -> float:
    """Weights a token multiplies by: every parameter of two or more logical axes (projections, the depthwise conv,
    routers, experts), except the embedding (a lookup); routed experts count k/E of their size (a token visits k of
    E), the LM head once per use (the main head and each MTP depth)."""
    cfg = model.config
    total = 0.0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        axes = variable.get_metadata()["logical_axes"]
        if len(axes) < 2 or "embed_tokens" in names:
            continue
        size = math.prod(variable.get_value().shape)  # a stacked parameter's leading axis holds its repeats
        if "experts" in axes:
            size *= cfg.num_experts_per_tok / cfg.num_experts
        if names[0] == "lm_head":
            size *= 1 + cfg.mtp_num_hidden_layers
        total += size
    return total


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_flops_match_the_parameter_tree(preset):
    cfg = Qwen3NextConfig.preset(preset)
    model = nnx.eval_shape(lambda: Qwen3NextForCausalLM(cfg, rngs=nnx.Rngs(0)))
    counted = active_matmul_weights(model)
    assert counted > 0
    assert flops_per_token(cfg, seq_len=4096)["matmul"] == pytest.approx(6 * counted, rel=1e-12)


def test_the_check_sees_a_missing_part():
    """The count is sensitive: dropping the MTP layer changes both sides, and the formula tracks it."""
    cfg = Qwen3NextConfig.preset("tiny")
    without_mtp = cfg.replace(mtp_num_hidden_layers=0)
    model = nnx.eval_shape(lambda: Qwen3NextForCausalLM(without_mtp, rngs=nnx.Rngs(0)))
    assert flops_per_token(without_mtp, 128)["matmul"] == pytest.approx(6 * active_matmul_weights(model), rel=1e-12)
    assert flops_per_token(cfg, 128)["matmul"] != pytest.approx(6 * active_matmul_weights(model), rel=1e-6)
