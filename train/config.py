"""The trainer's one config schema: typed dataclass sections, filled from YAML, gin and `section.field=value`.

Every field is written `section.field` everywhere: in YAML (nested mappings), in gin files (`data.seq_len = 256`)
and on the command line (`data.seq_len=256`). The `model` section IS `qwen3next_jax.config.Qwen3NextConfig`;
besides its fields it accepts `preset` (applied first, then the other model keys override it).

Precedence, lowest first: the schema defaults (a tiny model that trains on a CPU), the YAML file, gin files, the
command line. An unknown key or a value of the wrong type is an error that names the key and, for an unknown key,
the closest field.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

import gin
import yaml

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.execution import Execution


@dataclasses.dataclass
class DataConfig:
    # Files, directories or globs of .txt/.py/.md (one document per file), .jsonl (one per line), .parquet (one per
    # row) or .array_record (one UTF-8 document per record). Empty: the Python standard library's own source
    # files, which every machine with Python has.
    sources: list[str] = dataclasses.field(default_factory=list)
    text_field: str = "text"  # the JSONL key / Parquet column holding the text
    tokenizer: str = "bytes"  # "bytes" (UTF-8 bytes, ids 0..255, end of document 256) or a tokenizer.json path
    seq_len: int = 128
    batch_size: int = 16  # global rows per optimizer step (split into optim.grad_accum_steps micro-batches)
    seed: int = 0
    packing_streams: int = 16  # documents packed side by side in interleaved streams: a batch mixes many
    row_shuffle_window: int = 1024  # packed rows are shuffled within windows of this many; 0 keeps their order
    val_fraction: float = 0.02  # share of documents held out for validation
    num_workers: int = 0  # grain worker processes that tokenize and pack ahead of the step; 0 = in this process


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 20
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1  # not applied to norms, biases, A_log and dt_bias
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global gradient norm; 0 disables clipping
    grad_accum_steps: int = 1
    max_nonfinite_steps: int = 5  # a step with a non-finite gradient is skipped; stop after this many in a row


@dataclasses.dataclass
class LossConfig:
    mtp_weight: float = 0.3  # weight of the multi-token-prediction loss (mean over MTP depths)
    z_loss_coef: float = 0.0  # coefficient of logsumexp^2 (PaLM's z-loss); 0 disables it
    chunk_tokens: int = 2048  # tokens per cross-entropy chunk: bounds the fp32 logits held at once
    # The router load-balancing weight is the model's own field: model.router_aux_loss_coef.


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 50  # save every N steps (and at the end); 0 disables checkpointing
    keep: int = 3  # keep the newest K complete checkpoints
    async_save: bool = True
    resume: bool = True  # resume from the newest complete checkpoint in the run directory
    init_from_hf: str | None = None  # a Hugging Face checkpoint directory to fine-tune from (when not resuming)


@dataclasses.dataclass
class MeshConfig:
    # Device counts per mesh axis; -1 on one axis takes all remaining devices.
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    context: int = 1


@dataclasses.dataclass
class RunConfig:
    name: str = "tiny"
    out_dir: str = "runs"  # the run lives in out_dir/name/{checkpoints, metrics.jsonl, tensorboard, config.yaml}
    steps: int = 200
    seed: int = 0  # parameter initialisation and the step RNG
    log_every: int = 10  # progress-bar refresh and TensorBoard; metrics.jsonl gets every step
    eval_every: int = 50  # validation every N steps (and at the end); 0 disables it
    eval_batches: int = 4
    progress: bool = True


@dataclasses.dataclass
class TrainConfig:
    model: Qwen3NextConfig = dataclasses.field(default_factory=lambda: Qwen3NextConfig.preset("tiny"))
    # How the model runs: dtypes (bf16 compute over fp32 masters by default), remat, kernel per family.
    execution: Execution = dataclasses.field(default_factory=lambda: Execution(compute_dtype="bfloat16"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: RunConfig = dataclasses.field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)
MODEL_PRESET_KEY = "preset"
# Keys that moved, and where to: a config written for an older version gets the new name, not a bare "unknown".
MOVED = {"train.compute_dtype": "execution.compute_dtype", "train.param_dtype": "execution.param_dtype",
         "train.remat": "execution.remat", "train.gdn_impl": "execution.gdn",
         "train.attention_impl": "execution.attention"}


class ConfigError(KeyError, TypeError):
    """A bad key or value; the message names it."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against the type hint, with the few conversions a command line needs ("1e-3" -> 1e-3)."""
    if isinstance(hint, dataclasses.InitVar):  # an init-only argument (model.full_attention_interval)
        hint = hint.type
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    elif hint is type(None):
        if value is None or value in ("null", "None"):
            return None
    elif origin is list or hint is list:
        if isinstance(value, str):  # from the command line: a,b,c
            value = [v for v in value.split(",") if v]
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: the schema type {hint} is not supported by the config parser")
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _section(name: str, cls: type, values: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    allowed = set(hints) | ({MODEL_PRESET_KEY} if cls is Qwen3NextConfig else set())
    for key in values:
        if f"{name}.{key}" in MOVED:
            raise ConfigError(f"config key {name}.{key} is now {MOVED[f'{name}.{key}']}")
        if key not in allowed:
            raise ConfigError(f"unknown config key {name}.{key}{_suggest(key, allowed)}")
    typed = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items() if k != MODEL_PRESET_KEY}
    if cls is Qwen3NextConfig:
        base = Qwen3NextConfig.preset(values.get(MODEL_PRESET_KEY) or "tiny")
        return base.replace(**typed) if typed else base
    if cls is Execution:
        try:
            return dataclasses.replace(TrainConfig().execution, **typed)
        except ValueError as e:  # an implementation or dtype the registry does not know: the message names it
            raise ConfigError(f"{name}: {e}") from None
    return cls(**typed)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    section, _, field = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r}{_suggest(section, SECTIONS)}; "
                          f"keys are written section.field with sections {list(SECTIONS)}")
    if not field or "." in field:
        raise ConfigError(f"config key {dotted!r} must be written section.field")
    tree.setdefault(section, {})[field] = value


def _register_gin() -> None:
    """Each section is a gin configurable named after it, so a gin file binds `data.seq_len = 256`."""
    for name, cls in SECTIONS.items():
        if not gin.config._REGISTRY.get_match(name):  # registering twice is an error in gin
            gin.external_configurable(cls, name=name)


def _gin_values(gin_files: list[str]) -> dict[str, dict[str, Any]]:
    _register_gin()
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(gin_files, bindings=None)
    except ValueError as e:  # gin names the bad parameter; add the closest field like the other sources do
        match = re.search(r"Configurable '(\w+)' doesn't have a parameter named '(\w+)'", str(e))
        if not match:
            raise
        section, key = match.groups()
        raise ConfigError(f"unknown config key {section}.{key}"
                          f"{_suggest(key, typing.get_type_hints(SECTIONS[section]))}\n{e}") from None
    return {name: dict(gin.get_bindings(name)) for name in SECTIONS if gin.get_bindings(name)}


def load_config(path: str | None = None, overrides: list[str] = (), gin_files: list[str] = ()) -> TrainConfig:
    """The resolved TrainConfig: defaults < YAML at `path` < gin files < `section.field=value` overrides."""
    tree: dict[str, dict[str, Any]] = {}
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for section, values in loaded.items():
            if section not in SECTIONS:
                raise ConfigError(f"{path}: unknown config section {section!r}{_suggest(section, SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            tree[section] = dict(values)
    if gin_files:
        for section, values in _gin_values(list(gin_files)).items():
            tree.setdefault(section, {}).update(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must be written section.field=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return TrainConfig(**{name: _section(name, cls, tree.get(name, {})) for name, cls in SECTIONS.items()})
