"""The trainer's one config schema: typed dataclass sections, filled from YAML, gin and `section.field=value`.

Every field is written `section.field` everywhere: in YAML (nested mappings), in gin files (`data.seq_len = 256`)
and on the command line (`data.seq_len=256`). The `model` section IS `qwen3next_jax.config.Qwen3NextConfig`;
besides its fields it accepts `preset` (applied first, then the other model keys override it).

Precedence, lowest first: the schema defaults (a tiny model that trains on a CPU), the YAML file, gin files, the
command line. An unknown key or a value of the wrong type is an error that names the key and, for an unknown key,
the closest field; so is a value out of range (AT_LEAST), a YAML syntax error (file and line) and an invalid model.

Gin files are read with gin's own parser but hold data only: `section.field = literal` bindings and `include`.
A gin `import` (which would run a module), `@references`, macros and scopes are refused, so a gin file cannot run
code.

ON_RESUME tags every field by what a change means for a run that resumes from a checkpoint (train/checkpoint.py
compares the config stored in the checkpoint with the new one before restoring anything).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import types
import typing
from typing import Any, Literal

import jax.numpy as jnp
import yaml
from gin import config_parser

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
    clip_norm: float = 1.0  # global gradient norm; 0 disables clipping (the optimizer state is the same)
    grad_accum_steps: int = 1
    # AdamW's first moment (optax's mu_dtype); null: the parameters' dtype. The second moment always takes the
    # parameters' dtype (optax 0.2.8 has no nu_dtype), so both are bf16 exactly when execution.param_dtype is.
    mu_dtype: Literal["float32", "bfloat16"] | None = None
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
    keep: int = 3  # keep the newest K complete checkpoints; 0 keeps every one
    async_save: bool = True
    resume: bool = True  # resume from the newest complete checkpoint in the run directory
    init_from_hf: str | None = None  # a Hugging Face checkpoint directory to fine-tune from (when not resuming)
    init_from_params: str | None = None  # or an Orbax params checkpoint (qwen3next-convert hf-to-orbax's layout)


@dataclasses.dataclass
class MeshConfig:
    # Device counts per mesh axis (of all processes' devices); -1 on one axis takes all remaining devices. Devices
    # are placed by jax's mesh_utils along the chips' interconnect (qwen3next_jax.sharding.make_mesh).
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    context: int = 1
    # Granules joined by the data-centre network (DCN): TPU slices of a multi-slice run, else (GPU, CPU hosts)
    # processes. The data axis is split across them outermost (data / slices of it in each granule); every other
    # axis stays inside one granule, on the fast interconnect.
    slices: int = 1


@dataclasses.dataclass
class DistributedConfig:
    # Whether this is one of several processes (jax.distributed.initialize, before any device is used):
    # "auto": the fields set below, the rest detected from the cluster (a Cloud TPU pod slice, SLURM, Open MPI);
    #   one process when nothing is set and no cluster is detected.
    # "always": as auto, but no cluster and no fields is an error (a pod job that must not train alone).
    # "never": one process; the fields below must be unset.
    initialize: Literal["auto", "always", "never"] = "auto"
    # jax.distributed.initialize's own arguments; unset (null) ones are detected from the cluster.
    coordinator_address: str | None = None  # host:port of process 0, which all processes reach
    num_processes: int | None = None
    process_id: int | None = None  # 0 .. num_processes - 1; process 0 writes the logs and the config
    local_device_ids: list[int] | None = None  # the local devices this process drives (e.g. one GPU per process)
    initialization_timeout: int = 300  # seconds to wait for every process to connect


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
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    train: RunConfig = dataclasses.field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)
# DistributedConfig's fields that are jax.distributed.initialize's arguments, passed when set.
DISTRIBUTED_ARGS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
MODEL_PRESET_KEY = "preset"
# Keys that moved, and where to: a config written for an older version gets the new name, not a bare "unknown".
MOVED = {"train.compute_dtype": "execution.compute_dtype", "train.param_dtype": "execution.param_dtype",
         "train.remat": "execution.remat", "train.gdn_impl": "execution.gdn",
         "train.attention_impl": "execution.attention"}

# What a changed field means when a run resumes. STRUCTURAL: it fixes the layout of the saved state or the data
# stream the checkpoint's position refers to; a change refuses the resume, naming the fields, and leaves every
# checkpoint in place. CHANGEABLE: the run resumes with the new value and a logged note. A section name tags every
# field of that section not listed by itself (the model's and execution's fields belong to qwen3next_jax).
# The mesh is compared as written: `data: -1` on 8 devices and then on 16 resumes (arrays are restored onto the new
# mesh); changing an axis's written size is refused.
STRUCTURAL, CHANGEABLE = "structural", "changeable"
ON_RESUME: dict[str, str] = {
    "model": STRUCTURAL,  # the shapes of every parameter, and the math the optimizer state belongs to
    "model.router_aux_loss_coef": CHANGEABLE,  # a loss weight
    "model.initializer_range": CHANGEABLE,  # read only when parameters are created
    "execution": CHANGEABLE,  # remat and each kernel family's implementation: how the same state is computed
    "execution.compute_dtype": STRUCTURAL, "execution.param_dtype": STRUCTURAL,  # param_dtype is the state's
    # The data stream: the checkpoint's iterator position counts batches of exactly this pipeline.
    "data.sources": STRUCTURAL, "data.text_field": STRUCTURAL, "data.tokenizer": STRUCTURAL,
    "data.seq_len": STRUCTURAL, "data.batch_size": STRUCTURAL, "data.seed": STRUCTURAL,
    "data.packing_streams": STRUCTURAL, "data.row_shuffle_window": STRUCTURAL, "data.val_fraction": STRUCTURAL,
    "data.num_workers": STRUCTURAL,  # grain's worker processes keep their own iterator states
    "optim.lr": CHANGEABLE, "optim.min_lr_ratio": CHANGEABLE, "optim.warmup_steps": CHANGEABLE,
    "optim.decay": CHANGEABLE, "optim.weight_decay": CHANGEABLE, "optim.b1": CHANGEABLE, "optim.b2": CHANGEABLE,
    "optim.eps": CHANGEABLE, "optim.clip_norm": CHANGEABLE, "optim.max_nonfinite_steps": CHANGEABLE,
    "optim.grad_accum_steps": STRUCTURAL,
    "optim.mu_dtype": STRUCTURAL,  # the dtype of a saved optimizer-state array
    "loss.mtp_weight": CHANGEABLE, "loss.z_loss_coef": CHANGEABLE, "loss.chunk_tokens": CHANGEABLE,
    "checkpoint.every": CHANGEABLE, "checkpoint.keep": CHANGEABLE, "checkpoint.async_save": CHANGEABLE,
    "checkpoint.resume": CHANGEABLE,
    # Only a run that starts from nothing reads these; a resumed one has its weights.
    "checkpoint.init_from_hf": CHANGEABLE, "checkpoint.init_from_params": CHANGEABLE,
    "mesh": STRUCTURAL,
    "mesh.slices": CHANGEABLE,  # where the devices sit, not what the arrays hold: they are restored onto any mesh
    # How the processes find each other: a run may resume on another number of hosts (the data stream is global).
    "distributed": CHANGEABLE,
    "train.name": CHANGEABLE, "train.out_dir": CHANGEABLE, "train.steps": CHANGEABLE,
    "train.seed": STRUCTURAL,  # the initial parameters and the step RNG the state carries
    "train.log_every": CHANGEABLE, "train.eval_every": CHANGEABLE, "train.eval_batches": CHANGEABLE,
    "train.progress": CHANGEABLE,
}

# Lower bounds, checked once every source is applied: a size of 0 would divide by zero or train on nothing.
AT_LEAST: dict[str, float] = {
    "data.seq_len": 1, "data.batch_size": 1, "data.packing_streams": 1, "data.row_shuffle_window": 0,
    "data.num_workers": 0, "data.val_fraction": 0,
    "optim.lr": 0, "optim.min_lr_ratio": 0, "optim.warmup_steps": 0, "optim.weight_decay": 0, "optim.eps": 0,
    "optim.clip_norm": 0, "optim.grad_accum_steps": 1, "optim.max_nonfinite_steps": 1,
    "loss.mtp_weight": 0, "loss.z_loss_coef": 0, "loss.chunk_tokens": 1,
    "checkpoint.every": 0, "checkpoint.keep": 0, "mesh.slices": 1,
    "distributed.num_processes": 1, "distributed.process_id": 0, "distributed.initialization_timeout": 1,
    "train.steps": 1, "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 1,
}

log = logging.getLogger(__name__)


class ConfigError(KeyError, TypeError):
    """A bad key or value, file or input; the message names it."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


def _fields(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def on_resume(key: str) -> str:
    """STRUCTURAL or CHANGEABLE for `section.field` (see ON_RESUME)."""
    return ON_RESUME.get(key) or ON_RESUME[key.partition(".")[0]]


_untagged = [f"{s}.{f}" for s in SECTIONS for f in _fields(s) if f"{s}.{f}" not in ON_RESUME and s not in ON_RESUME]
if _untagged:  # every field must say what a change means on resume
    raise TypeError(f"config fields missing from ON_RESUME: {_untagged}")


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


def _check_key(section: str, key: str, where: str = "") -> None:
    """An unknown or moved `section.key` is an error naming it (and `where` it was written)."""
    allowed = set(typing.get_type_hints(SECTIONS[section])) | ({MODEL_PRESET_KEY} if section == "model" else set())
    if f"{section}.{key}" in MOVED:
        raise ConfigError(f"{where}config key {section}.{key} is now {MOVED[f'{section}.{key}']}")
    if key not in allowed:
        raise ConfigError(f"{where}unknown config key {section}.{key}{_suggest(key, allowed)}")


def _section(name: str, cls: type, values: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    for key in values:
        _check_key(name, key)
    typed = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items() if k != MODEL_PRESET_KEY}
    if cls is Qwen3NextConfig:
        preset = values.get(MODEL_PRESET_KEY) or "tiny"
        try:
            base = Qwen3NextConfig.preset(preset)
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from None
        try:
            return base.replace(**typed) if typed else base
        except ValueError as e:  # the model's own validation: the message names the fields
            raise ConfigError(f"model: {e}") from None
    if cls is Execution:
        try:
            return dataclasses.replace(TrainConfig().execution, **typed)
        except ValueError as e:  # an implementation or dtype the registry does not know: the message names it
            raise ConfigError(f"{name}: {e}") from None
    return cls(**typed)


def _check_values(cfg: TrainConfig) -> None:
    """Ranges and the facts that tie fields together; everything that can be checked without devices or files."""
    for key, low in AT_LEAST.items():
        section, _, field = key.partition(".")
        value = getattr(getattr(cfg, section), field)
        if value is not None and value < low:
            raise ConfigError(f"{key} must be at least {low}, got {value}")
    if cfg.data.val_fraction >= 1:
        raise ConfigError(f"data.val_fraction must be below 1, got {cfg.data.val_fraction}")
    if cfg.data.batch_size % cfg.optim.grad_accum_steps:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} must be a multiple of optim.grad_accum_steps "
                          f"{cfg.optim.grad_accum_steps}")
    if cfg.optim.mu_dtype and jnp.dtype(cfg.optim.mu_dtype).itemsize > cfg.execution.params.itemsize:
        # optax's AdamW would then return updates wider than the parameters, which apply_if_finite refuses.
        raise ConfigError(f"optim.mu_dtype {cfg.optim.mu_dtype} is wider than execution.param_dtype "
                          f"{cfg.execution.param_dtype}; leave it null (the parameters' dtype) or narrow it")
    _check_distributed(cfg.distributed)
    if cfg.checkpoint.init_from_hf and cfg.checkpoint.init_from_params:
        raise ConfigError("checkpoint.init_from_hf and checkpoint.init_from_params are both set; choose one")
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        log.warning("data.seq_len %d is beyond model.max_position_embeddings %d: the model was not made for "
                    "positions that far", cfg.data.seq_len, cfg.model.max_position_embeddings)


def _check_distributed(d: DistributedConfig) -> None:
    given = [f"distributed.{k}" for k in DISTRIBUTED_ARGS if getattr(d, k) is not None]
    if d.initialize == "never" and given:
        raise ConfigError(f"distributed.initialize is 'never' (one process) but {', '.join(given)} "
                          f"{'is' if len(given) == 1 else 'are'} set")
    if d.num_processes is not None and d.process_id is not None and d.process_id >= d.num_processes:
        raise ConfigError(f"distributed.process_id {d.process_id} must be below distributed.num_processes "
                          f"{d.num_processes} (processes count from 0)")
    if d.coordinator_address is not None:
        host, _, port = d.coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"distributed.coordinator_address must be host:port (a port 1-65535), got "
                              f"{d.coordinator_address!r}")
    ids = d.local_device_ids or []
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"distributed.local_device_ids must be distinct device numbers >= 0, got {ids}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    section, _, field = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r}{_suggest(section, SECTIONS)}; "
                          f"keys are written section.field with sections {list(SECTIONS)}")
    if not field or "." in field:
        raise ConfigError(f"config key {dotted!r} must be written section.field")
    tree.setdefault(section, {})[field] = value


def _yaml_values(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    tree = {}
    for section, values in loaded.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown config section {section!r}{_suggest(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        for key in values:
            _check_key(section, key, f"{path}: ")
        tree[section] = dict(values)
    return tree


class _DataOnly(config_parser.ParserDelegate):
    """Gin values may be literals only: a reference would call a configurable, a macro is one more indirection."""

    def configurable_reference(self, scoped_name, evaluate):
        raise ConfigError(f"@{scoped_name}: gin references are not allowed; bind a literal value")

    def macro(self, macro_name):
        raise ConfigError(f"%{macro_name}: gin macros are not allowed; bind a literal value")


def _gin_values(path: str, tree: dict[str, dict[str, Any]], including: tuple[str, ...] = ()) -> None:
    """Adds the bindings of the gin file at `path` (and of the files it includes) to `tree`."""
    if os.path.abspath(path) in including:
        raise ConfigError(f"{path}: includes itself (through {' -> '.join(including)})")
    try:
        f = open(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the gin file ({e.strerror})") from None
    with f:
        statements = config_parser.ConfigParser(f, _DataOnly())
        while True:
            try:
                statement = next(statements, None)
            except SyntaxError as e:
                raise ConfigError(f"{path}, line {e.lineno}: {e.msg}") from None
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
            if statement is None:
                return
            where = f"{path}, line {statement.location.line_num}: "
            if isinstance(statement, config_parser.ImportStatement):
                raise ConfigError(f"{where}`{statement.format()}`: gin imports run code and are not allowed; a "
                                  "gin file here binds section.field = value only")
            if isinstance(statement, config_parser.IncludeStatement):
                _gin_values(os.path.join(os.path.dirname(path), statement.filename), tree,
                            including + (os.path.abspath(path),))
            elif isinstance(statement, config_parser.BindingStatement):
                if statement.scope or not statement.arg_name:
                    raise ConfigError(f"{where}gin scopes and macros are not allowed; write section.field = value")
                if statement.selector not in SECTIONS:
                    raise ConfigError(f"{where}unknown config section {statement.selector!r}"
                                      f"{_suggest(statement.selector, SECTIONS)}")
                _check_key(statement.selector, statement.arg_name, where)
                tree.setdefault(statement.selector, {})[statement.arg_name] = statement.value


def load_config(path: str | None = None, overrides: list[str] = (), gin_files: list[str] = ()) -> TrainConfig:
    """The resolved TrainConfig: defaults < YAML at `path` < gin files < `section.field=value` overrides."""
    tree = _yaml_values(path) if path else {}
    for gin_file in gin_files:
        _gin_values(gin_file, tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must be written section.field=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    cfg = TrainConfig(**{name: _section(name, cls, tree.get(name, {})) for name, cls in SECTIONS.items()})
    _check_values(cfg)
    return cfg


def _flat(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{"section.field": value} of a config dict, values as JSON gives them back (tuples become lists)."""
    return {f"{s}.{k}": v for s, fields in json.loads(json.dumps(config)).items() for k, v in fields.items()}


def resume_changes(stored: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]
                   ) -> tuple[list[str], list[str]]:
    """(structural, changeable): the fields that differ between the config a checkpoint was saved with and the new
    one, each written `section.field: old -> new`. A key of an older version is compared under its new name."""
    old = {MOVED.get(k, k): v for k, v in _flat(stored).items()}
    cur = _flat(new)
    structural, changeable = [], []
    for key in sorted(set(old) | set(cur)):
        if key in old and key in cur and old[key] == cur[key]:
            continue
        change = f"{key}: {old.get(key, '(not recorded)')!r} -> {cur.get(key, '(not a field any more)')!r}"
        known = key.partition(".")[0] in SECTIONS and key in cur
        (structural if known and on_resume(key) == STRUCTURAL and key in old else changeable).append(change)
    return structural, changeable
