"""What goes beside an exported trained model so that transformers and vLLM can serve it: the tokenizer files and
generation_config.json.

A run trained on a `tokenizer.json` brings that file (and its siblings tokenizer_config.json and
special_tokens_map.json when present). A run trained on UTF-8 bytes gets a real tokenizer.json, built with the
`tokenizers` library, that encodes text to exactly those ids: byte b is token `<0xBB>` with id b (a BPE without
merges whose every character falls back to its UTF-8 bytes), and the end-of-document id is the special token
`<|endoftext|>`. Decoding joins the bytes and reads them as UTF-8. Unlike the trainer's byte tokenizer, this one
reads the 13 characters `<|endoftext|>` written out in a text as the end-of-document token, as every Hugging Face
tokenizer does with its special tokens.
"""

from __future__ import annotations

import os
import shutil

from qwen3next_jax.config import Qwen3NextConfig
from qwen3next_jax.hf.files import GENERATION_CONFIG_NAME, write_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_SIBLINGS = (TOKENIZER_CONFIG_FILE, "special_tokens_map.json")
EOS_TOKEN = "<|endoftext|>"


def byte_tokenizer(eos_id: int):
    """A tokenizers.Tokenizer whose ids are the UTF-8 bytes of the text (0..255) and `eos_id` for EOS_TOKEN."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if eos_id < 256:
        raise ValueError(f"the end-of-document id {eos_id} collides with the byte ids 0..255")
    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {EOS_TOKEN: eos_id}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok


def write_byte_tokenizer(out_dir: str | os.PathLike, eos_id: int, model_max_length: int) -> list[str]:
    """tokenizer.json (byte_tokenizer) and a tokenizer_config.json that makes transformers load it as a fast
    tokenizer with EOS_TOKEN as its eos_token. Returns the file names."""
    byte_tokenizer(eos_id).save(os.path.join(out_dir, TOKENIZER_FILE))
    write_json(os.path.join(out_dir, TOKENIZER_CONFIG_FILE), {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False})
    return [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]


def copy_tokenizer(tokenizer_json: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """The run's tokenizer.json (under that name) and the siblings it has. Returns the file names."""
    shutil.copyfile(tokenizer_json, os.path.join(out_dir, TOKENIZER_FILE))
    written = [TOKENIZER_FILE]
    for name in TOKENIZER_SIBLINGS:
        sibling = os.path.join(os.path.dirname(os.path.abspath(tokenizer_json)), name)
        if os.path.exists(sibling):
            shutil.copyfile(sibling, os.path.join(out_dir, name))
            written.append(name)
    return written


def write_generation_config(out_dir: str | os.PathLike, cfg: Qwen3NextConfig, eos_id: int | None) -> str:
    """generation_config.json with the model config's bos/eos/pad ids; `eos_id` (the end-of-document id the run
    trained with) stands in for an eos_token_id the model config leaves unset."""
    ids = {"bos_token_id": cfg.bos_token_id,
           "eos_token_id": cfg.eos_token_id if cfg.eos_token_id is not None else eos_id,
           "pad_token_id": cfg.pad_token_id}
    write_json(os.path.join(out_dir, GENERATION_CONFIG_NAME), {k: v for k, v in ids.items() if v is not None})
    return GENERATION_CONFIG_NAME
