"""What a compiled step costs each device: its memory, from XLA's own accounting, and the collectives it runs.

`compile_report(compiled)` takes any `jax.stages.Compiled` (the trainer's step, or an ahead-of-time compile for a
TPU topology on a CPU host) and returns
- `memory`: bytes per device of the arguments, outputs, temporaries, generated code and the argument bytes the
  outputs alias (donated buffers), from `compiled.memory_analysis()`; absent where the backend does not report it;
- `collectives`: how many instructions of each collective kind the optimised HLO holds. An asynchronous pair
  (`all-gather-start` / `all-gather-done`) counts once, as its kind. A collective inside a loop body counts once,
  not once per trip.
`collective_bytes(hlo_text)` gives the bytes of each kind's results per device, counted the same way (once per
instruction; of an asynchronous start, its largest result, the output buffer).
`format_compile_report(report)` writes it as one log line.
"""

from __future__ import annotations

import math
import re
from typing import Any

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute",
               "collective-broadcast")
MEMORY_FIELDS = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
                 "temporaries": "temp_size_in_bytes", "code": "generated_code_size_in_bytes",
                 "aliased": "alias_size_in_bytes"}
# An HLO instruction is `name = shape opcode(operands), attributes`: the opcode follows whitespace and precedes "(".
# The longer names come first so that "ragged-all-to-all" is not read as "all-to-all".
_OPCODE = re.compile(r"(?<=\s)(" + "|".join(sorted(map(re.escape, COLLECTIVES), key=len, reverse=True))
                     + r")(-start)?\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in _OPCODE.finditer(hlo_text):
        counts[match.group(1)] += 1
    return counts


_RESULT = re.compile(r"=\s*(.+?)\s+(" + "|".join(sorted(map(re.escape, COLLECTIVES), key=len, reverse=True))
                     + r")(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")


def _bits(element_type: str) -> int:
    return 8 if element_type == "pred" or element_type.startswith("f8") else 16 if element_type == "bf16" \
        else int(element_type[1:])


def collective_bytes(hlo_text: str) -> dict[str, int]:
    total = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        if not (match := _RESULT.search(line)):
            continue
        sizes = [math.prod(int(d) for d in dims.split(",") if d) * _bits(t) // 8
                 for t, dims in _ARRAY.findall(match.group(1))]
        total[match.group(2)] += (max(sizes) if match.group(3) else sum(sizes)) if sizes else 0
    return total


def compile_report(compiled) -> dict[str, Any]:
    analysis = compiled.memory_analysis()
    memory = {} if analysis is None else {name: int(getattr(analysis, attr)) for name, attr in MEMORY_FIELDS.items()
                                          if getattr(analysis, attr, None) is not None}
    return {"memory": memory, "collectives": count_collectives(compiled.as_text())}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def format_compile_report(report: dict[str, Any]) -> str:
    memory = ", ".join(f"{name} {_size(n)}" for name, n in report["memory"].items()) or "not reported"
    collectives = ", ".join(f"{kind} {n}" for kind, n in report["collectives"].items() if n) or "none"
    return f"per device: {memory}; collectives: {collectives}"
