"""The one schema of a Qwen3-Next model: every field that changes the math, and HF config.json in and out.

Field names are transformers' own, so a config.json maps onto this dataclass key for key. transformers 4.57 keeps
`rope_theta` / `partial_rotary_factor` / `rope_scaling` at the top level; transformers 5 nests them in
`rope_parameters`. Both are read; either can be written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from typing import Any

LINEAR, FULL = "linear_attention", "full_attention"

# Keys a config.json may carry that do not change the forward math (or that this project derives itself).
_HF_KEYS_WITHOUT_MATH = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "attention_dropout",
    "output_router_logits", "initializer_range", "model_type", "full_attention_interval", "rope_parameters",
    "rope_theta", "partial_rotary_factor", "rope_scaling", "keys_to_ignore_at_inference", "max_window_layers",
    "sliding_window", "use_sliding_window", "tie_encoder_decoder", "return_dict", "output_hidden_states",
    "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "_name_or_path", "decoder_start_token_id",
}


@dataclasses.dataclass
class Qwen3NextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 48
    # Gated softmax attention.
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    attention_bias: bool = False
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "yarn" | "llama3", "factor": ...}; None: plain RoPE
    max_position_embeddings: int = 262144
    # Gated DeltaNet.
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # Layer kinds, one per layer. Left out, layer i is full attention when (i + 1) % full_attention_interval == 0
    # (an argument only, as in transformers: layer_types is the one record of the rhythm).
    layer_types: list[str] | None = None
    full_attention_interval: dataclasses.InitVar[int | None] = None
    # Mixture of experts.
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = dataclasses.field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # Multi-token prediction depth (the real checkpoint has one MTP layer and no config key for it).
    mtp_num_hidden_layers: int = 1
    # The rest.
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None

    def __post_init__(self, full_attention_interval: int | None):
        if self.layer_types is None:
            interval = full_attention_interval or 4
            self.layer_types = [FULL if (i + 1) % interval == 0 else LINEAR for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        self.validate()

    # ------------------------------------------------------------------ derived facts

    def is_sparse_layer(self, i: int) -> bool:
        """transformers' rule: an MoE block unless listed in mlp_only_layers or off the decoder_sparse_step rhythm."""
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    def layer_signature(self, i: int) -> tuple[str, bool]:
        return self.layer_types[i], self.is_sparse_layer(i)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def value_heads_per_key_head(self) -> int:
        return self.linear_num_value_heads // self.linear_num_key_heads

    def validate(self) -> None:
        errors = []
        if len(self.layer_types) != self.num_hidden_layers:
            errors.append(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted({t for t in self.layer_types if t not in (LINEAR, FULL)})
        if bad:
            errors.append(f"layer_types has unknown kinds {bad}; allowed: {LINEAR!r}, {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            errors.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            errors.append("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.rotary_dim % 2:
            errors.append(f"head_dim * partial_rotary_factor = {self.rotary_dim} must be even")
        if self.hidden_act != "silu":
            errors.append(f"hidden_act {self.hidden_act!r} is not supported (Qwen3-Next uses 'silu')")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            errors.append(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts "
                          f"({self.num_experts})")
        if rope_type(self.rope_scaling) not in ("default", "linear", "yarn", "llama3"):
            errors.append(f"rope_scaling type {rope_type(self.rope_scaling)!r} is not supported "
                          "(supported: 'default', 'linear', 'yarn', 'llama3')")
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            errors.append(f"mlp_only_layers {bad_layers} are outside 0..{self.num_hidden_layers - 1}")
        if self.mtp_num_hidden_layers < 0:
            errors.append("mtp_num_hidden_layers must be >= 0")
        if errors:
            raise ValueError("invalid Qwen3NextConfig: " + "; ".join(errors))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Qwen3NextConfig":
        """Build from our own field names; an unknown key is an error naming it and the closest field."""
        names = [f.name for f in dataclasses.fields(cls)] + ["full_attention_interval"]
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise KeyError(f"unknown Qwen3NextConfig field(s): {', '.join(hints)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Qwen3NextConfig":
        """A copy with `changes`; a new depth or interval without layer_types re-derives them from the rhythm."""
        d = self.to_dict()
        if "layer_types" not in changes and ("num_hidden_layers" in changes or
                                             changes.get("full_attention_interval") is not None):
            d["layer_types"] = None
            if changes.get("full_attention_interval") is None:
                changes["full_attention_interval"] = (self.layer_types.index(FULL) + 1 if FULL in self.layer_types
                                                      else self.num_hidden_layers + 1)
        d.update(changes)
        return Qwen3NextConfig.from_dict(d)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "Qwen3NextConfig":
        """Read a transformers config.json dict (4.57 or 5.x layout)."""
        model_type = hf.get("model_type")
        if model_type != "qwen3_next":
            raise ValueError(f"config.json has model_type {model_type!r}; this project reads only 'qwen3_next'")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in hf.items() if k in names}
        ignored = sorted(k for k in hf if k not in names and k not in _HF_KEYS_WITHOUT_MATH)
        if ignored:
            warnings.warn(f"config.json keys ignored (not part of the Qwen3-Next math): {ignored}")
        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = hf.get("rope_scaling")
        if legacy_scaling:
            rope = {**legacy_scaling, **rope}
        d["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        d["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25)))
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        d["rope_scaling"] = scaling if rope_type(scaling) != "default" else None
        if "full_attention_interval" in hf:
            d["full_attention_interval"] = hf["full_attention_interval"]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            d[key] = hf.get(key)
        # No key means one MTP layer (the real checkpoint); the loader lowers it when the weights hold none.
        d["mtp_num_hidden_layers"] = hf.get("mtp_num_hidden_layers", 1)
        return cls(**d)

    def to_hf_dict(self, layout: str = "5") -> dict[str, Any]:
        """config.json for transformers: layout "5" nests RoPE in rope_parameters, "4.57" keeps it top-level."""
        d = self.to_dict()
        rope_theta, factor, scaling = d.pop("rope_theta"), d.pop("partial_rotary_factor"), d.pop("rope_scaling")
        hf = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", **d}
        if layout == "5":
            hf["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": rope_theta,
                                     "partial_rotary_factor": factor}
        elif layout == "4.57":
            hf.update(rope_theta=rope_theta, partial_rotary_factor=factor, rope_scaling=scaling)
        else:
            raise ValueError(f"unknown config.json layout {layout!r}; use '5' or '4.57'")
        return hf

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Qwen3NextConfig":
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_json_file(self, path: str | os.PathLike, layout: str = "5") -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(layout), f, indent=2)
            f.write("\n")

    @classmethod
    def preset(cls, name: str) -> "Qwen3NextConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_dict(dict(PRESETS[name]))


def rope_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


PRESETS: dict[str, dict[str, Any]] = {
    # The real Qwen3-Next-80B-A3B config.json.
    "qwen3-next-80b-a3b": {},
    # jax-linear-attention's qwen3-next-1p3b: the end-to-end bench shape of ANCHORS.md (1.27B total, 0.55B active).
    "bench-1p3b": dict(
        vocab_size=128256, hidden_size=1024, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=1,
        head_dim=256, linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=128,
        linear_value_head_dim=128, num_experts=64, num_experts_per_tok=10, moe_intermediate_size=256,
        shared_expert_intermediate_size=256, intermediate_size=2816, max_position_embeddings=65536),
    # A model that trains on a CPU in minutes: byte vocabulary, all of the architecture's parts.
    "tiny": dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=None),
}
