"""The one table of Hugging Face tensor names: every parameter of our tree, the HF tensor(s) it comes from, and the
transform between the two layouts. Import (load.py) and export (save.py) both read it, through `leaf_specs`.

Our kernels are [in, out], torch weights [out, in]; the decoder stack stores layer i at (repeat r, block position j)
= divmod(i, period) with a leading repeat axis, and each layer's experts are one [E, ...] array where the checkpoint
has one tensor per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`; transformers 5 fuses them only in memory
and writes them per expert).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator

import numpy as np
from flax import nnx

TIED_HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


# Transforms between one HF tensor and its slot in our leaf (both directions, and the HF shape of a slot shape).

@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]


COPY = Transform("copy", lambda w: w, lambda w: w, lambda s: tuple(s))
LINEAR = Transform("transpose", lambda w: w.T, lambda w: w.T, lambda s: tuple(s[::-1]))  # [out, in] <-> [in, out]
CONV = Transform("conv",                                                              # [C, 1, K] <-> [K, C]
                 lambda w: w[:, 0, :].T, lambda w: w.T[:, None, :], lambda s: (s[1], 1, s[0]))

# (our path, HF name, transform). `{L}` / `{H}` stand for a decoder layer: ours `model.layers.blocks.{j}` (stacked
# over repeats) or `mtp.layers.{i}`; HF `model.layers.{i}` or `mtp.layers.{i}`. `{e}` marks a per-expert tensor:
# our [E, ...] leaf slot e is HF tensor e. The mixer and mlp parameter names never collide between the kinds.
HF_TABLE: list[tuple[str, str, Transform]] = [
    ("model.embed_tokens.embedding", "model.embed_tokens.weight", COPY),
    ("model.norm.weight", "model.norm.weight", COPY),
    ("lm_head.kernel", "lm_head.weight", LINEAR),
    ("mtp.fc.kernel", "mtp.fc.weight", LINEAR),
    ("mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_embedding.weight", COPY),
    ("mtp.pre_fc_norm_hidden.weight", "mtp.pre_fc_norm_hidden.weight", COPY),
    ("mtp.norm.weight", "mtp.norm.weight", COPY),
    ("{L}.input_layernorm.weight", "{H}.input_layernorm.weight", COPY),
    ("{L}.post_attention_layernorm.weight", "{H}.post_attention_layernorm.weight", COPY),
    # Gated DeltaNet (HF linear_attn)
    ("{L}.mixer.in_proj_qkvz.kernel", "{H}.linear_attn.in_proj_qkvz.weight", LINEAR),
    ("{L}.mixer.in_proj_ba.kernel", "{H}.linear_attn.in_proj_ba.weight", LINEAR),
    ("{L}.mixer.conv1d.kernel", "{H}.linear_attn.conv1d.weight", CONV),
    ("{L}.mixer.dt_bias", "{H}.linear_attn.dt_bias", COPY),
    ("{L}.mixer.A_log", "{H}.linear_attn.A_log", COPY),
    ("{L}.mixer.norm.weight", "{H}.linear_attn.norm.weight", COPY),
    ("{L}.mixer.out_proj.kernel", "{H}.linear_attn.out_proj.weight", LINEAR),
    # Gated attention (HF self_attn)
    *[(f"{{L}}.mixer.{p}_proj.{k}", f"{{H}}.self_attn.{p}_proj.{w}", LINEAR if k == "kernel" else COPY)
      for p in "qkvo" for k, w in (("kernel", "weight"), ("bias", "bias"))],
    ("{L}.mixer.q_norm.weight", "{H}.self_attn.q_norm.weight", COPY),
    ("{L}.mixer.k_norm.weight", "{H}.self_attn.k_norm.weight", COPY),
    # Sparse MoE
    ("{L}.mlp.gate.kernel", "{H}.mlp.gate.weight", LINEAR),
    *[(f"{{L}}.mlp.experts.{p}", f"{{H}}.mlp.experts.{{e}}.{p}.weight", LINEAR)
      for p in ("gate_proj", "up_proj", "down_proj")],
    *[(f"{{L}}.mlp.shared_expert.{p}.kernel", f"{{H}}.mlp.shared_expert.{p}.weight", LINEAR)
      for p in ("gate_proj", "up_proj", "down_proj")],
    ("{L}.mlp.shared_expert_gate.kernel", "{H}.mlp.shared_expert_gate.weight", LINEAR),
    # Dense MLP
    *[(f"{{L}}.mlp.{p}.kernel", f"{{H}}.mlp.{p}.weight", LINEAR) for p in ("gate_proj", "up_proj", "down_proj")],
]

_TOP_RULES = {ours: (hf, t) for ours, hf, t in HF_TABLE if not ours.startswith("{L}.")}
_LAYER_RULES = {ours[len("{L}."):]: (hf[len("{H}."):], t) for ours, hf, t in HF_TABLE if ours.startswith("{L}.")}
_STACK_RE = re.compile(r"^model\.layers\.blocks\.(\d+)\.(.+)$")
_MTP_LAYER_RE = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass
class LeafSpec:
    """One leaf of our tree and the HF tensors that fill it.

    hf_names[r][e]: r over the repeats of a stacked leaf (a single entry when not stacked), e over the experts of a
    per-expert leaf (a single entry otherwise). slot_shape: the shape of one (r, e) slot in our layout.
    """
    path: tuple
    shape: tuple
    dtype: Any
    stacked: bool
    per_expert: bool
    hf_names: list[list[str]]
    transform: Transform

    @property
    def key(self) -> str:
        return ".".join(str(p) for p in self.path)

    @property
    def slot_shape(self) -> tuple:
        return tuple(self.shape[int(self.stacked) + int(self.per_expert):])

    @property
    def hf_shape(self) -> tuple:
        return self.transform.hf_shape(self.slot_shape)

    def slots(self) -> Iterator[tuple[int, int, str]]:
        for r, row in enumerate(self.hf_names):
            for e, name in enumerate(row):
                yield r, e, name


def _layer_params(model) -> tuple[int, int]:
    stack = model.model.layers
    return stack.period, stack.repeats


def leaf_specs(model) -> list[LeafSpec]:
    """Every parameter of `model` (concrete or abstract) with its HF source tensors, in HF checkpoint order."""
    period, repeats = _layer_params(model)
    specs, unmapped = [], []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = ".".join(str(p) for p in path)
        value = var.get_value() if hasattr(var, "get_value") else var.value
        shape, dtype = tuple(value.shape), value.dtype
        if m := _STACK_RE.match(key):
            j, rest = int(m.group(1)), m.group(2)
            hf_prefixes, stacked = [f"model.layers.{r * period + j}" for r in range(repeats)], True
        elif m := _MTP_LAYER_RE.match(key):
            rest, hf_prefixes, stacked = m.group(2), [f"mtp.layers.{m.group(1)}"], False
        else:
            rest, hf_prefixes, stacked = None, None, False
        if rest is not None and rest in _LAYER_RULES:
            hf_rel, transform = _LAYER_RULES[rest]
            template = [f"{prefix}.{hf_rel}" for prefix in hf_prefixes]
        elif rest is None and key in _TOP_RULES:
            hf_rel, transform = _TOP_RULES[key]
            template = [hf_rel]
        else:
            unmapped.append(key)
            continue
        per_expert = "{e}" in hf_rel
        if per_expert:
            n_exp = shape[int(stacked)]
            names = [[t.replace("{e}", str(e)) for e in range(n_exp)] for t in template]
        else:
            names = [[t] for t in template]
        specs.append(LeafSpec(tuple(path), shape, dtype, stacked, per_expert, names, transform))
    if unmapped:
        raise NotImplementedError(f"qwen3next_jax.hf.names.HF_TABLE has no entry for parameter(s) {unmapped}; "
                                  "extend the table")
    specs.sort(key=lambda s: hf_order(s.hf_names[0][0]))
    return specs


def hf_order(name: str):
    """Checkpoint order: embeddings, layers by index, final norm, lm_head, then MTP; natural order inside."""
    group = 0 if name.startswith("model.embed") else 1 if name.startswith("model.layers.") else \
        2 if name.startswith("model.") else 3 if name.startswith("lm_head") else 4
    return group, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
