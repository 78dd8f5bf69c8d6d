"""What a compiled step costs each device: its memory, from XLA's own accounting, and the collectives it runs.

`compile_report(compiled)` takes any `jax.stages.Compiled` (the trainer's step, or an ahead-of-time compile for a
TPU topology on a CPU host) and returns
- `memory`: bytes per device of the arguments, outputs, temporaries, generated code and the argument bytes the
  outputs alias (donated buffers), from `compiled.memory_analysis()`; absent where the backend does not report it;
- `collectives`: how many instructions of each collective kind the optimised HLO holds. An asynchronous pair
  (`all-gather-start` / `all-gather-done`) counts once, as its kind. A collective inside a loop body counts once,
  not once per trip.
`format_compile_report(report)` writes it as one log line. `collective_bytes(hlo_text)` sizes the collectives of a
step, loops' trips included (scripts/aot_compile.py reports them).
"""

from __future__ import annotations

import functools
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


# An array in an HLO shape, `bf16[8192,2,128]{2,1,0:T(2,128)(2,1)}`: element type and dimensions (layouts skipped).
_ARRAY = re.compile(r"\b(pred|bf16|c64|c128|f8e\w+|[suf]\d+)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([^\s(]+) ")  # a computation's header line, at column 0
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([^\s=]+) = (.+?) ([a-z][\w-]*)\(")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def _operands(text: str) -> list[str]:
    """The top-level comma-separated operands of the instruction text after its opcode's "(" ."""
    depth, start, out = 0, 0, []
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            if depth == 0:
                return out + [text[start:i]] if text[start:i].strip() else out
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    return out


def collective_bytes(hlo_text: str) -> dict[str, Any]:
    """What the collectives of one execution of an optimised HLO module move, per device:
    - `bytes` {kind: bytes}: per collective instruction the larger of its operands' and its results' bytes (the
      whole buffer it reads or writes: an all-gather's result, a reduce-scatter's operand; the echo of the operands
      in an asynchronous *-start's result tuple is not counted), times the trips of the loops it runs in;
    - `executed` {kind: instructions run}, loops' trips included;
    - `loops_without_trip_count`: while loops XLA gave no known trip count, counted as one trip.
    These are buffer sizes, not bytes on the wire (a ring all-gather over n devices sends (n - 1) / n of its
    result from each)."""
    shapes: dict[str, str] = {}
    callers: dict[str, list[tuple[str, int]]] = {}
    found: list[tuple[str, str, int]] = []  # (computation, kind, bytes)
    entry, computation, unknown = None, None, 0
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            entry = computation if line.startswith("ENTRY") else entry
            continue
        ins = _INSTRUCTION.match(line)
        if not ins:
            continue
        name, shape, opcode = ins.groups()
        shapes[name] = shape
        trips = _TRIPS.search(line)
        if opcode == "while" and not trips:
            unknown += 1
        for attribute, called in _CALLED.findall(line):
            loop = opcode == "while" and attribute in ("body", "condition")
            callers.setdefault(called, []).append((computation, int(trips.group(1)) if loop and trips else 1))
        for branches in _BRANCHES.findall(line):
            for called in re.findall(r"%([\w.-]+)", branches):
                callers.setdefault(called, []).append((computation, 1))
        kind = opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        operands = _operands(line[ins.end():])
        if kind == "ragged-all-to-all":  # (input, output buffer, offsets and sizes): only the input is sent
            operands = operands[:1]
        operand_bytes = 0
        for operand in operands:
            ref = re.search(r"%([\w.-]+)\s*$", operand)
            operand_bytes += _bytes(operand) if _ARRAY.search(operand) else _bytes(shapes.get(ref.group(1), ""))
        result_bytes = _bytes(shape)
        if opcode.endswith("-start") and shape.startswith("("):
            result_bytes -= operand_bytes
        found.append((computation, kind, max(operand_bytes, result_bytes)))

    @functools.cache
    def runs(c: str) -> int:
        return 1 if c == entry else sum(runs(parent) * trips for parent, trips in callers.get(c, ()))

    moved, executed = dict.fromkeys(COLLECTIVES, 0), dict.fromkeys(COLLECTIVES, 0)
    for c, kind, size in found:
        moved[kind] += runs(c) * size
        executed[kind] += runs(c)
    return {"bytes": moved, "executed": executed, "loops_without_trip_count": unknown}
