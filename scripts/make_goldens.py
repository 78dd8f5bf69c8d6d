"""Golden files for the Hugging Face parity tests, made by transformers' own `Qwen3NextForCausalLM`.

Regenerate (needs torch + transformers >= 5 with qwen3_next; CI does not, it only reads the stored files):

    python3 scripts/make_goldens.py            # writes tests/golden/{tiny,odd,tiny_mtp,config_457}/
    python3 scripts/make_goldens.py --check    # regenerates into a temp dir and compares with the stored files

The output is deterministic: every weight is drawn from a seeded `torch.Generator` (never from torch's global RNG
or transformers' init), the inputs likewise, and the forward runs in fp32 on CPU with eager attention. Made with
transformers 5.23.0 / torch 2.13.0 (CPU); `meta.json` in each directory records the versions actually used.

What each model directory holds:
- `config.json` + safetensors exactly as `save_pretrained` writes them (transformers 5 layout; experts saved one
  tensor per expert, `mlp.experts.{e}.{gate,up,down}_proj.weight`, although transformers fuses them in memory).
  `tiny` is saved with a small `max_shard_size`, so it is sharded with `model.safetensors.index.json`; `odd` is one
  `model.safetensors`.
- `golden.npz`: `input_ids` [2, 77] int64, `logits` [2, 77, V] fp32, `hidden_states` [L+1, 2, 77, D] fp32 exactly
  as `output_hidden_states=True` returns them (entry 0 the embeddings, entry i the output of layer i-1, and -- a
  transformers 5 rule -- the LAST entry replaced by the final `model.norm` output), `last_layer_output` [2, 77, D]
  (the last decoder layer's output before `model.norm`, captured with a hook).
- `modules.npz`: per-module input/output pairs captured with forward hooks during that same forward, keys
  `<tag>.in`, `<tag>.out` (and `attn.position_ids`), with `<tag>.layer` the HF layer index:
  `norm` (layers[0].input_layernorm), `attn` (first full-attention layer's self_attn; input is the normed hidden
  state, position_ids are 0..T-1 for both rows), `gdn` (layers[0].linear_attn), `moe` (first sparse-MoE layer's mlp),
  `mlp` (first dense-MLP layer's mlp; only in configs that have one). A whole decoder layer i maps
  hidden_states[i] to hidden_states[i+1] (last_layer_output for the last layer).
- `meta.json`: the config used, versions, router top-k margins (see below), the dims.

`tiny_mtp/`: a 4-layer model saved by transformers (single file), to which this script adds by hand the MTP tensors
the real checkpoint has and transformers drops: `mtp.fc.weight [D, 2D]`, `mtp.pre_fc_norm_embedding.weight`,
`mtp.pre_fc_norm_hidden.weight`, `mtp.layers.0.*` (a full-attention decoder layer with MoE, per-expert names, the
same names a `model.layers.{i}` full-attention MoE layer has), `mtp.norm.weight`. Its config.json has no
`mtp_num_hidden_layers` key, like the real one. No forward goldens (transformers has no MTP forward).

`rope_scaling.json`: transformers' inverse frequencies and cos/sin scaling for the scaled RoPE variants (linear,
yarn with and without mscale, llama3).

`config_457/config.json`: the `odd` config written in the transformers 4.57 layout (rope_theta,
partial_rotary_factor and rope_scaling at the top level, `torch_dtype`, no `rope_parameters`), plus
`expected.json`, the values transformers 5 reads from it.

Routing: top-k routing is discontinuous, so a golden is only useful if no token sits near a tie between the k-th
and (k+1)-th expert. The script draws weights with seed s, s+1, ... until the smallest gap between the k-th and
(k+1)-th router logit over all tokens and MoE layers is at least MIN_TOPK_GAP; the gap is stored in meta.json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

import transformers
from safetensors.torch import load_file, save_file
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "golden")
BATCH, SEQ = 2, 77  # 77: not a multiple of the GDN chunk (64)
MIN_TOPK_GAP = 1e-3  # in router logits

COMMON = dict(hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=None,
              eos_token_id=None, pad_token_id=None, router_aux_loss_coef=0.001, initializer_range=0.02)

CONFIGS = {
    # Standard rhythm: 3 GDN + 1 attention, 8 layers (the period repeats twice), GQA 4/2, GVA ratio 2.
    "tiny": dict(
        vocab_size=300, hidden_size=16, intermediate_size=40, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attention_bias=False, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4, full_attention_interval=4,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=16,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    # Everything off the beaten path: attention every 3rd layer, a dense-MLP layer, GVA ratio 3, head sizes that
    # are not powers of two, no top-k renormalisation, tied embeddings, attention biases, half-rotary RoPE.
    "odd": dict(
        vocab_size=300, hidden_size=20, intermediate_size=28, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, attention_bias=True, linear_num_key_heads=2, linear_num_value_heads=6,
        linear_key_head_dim=20, linear_value_head_dim=12, linear_conv_kernel_dim=4, full_attention_interval=3,
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=8, shared_expert_intermediate_size=12,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
    # The MTP checkpoint: 4 layers, weights only.
    "tiny_mtp": dict(
        vocab_size=300, hidden_size=16, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attention_bias=False, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4, full_attention_interval=4,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=16,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}),
}
SEEDS = {"tiny": 1000, "odd": 2000, "tiny_mtp": 3000}
SHARD_SIZE = {"tiny": "70KB", "odd": None, "tiny_mtp": None}


def make_config(name: str) -> Qwen3NextConfig:
    kw = {**COMMON, **CONFIGS[name]}
    interval = kw.pop("full_attention_interval")
    kw["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                         for i in range(kw["num_hidden_layers"])]
    return Qwen3NextConfig(**kw)


def draw(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """A value for the HF parameter `name` (either naming scheme), far from transformers' init values."""
    def normal(std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    def uniform(lo, hi):
        return torch.rand(shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo

    leaf = name.split(".")[-1]
    if name.endswith("A_log"):
        return uniform(math.log(0.5), math.log(8.0))          # init: log U(0.01, 16)
    if name.endswith("dt_bias"):
        return uniform(-1.5, 1.0)                             # init: ones
    if name.endswith("linear_attn.norm.weight"):
        return uniform(0.6, 1.4)                              # gated norm, init: ones
    if "norm" in name and leaf == "weight":
        return uniform(-0.4, 0.4)                             # zero-centred RMSNorms (1 + w), init: zeros
    if name.endswith("conv1d.weight"):
        return normal(0.5)                                    # [C, 1, K]
    if "embed_tokens" in name:
        return normal(1.0)
    if leaf == "bias":
        return normal(0.2)
    if name.endswith("mlp.gate.weight"):
        return normal(2.0 / math.sqrt(shape[-1]))             # router: well-separated logits
    if name.endswith("shared_expert_gate.weight"):
        return normal(1.0 / math.sqrt(shape[-1]))
    if "experts" in name and len(shape) == 3:                 # fused in memory: [E, out, in]
        return normal(1.0 / math.sqrt(shape[-1]))
    if len(shape) == 2:                                       # nn.Linear [out, in]
        return normal(1.0 / math.sqrt(shape[-1]))
    raise ValueError(f"no distribution for {name} {tuple(shape)}")


def build(name: str, seed: int) -> Qwen3NextForCausalLM:
    torch.manual_seed(seed)  # transformers' own init (fully overwritten below, seeded anyway)
    cfg = make_config(name)
    model = Qwen3NextForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            p.copy_(draw(pname, tuple(p.shape), gen))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def topk_gap(model, hidden_inputs: dict[int, torch.Tensor]) -> float:
    """The smallest gap between the k-th and (k+1)-th router logit over every token of every MoE layer."""
    gaps = []
    for i, x in hidden_inputs.items():
        router = model.model.layers[i].mlp.gate
        logits = x.reshape(-1, x.shape[-1]) @ router.weight.T
        top = torch.topk(logits, router.top_k + 1, dim=-1).values
        gaps.append(float((top[:, -2] - top[:, -1]).min().detach()))
    return min(gaps) if gaps else float("inf")


def run_forward(model, input_ids):
    cfg = model.config
    layers = model.model.layers
    first_full = cfg.layer_types.index("full_attention")
    moe_layers = [i for i in range(cfg.num_hidden_layers) if hasattr(layers[i].mlp, "experts")]
    dense_layers = [i for i in range(cfg.num_hidden_layers) if not hasattr(layers[i].mlp, "experts")]
    captured: dict[str, np.ndarray] = {}
    moe_inputs: dict[int, torch.Tensor] = {}
    handles = []

    def grab(tag, layer_idx, with_kwargs=False):
        def hook(mod, args, *rest):
            if with_kwargs:
                kwargs, out = rest
                x = args[0] if args else kwargs["hidden_states"]
                captured[f"{tag}.position_ids"] = kwargs["position_ids"].expand(x.shape[0], -1).numpy().astype(
                    np.int32) if tag == "attn" else None
            else:
                (out,) = rest
                x = args[0] if args else None
            if isinstance(out, tuple):
                out = out[0]
            captured[f"{tag}.in"] = x.detach().numpy().copy()
            captured[f"{tag}.out"] = out.detach().numpy().copy()
            captured[f"{tag}.layer"] = np.int32(layer_idx)
        return hook

    handles.append(layers[0].input_layernorm.register_forward_hook(grab("norm", 0)))
    handles.append(layers[first_full].self_attn.register_forward_hook(grab("attn", first_full, True),
                                                                       with_kwargs=True))
    handles.append(layers[0].linear_attn.register_forward_hook(grab("gdn", 0, True), with_kwargs=True))
    if moe_layers:
        handles.append(layers[moe_layers[0]].mlp.register_forward_hook(grab("moe", moe_layers[0])))
    if dense_layers:
        handles.append(layers[dense_layers[0]].mlp.register_forward_hook(grab("mlp", dense_layers[0])))
    for i in moe_layers:
        handles.append(layers[i].mlp.register_forward_pre_hook(
            lambda mod, args, i=i: moe_inputs.__setitem__(i, args[0].detach())))
    last = {}
    handles.append(layers[-1].register_forward_hook(lambda mod, args, out: last.__setitem__("out", out)))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    captured = {k: v for k, v in captured.items() if v is not None}
    last_out = last["out"][0] if isinstance(last["out"], tuple) else last["out"]
    golden = dict(
        input_ids=input_ids.numpy().astype(np.int64),
        logits=out.logits.float().numpy(),
        hidden_states=np.stack([h.float().numpy() for h in out.hidden_states]),
        last_layer_output=last_out.float().numpy(),
    )
    return golden, captured, topk_gap(model, moe_inputs)


def save_dir(model, out: str, shard: str | None):
    os.makedirs(out, exist_ok=True)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kw)


def add_mtp(out: str, model, seed: int):
    """Append the real checkpoint's MTP tensors (one layer) to the single-file checkpoint in `out`."""
    cfg = model.config
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    D = cfg.hidden_size
    full = cfg.layer_types.index("full_attention")
    prefix = f"model.layers.{full}."
    gen = torch.Generator().manual_seed(seed + 7)
    mtp = {"mtp.fc.weight": draw("mtp.fc.weight", (D, 2 * D), gen),
           "mtp.pre_fc_norm_embedding.weight": draw("mtp.pre_fc_norm_embedding.weight", (D,), gen),
           "mtp.pre_fc_norm_hidden.weight": draw("mtp.pre_fc_norm_hidden.weight", (D,), gen),
           "mtp.norm.weight": draw("mtp.norm.weight", (D,), gen)}
    for k in sorted(tensors):
        if k.startswith(prefix):
            name = "mtp.layers.0." + k[len(prefix):]
            mtp[name] = draw(name, tuple(tensors[k].shape), gen).contiguous()
    tensors.update(mtp)
    save_file(tensors, path, metadata={"format": "pt"})
    return sorted(mtp)


def write_457(out: str, cfg5: dict):
    """The odd config in the transformers 4.57 layout; expected.json: what transformers 5 makes of it."""
    os.makedirs(out, exist_ok=True)
    old = {k: v for k, v in cfg5.items() if k not in ("rope_parameters", "dtype", "transformers_version")}
    rope = cfg5["rope_parameters"]
    old.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"], rope_scaling=None,
               torch_dtype="float32", transformers_version="4.57.1", full_attention_interval=3)
    old.pop("layer_types")  # 4.57 files of the real model carry full_attention_interval and no layer_types
    old = dict(sorted(old.items()))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(old, f, indent=2)
        f.write("\n")
    back = Qwen3NextConfig.from_pretrained(out)
    expected = dict(rope_theta=back.rope_parameters["rope_theta"],
                    partial_rotary_factor=back.rope_parameters["partial_rotary_factor"],
                    layer_types=list(back.layer_types), head_dim=back.head_dim,
                    num_hidden_layers=back.num_hidden_layers, tie_word_embeddings=back.tie_word_embeddings,
                    mlp_only_layers=list(back.mlp_only_layers), linear_num_value_heads=back.linear_num_value_heads)
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2, sort_keys=True)
        f.write("\n")


def generate(out_root: str) -> None:
    torch.set_num_threads(1)  # bitwise-stable reductions
    for name in ("tiny", "odd", "tiny_mtp"):
        out = os.path.join(out_root, name)
        if os.path.exists(out):
            shutil.rmtree(out)
        seed = SEEDS[name]
        for attempt in range(50):
            model = build(name, seed + attempt)
            gen = torch.Generator().manual_seed(seed + attempt + 1)
            input_ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)
            golden, modules, gap = run_forward(model, input_ids)
            if gap >= MIN_TOPK_GAP:
                break
            print(f"{name}: seed {seed + attempt} has top-k gap {gap:.2e}; trying the next seed")
        else:
            raise RuntimeError(f"{name}: no seed with a top-k gap >= {MIN_TOPK_GAP}")
        save_dir(model, out, SHARD_SIZE[name])
        meta = dict(name=name, seed=seed + attempt, min_topk_gap=gap,
                    transformers=transformers.__version__, torch=torch.__version__.split("+")[0])
        if name != "tiny_mtp":
            meta.update(batch=BATCH, seq=SEQ,
                        hidden_states_note="entry 0 = embeddings, entry i = output of layer i-1, last entry = "
                                           "model.norm output (transformers 5 replaces it); last_layer_output is "
                                           "pre-norm")
        if name == "tiny_mtp":
            meta["mtp_tensors"] = add_mtp(out, model, seed + attempt)
        else:
            np.savez(os.path.join(out, "golden.npz"), **golden)
            np.savez(os.path.join(out, "modules.npz"), **modules)
            meta["modules"] = sorted({k.split(".")[0] for k in modules})
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{name}: seed {seed + attempt}, top-k gap {gap:.2e}, {size / 1024:.0f} KiB, files {sorted(os.listdir(out))}")
    with open(os.path.join(out_root, "odd", "config.json")) as f:
        write_457(os.path.join(out_root, "config_457"), json.load(f))
    write_rope(out_root)


ROPE_CASES = {  # rope_parameters beyond rope_theta / partial_rotary_factor, each read by transformers' own code
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
}


def write_rope(out: str) -> None:
    """rope_scaling.json: transformers' inverse frequencies and attention factor for each scaled-RoPE case."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

    cases = {}
    for name, params in ROPE_CASES.items():
        cfg = Qwen3NextConfig(head_dim=40, partial_rotary_factor=0.5, max_position_embeddings=32768,
                              rope_parameters={**params, "rope_theta": 1e6, "partial_rotary_factor": 0.5})
        rope = Qwen3NextRotaryEmbedding(cfg)
        cases[name] = dict(config=dict(head_dim=40, partial_rotary_factor=0.5, max_position_embeddings=32768,
                                       rope_theta=1e6, rope_scaling=params),
                           inv_freq=rope.inv_freq.tolist(), attention_scaling=float(rope.attention_scaling))
    with open(os.path.join(out, "rope_scaling.json"), "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")


def compare(a: str, b: str) -> list[str]:
    """Files that differ between two golden trees (npz and safetensors compared by content)."""
    diffs = []
    for dirpath, _, files in os.walk(a):
        for fn in files:
            pa = os.path.join(dirpath, fn)
            pb = os.path.join(b, os.path.relpath(pa, a))
            if not os.path.exists(pb):
                diffs.append(f"missing {pb}")
            elif fn.endswith(".npz"):
                za, zb = np.load(pa), np.load(pb)
                if sorted(za) != sorted(zb) or any(not np.array_equal(za[k], zb[k]) for k in za):
                    diffs.append(pa)
            elif fn.endswith(".safetensors"):
                ta, tb = load_file(pa), load_file(pb)
                if sorted(ta) != sorted(tb) or any(not torch.equal(ta[k], tb[k]) for k in ta):
                    diffs.append(pa)
            elif not filecmp.cmp(pa, pb, shallow=False):
                diffs.append(pa)
    return diffs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and diff with --out")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp)
            diffs = compare(tmp, args.out) + compare(args.out, tmp)
        print("identical" if not diffs else "DIFFERENT:\n  " + "\n  ".join(sorted(set(diffs))))
        return 1 if diffs else 0
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
