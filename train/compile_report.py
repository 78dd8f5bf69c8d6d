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

import dataclasses
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
_CONSTANT = re.compile(r"constant\((\d+)\)")


def _dims(shape_text: str) -> list[int]:
    match = _ARRAY.search(shape_text)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def _operands(text: str) -> list[str]:
    """The top-level comma-separated operands in the instruction text after its opcode's "(" ."""
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


@dataclasses.dataclass
class _Instruction:
    computation: str
    opcode: str
    shape: str  # the result's shape text
    operands: list[str]  # each operand's shape text (inline, or its definition's)
    line: str


def _walk(hlo_text: str) -> tuple[list[_Instruction], Any, int]:
    """The instructions of an optimised HLO module, `runs(computation)`: how many times one execution of the
    module runs that computation (loop trips multiplied through nested loops and calls), and the number of while
    loops whose trips are unknown (counted as one). A loop's trips are XLA's known_trip_count where it gives one,
    else the bound of its condition's `counter < constant` (how lax.scan and fori_loop lower: from 0 by 1)."""
    shapes: dict[str, str] = {}
    callers: dict[str, list[tuple[str, Any]]] = {}
    bounds: dict[str, int] = {}  # condition computation -> the constant its ROOT compare(..., direction=LT) reads
    constants: dict[str, int] = {}
    out: list[_Instruction] = []
    entry = computation = None
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
        constant = _CONSTANT.search(line) if opcode == "constant" else None
        if constant:
            constants[name] = int(constant.group(1))
        if opcode == "compare" and "ROOT" in line[:ins.end()] and "direction=LT" in line:
            bound = re.search(r"%([\w.-]+)\s*$", _operands(line[ins.end():])[-1])
            if bound and bound.group(1) in constants:
                bounds[computation] = constants[bound.group(1)]
        known = _TRIPS.search(line)
        called = dict((attribute, c) for attribute, c in _CALLED.findall(line))
        for attribute, c in called.items():
            if opcode == "while" and attribute in ("body", "condition"):
                trips = int(known.group(1)) if known else ("condition", called.get("condition"))
            else:
                trips = 1
            callers.setdefault(c, []).append((computation, trips))
        for branches in _BRANCHES.findall(line):
            for c in re.findall(r"%([\w.-]+)", branches):
                callers.setdefault(c, []).append((computation, 1))
        operands = []
        for operand in _operands(line[ins.end():]):
            ref = re.search(r"%([\w.-]+)\s*$", operand)
            operands.append(operand if _ARRAY.search(operand) or not ref else shapes.get(ref.group(1), ""))
        out.append(_Instruction(computation, opcode, shape, operands, line))

    unknown = set()

    def trips_of(trips) -> int:
        if isinstance(trips, int):
            return trips
        if trips[1] in bounds:
            return bounds[trips[1]]
        unknown.add(trips[1])
        return 1

    @functools.cache
    def runs(c: str) -> int:
        return 1 if c == entry else sum(runs(parent) * trips_of(t) for parent, t in callers.get(c, ()))

    for c in callers:
        runs(c)
    return out, runs, len(unknown)


def collective_bytes(hlo_text: str) -> dict[str, Any]:
    """What the collectives of one execution of an optimised HLO module move, per device:
    - `bytes` {kind: bytes}: per collective instruction the larger of its operands' and its results' bytes (the
      whole buffer it reads or writes: an all-gather's result, a reduce-scatter's operand; the echo of the operands
      in an asynchronous *-start's result tuple is not counted), for a ragged-all-to-all the smaller of its input
      and its result; times the times it runs (loop trips, _walk);
    - `executed` {kind: instructions run};
    - `loops_without_trip_count`: while loops whose trips are unknown, counted as one trip.
    These are buffer sizes, not bytes on the wire (a ring all-gather over n devices sends (n - 1) / n of its
    result from each)."""
    instructions, runs, unknown = _walk(hlo_text)
    moved, executed = dict.fromkeys(COLLECTIVES, 0), dict.fromkeys(COLLECTIVES, 0)
    for ins in instructions:
        kind = ins.opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        if kind == "ragged-all-to-all":
            # (input, output buffer, offsets, sizes): it sends at most its input and receives at most its result,
            # and one of them is a dropless exchange's padded buffer, mostly empty.
            size = min(_bytes(ins.operands[0]), _bytes(ins.shape))
        else:
            operand_bytes = sum(map(_bytes, ins.operands))
            result_bytes = _bytes(ins.shape)
            if ins.opcode.endswith("-start") and ins.shape.startswith("("):
                result_bytes -= operand_bytes
            size = max(operand_bytes, result_bytes)
        moved[kind] += runs(ins.computation) * size
        executed[kind] += runs(ins.computation)
    return {"bytes": moved, "executed": executed, "loops_without_trip_count": unknown}


def hlo_flops(hlo_text: str) -> dict[str, Any]:
    """The FLOPs of the module's dots and convolutions (XLA on TPU writes matmuls as convolutions), 2 per
    multiply-add, and of its kernels (custom calls) as their own cost estimates give them (a Pallas kernel's
    `cost_estimate`):
    - `flops`: counting the times each runs (loop trips, _walk);
    - `flops_once`: counting each once (as XLA's cost_analysis counts a loop's body);
    - `grouped_matmul_flops`: the part of `flops` in the kernels of jax.lax.ragged_dot, whose estimates count every
      row of their operands (rows past the groups included);
    - `kernels_without_estimate`: kernel instructions that give none (not counted), and `loops_without_trip_count`.
    Elementwise work is not counted."""
    instructions, runs, unknown = _walk(hlo_text)
    total = once = blind = grouped = 0
    for ins in instructions:
        out = math.prod(_dims(ins.shape))
        if ins.opcode == "dot":
            lhs = _dims(ins.operands[0])
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.line)
            flops = 2 * out * (math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
                               if contracting else 1)
        elif ins.opcode == "convolution":
            # Each output element multiplies the kernel's elements of one output feature: all of the kernel but
            # its output-feature dimension ('o' in dim_labels' kernel part), whatever the grouping.
            rhs = _dims(ins.operands[1])
            labels = re.search(r"dim_labels=\w+_(\w+)->", ins.line)
            flops = 2 * out * math.prod(rhs) // rhs[labels.group(1).index("o")] if labels and rhs else 0
        elif ins.opcode == "custom-call" and "tpu_custom_call" in ins.line:
            estimate = re.search(r'"cost_estimate":\{"flops":"(\d+)"', ins.line)
            blind += estimate is None
            flops = int(estimate.group(1)) if estimate else 0
            grouped += flops * runs(ins.computation) if 'op_name="ragged-dot' in ins.line or "/ragged_dot" in ins.line \
                else 0
        else:
            continue
        once += flops
        total += flops * runs(ins.computation)
    return {"flops": total, "flops_once": once, "grouped_matmul_flops": grouped, "kernels_without_estimate": blind,
            "loops_without_trip_count": unknown}
