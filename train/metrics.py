"""What a run reports: the FLOP count behind MFU, and the sinks (metrics.jsonl, TensorBoard, a progress bar).

FLOPs per trained token (forward + backward = 3 x forward, a matmul of an [in, out] weight = 2 * in * out per token
forward, so 6 per weight), counted from the config, not from the parameter tree:
- Matmul weights a token actually uses: per attention layer q (with its gate), k, v, o projections; per Gated
  DeltaNet layer in_proj_qkvz, in_proj_ba, the depthwise conv (kernel * channels) and out_proj; per MoE layer the
  router, the top-k routed experts and the shared expert with its gate (a dense MLP where the layer is dense);
  the LM head; per MTP depth its fc, one attention layer with its MoE, and the LM head again. Embedding lookups are
  not matmuls and count 0. This is 6 * (active non-embedding parameters + LM head uses).
- Softmax attention: QK^T and AV cost 2 * 2 * head_dim * heads per (query, key) pair; causal attention over a
  row of T tokens averages T / 2 keys per query, so 6 * 4 * heads * head_dim * T / 2 per token and layer. This
  counts the whole row as context: packed documents attend less, and the count does not subtract that.
- Gated DeltaNet: per token and value head, the recurrent form does S^T k, the rank-one update and S^T q, three
  [dk, dv] products of 2 * dk * dv FLOPs: 6 * 3 * 2 * dk * dv * value_heads per token and layer. (The chunked
  kernels do somewhat more work within chunks; MFU counts the model's math, not the implementation's.)
MFU = FLOPs per token * tokens per second per device / the device's peak dense bf16 FLOP/s.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
from etils import epath

from qwen3next_jax.config import FULL, Qwen3NextConfig
from qwen3next_train import rundir

# Peak dense bf16 FLOP/s per device (vendor figures, without sparsity), matched against device_kind.
PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
    "TPU v5": 459e12,  # v5p chips call themselves "TPU v5": after "TPU v5 lite", which it would also match
}


def peak_flops(device: jax.Device) -> float | None:
    kind = device.device_kind
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak
    return None


def _attention_weights(c: Qwen3NextConfig) -> int:
    D, H, KV, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    return D * H * hd * 2 + 2 * D * KV * hd + H * hd * D


def _gdn_weights(c: Qwen3NextConfig) -> int:
    D, nk, nv, dk, dv = (c.hidden_size, c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim,
                         c.linear_value_head_dim)
    conv_channels = 2 * nk * dk + nv * dv
    return D * (2 * nk * dk + 2 * nv * dv) + D * 2 * nv + conv_channels * c.linear_conv_kernel_dim + nv * dv * D


def _ffn_weights(c: Qwen3NextConfig, sparse: bool) -> int:
    D = c.hidden_size
    if not sparse:
        return 3 * D * c.intermediate_size
    return (D * c.num_experts + c.num_experts_per_tok * 3 * D * c.moe_intermediate_size
            + 3 * D * c.shared_expert_intermediate_size + D)


def flops_per_token(c: Qwen3NextConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token, by part (see the module docstring)."""
    matmul = attention = gdn = 0.0
    for i in range(c.num_hidden_layers):
        kind, sparse = c.layer_signature(i)
        matmul += (_attention_weights(c) if kind == FULL else _gdn_weights(c)) + _ffn_weights(c, sparse)
        if kind == FULL:
            attention += 4 * c.num_attention_heads * c.head_dim * seq_len / 2
        else:
            gdn += 3 * 2 * c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim
    head = c.hidden_size * c.vocab_size
    matmul += head
    for _ in range(c.mtp_num_hidden_layers):
        matmul += 2 * c.hidden_size * c.hidden_size + _attention_weights(c) + _ffn_weights(c, c.num_experts > 0)
        matmul += head
        attention += 4 * c.num_attention_heads * c.head_dim * seq_len / 2
    parts = {"matmul": 6 * matmul, "attention": 3 * attention, "gdn": 3 * gdn}
    parts["total"] = sum(parts.values())
    return parts


def _step(line: str) -> int | None:
    """A record's step; None for a line a kill cut short (only ever the last one)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class _BucketEventFile:
    """A TensorBoard event file on a bucket, through epath. An object cannot be appended to, so each flush uploads
    the whole file (as tensorboardX's own GCS writer does; SummaryWriter flushes every 2 minutes and at close)."""

    def __init__(self, path: str):
        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _BucketEventFiles:
    """tensorboardX's writer factory for a URI scheme: event files through epath (a bucket has no directories to
    make)."""

    def open(self, path: str) -> _BucketEventFile:
        return _BucketEventFile(path)

    def directory_check(self, path: str) -> None:
        pass


class MetricsLog:
    """metrics.jsonl (one JSON object per record) and TensorBoard scalars; written by the lead process only (the
    others pass writer=False and write nothing).

    Locally each record is appended and flushed at once. On a bucket, where an object cannot be appended to, the
    records are kept in memory and the file is uploaded whole by flush(), which the loop calls before every
    checkpoint, and at close; the records a kill loses are those after the last checkpoint, which a resume writes
    again anyway.

    On a resume from step s > 0, records after s (written by the interrupted run after its last checkpoint, and
    about to be written again identically) are dropped, so the file reads exactly as if the run had never stopped;
    the file is rewritten atomically (rundir.write_atomically), so a kill during the rewrite loses nothing.
    TensorBoard purges them the same way. A run that starts at step 0 over an earlier metrics.jsonl keeps that file
    beside it (metrics.1.jsonl, ...).
    """

    def __init__(self, run_dir: epath.PathLike, resume_step: int, tensorboard: bool = True, writer: bool = True):
        self._file = self._lines = self._tb = None
        if not writer:
            return
        self.path = epath.Path(run_dir) / "metrics.jsonl"
        kept = []
        if self.path.exists():
            if resume_step == 0:
                rundir.keep_earlier_version(self.path)
            else:
                kept = [line for line in self.path.read_text().splitlines(keepends=True)
                        if _step(line) is not None and _step(line) <= resume_step]
                rundir.write_atomically(self.path, "".join(kept))
        if rundir.is_remote(self.path):
            self._lines = kept
        else:
            self._file = self.path.open("a")
        if tensorboard:
            from tensorboardX import SummaryWriter, record_writer

            logdir = self.path.parent / "tensorboard"
            if rundir.is_remote(logdir):
                record_writer.register_writer_factory(os.fspath(logdir).partition(":")[0], _BucketEventFiles())
            self._tb = SummaryWriter(os.fspath(logdir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, record: dict[str, Any], tensorboard: bool = True) -> None:
        line = json.dumps({"step": step, **record}) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        elif self._lines is not None:
            self._lines.append(line)
        if self._tb is not None and tensorboard:
            for k, v in record.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        """Makes every record written so far durable (on a bucket, by uploading the file)."""
        if self._lines is not None:
            rundir.write_atomically(self.path, "".join(self._lines))

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
