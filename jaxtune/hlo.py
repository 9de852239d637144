"""What a compiled step does, read from its optimized HLO text: matmul FLOPs with every loop body
counted as many times as it runs, collectives per step, and the buffers worth a warning.

XLA's own `cost_analysis()` counts a while-loop body once (a 32-layer scan counts as one layer) and its
`optimal_seconds` comes out negative on TPU, so neither is a speed figure. Here each computation's
FLOPs are its dots/convolutions plus those of the computations it calls, a while body multiplied by
its trip count (read from the loop condition `i < N`, the counter's start and its step).
"""
from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\((.*)$")
_SHAPE = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128|token)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
         "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


def shapes(text: str) -> list[tuple[str, tuple]]:
    """(dtype, dims) of every array in a shape string (a tuple gives several)."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(text)]


def nbytes(dtype: str, dims: tuple) -> int:
    return math.prod(dims) * BYTES.get(dtype, 1)  # float8 and the rest: one byte


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result's shape text, layouts included
    op: str
    rest: str  # operands and attributes

    def operands(self) -> list[str]:
        depth, out, token = 0, [], ""
        for ch in self.rest:
            if ch in "({[":
                depth += 1
            elif ch in ")}]":
                if depth == 0:
                    break
                depth -= 1
            token += ch
        for part in token.split(","):
            m = re.search(r"%([\w.-]+)", part)
            if m:
                out.append(m.group(1))
        return out


def parse(text: str) -> tuple[dict, str]:
    """{computation name: [Instr]} and the entry computation's name."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = comps.setdefault(m.group(1), [])
            entry = m.group(1) if line.startswith("ENTRY") else entry
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            current.append(Instr(*m.groups()))
    return comps, entry


def _constant(instr: Instr | None) -> int | None:
    if instr is not None and instr.op == "constant":
        m = re.match(r"\s*(-?\d+)\)", instr.rest)
        return int(m.group(1)) if m else None
    return None


def trip_count(comps: dict, loop: Instr, caller: list[Instr]) -> int:
    """Iterations of a while loop: XLA's `known_trip_count` where it wrote one (CPU, GPU), else the
    condition's `i < N` (or N > i), the counter's start in the loop's initial tuple and its increment
    in the body (TPU); 1 when neither is found (counted once, as XLA's cost analysis does)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.rest)
    if known:
        return max(int(known.group(1)), 1)
    calls = dict(_CALLS.findall(loop.rest))
    cond, body = comps.get(calls.get("condition"), []), comps.get(calls.get("body"), [])
    root, args = _unfused(comps, cond[-1] if cond else None, {i.name: i for i in cond})
    if root is None or root.op != "compare" or len(args) < 2:
        return 1
    a, b = args[:2]
    direction = re.search(r"direction=(\w+)", root.rest)
    direction = direction.group(1) if direction else ""
    if _constant(a) is not None and direction in ("GT", "GE"):
        a, b, direction = b, a, {"GT": "LT", "GE": "LE"}[direction]
    limit = _constant(b)
    if limit is None or direction not in ("LT", "LE"):
        return 1
    index = _tuple_index(a, {i.name: i for i in cond})
    start, step = 0, 1
    if index is not None:
        defs = {i.name: i for i in caller}
        init = defs.get(loop.operands()[0]) if loop.operands() else None
        if init is not None and init.op == "tuple" and index < len(init.operands()):
            start = _constant(defs.get(init.operands()[index])) or 0
        body_defs = {i.name: i for i in body}
        if body and body[-1].op == "tuple" and index < len(body[-1].operands()):
            update, operands = _unfused(comps, body_defs.get(body[-1].operands()[index]), body_defs)
            if update is not None and update.op == "add":
                step = next((c for c in map(_constant, operands) if c), 1)
    count = (limit - start + (1 if direction == "LE" else 0) + step - 1) // max(step, 1)
    return max(count, 1)


def _unfused(comps: dict, instr: Instr | None, defs: dict) -> tuple:
    """(the operation, its operands as instructions of the caller): through a fusion that wraps a
    single operation (XLA:CPU wraps a loop's compare and add so), its parameters mapped back."""
    if instr is None:
        return None, []
    operands = [defs.get(n) for n in instr.operands()]
    if instr.op != "fusion":
        return instr, operands
    inner = comps.get(dict(_CALLS.findall(instr.rest)).get("calls"), [])
    if not inner:
        return None, []
    params = {i.name: int(re.match(r"\s*(\d+)", i.rest).group(1)) for i in inner if i.op == "parameter"}
    inner_defs = {i.name: i for i in inner}
    mapped = [operands[params[n]] if n in params and params[n] < len(operands) else inner_defs.get(n)
              for n in inner[-1].operands()]
    return inner[-1], mapped


def _tuple_index(instr: Instr | None, by_name: dict) -> int | None:
    """The tuple index a get-tuple-element (possibly behind a copy/convert) reads."""
    while instr is not None and instr.op in ("copy", "convert", "bitcast") and instr.operands():
        instr = by_name.get(instr.operands()[0])
    if instr is None or instr.op != "get-tuple-element":
        return None
    m = re.search(r"index=(\d+)", instr.rest)
    return int(m.group(1)) if m else None


def matmul_flops(instr: Instr, defs: dict) -> int:
    """2 x output elements x contracted elements of a dot or a convolution (TPU writes matmuls as
    convolutions with dim_labels such as bf_io->bf, or 0b2f1_1o2i0->0b1f2 with batch dimensions)."""
    out = shapes(instr.shape)
    if not out:
        return 0
    out_elems = math.prod(out[0][1])
    ops = [defs.get(n) for n in instr.operands()]
    if instr.op == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.rest)
        lhs = shapes(ops[0].shape)[0][1] if ops and ops[0] is not None else ()
        contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
        return 2 * out_elems * contracted
    labels = re.search(r"dim_labels=(\w+)_(\w+)->", instr.rest)
    if len(ops) < 2 or None in ops[:2] or not labels:
        return 0
    lhs, kernel = shapes(ops[0].shape)[0][1], shapes(ops[1].shape)[0][1]
    lhs_dims = dict(zip(labels.group(1), lhs))
    # per output element: the input features times the window taps that land on the input (TPU writes
    # batch dimensions of a dot as spatial ones whose window covers one input element)
    contracted = 1
    for label, size in zip(labels.group(2), kernel):
        if label == "i":
            contracted *= size
        elif label.isdigit():
            contracted *= min(size, lhs_dims.get(label, size))
    return 2 * out_elems * contracted


@dataclasses.dataclass
class Stats:
    flops: int = 0  # matmul FLOPs per execution of the module, loops unrolled
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> [executions per step, bytes per step]
    kernels: int = 0  # Pallas/Mosaic/Triton custom calls executed per step (their FLOPs are not in `flops`)
    gathers_of: dict = dataclasses.field(default_factory=dict)  # result dims of all-gathers -> executions
    buffers: set = dataclasses.field(default_factory=set)  # (dtype, dims) of every instruction result
    flops_by_op: dict = dataclasses.field(default_factory=dict)  # jax op_name (metadata) -> FLOPs


def analyze(text: str) -> Stats:
    """Stats of an optimized HLO module (the text of `compiled.as_text()`)."""
    comps, entry = parse(text)
    stats = Stats()

    # XLA:TPU (v5e) may split one collective into a chain of async fusions, each holding the whole op,
    # and spread them over a loop's iterations to hide their latency: a chain counts once, as often as
    # its least repeated piece runs.
    chains: dict[tuple, tuple] = {}

    def count(kind, out, times):
        n, size = stats.collectives.get(kind, (0, 0))
        stats.collectives[kind] = (n + times, size + times * sum(nbytes(*o) for o in out))
        for _, dims in out if kind == "all-gather" else ():  # a combined gather: each of its arrays
            stats.gathers_of[dims] = stats.gathers_of.get(dims, 0) + times

    def walk(name: str, times: int, seen: tuple = ()):
        instrs = comps.get(name, [])
        defs = {i.name: i for i in instrs}
        for instr in instrs:
            for dt, dims in shapes(instr.shape):
                stats.buffers.add((dt, dims))
            if instr.op in ("dot", "convolution"):
                flops = times * matmul_flops(instr, defs)
                stats.flops += flops
                op_name = re.search(r'op_name="([^"]*)"', instr.rest)
                key = op_name.group(1) if op_name else instr.name
                stats.flops_by_op[key] = stats.flops_by_op.get(key, 0) + flops
            kind = next((c for c in COLLECTIVES if instr.op in (c, c + "-start")), None)
            if kind:
                out = shapes(instr.shape)
                if instr.op == "collective-permute-start":  # (operand, result, sync flags...)
                    out = out[1:2]
                elif instr.op.endswith("-start") and len(out) > 1:  # an async start: (operands..., results...)
                    out = out[len(out) // 2:]
                chain = re.search(r'chain_id="(\w+)"', instr.rest)
                if chain:
                    key = (chain.group(1), kind, tuple(dims for _, dims in out))
                    previous = chains.get(key)
                    chains[key] = (kind, out, min(times, previous[2]) if previous else times)
                else:
                    count(kind, out, times)
            if instr.op == "custom-call" and re.search(r'custom_call_target="(tpu_custom_call|__gpu\$xla\.gpu\.triton)"',
                                                       instr.rest):
                stats.kernels += times
            calls = dict(_CALLS.findall(instr.rest))
            if instr.op == "while":
                n = trip_count(comps, instr, instrs)
                if calls.get("body") and calls["body"] not in seen:
                    walk(calls["body"], times * n, seen + (name,))
                continue
            # fusions, calls and async ops run their computation; a reduce's or sort's `to_apply` is scalar
            called = calls.get("calls") or (calls.get("to_apply") if instr.op == "call" else None)
            if called and called not in seen:
                walk(called, times, seen + (name,))
            branches = _BRANCHES.search(instr.rest)
            if branches:  # a conditional: counted as its first branch (jaxtune's steps have none)
                for b in re.findall(r"%([\w.-]+)", branches.group(1))[:1]:
                    walk(b, times, seen + (name,))

    walk(entry, 1)
    for kind, out, times in chains.values():
        count(kind, out, times)
    return stats
