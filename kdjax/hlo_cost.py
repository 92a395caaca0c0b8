"""FLOPs and memory traffic of a compiled XLA program, read from its optimized HLO text.

XLA's own `compiled.cost_analysis()` counts the body of every while loop once (checked with the
TPU compile-only client: a 10-step `lax.scan` of a matmul reports the FLOPs of one step), and
kdjax's steps loop over loss chunks, micro-batches and decoding steps. This module sums the
program itself instead:

  flops   2 x (output elements) x (contracted size) of every dot and convolution, fused or not;
  bytes   for every kernel XLA launches (a top-level instruction: a fusion, a copy, a collective,
          a custom call...), the bytes of its operands and its result that live in HBM (memory
          space 0; arrays XLA placed in on-chip memory, `S(1)` and up in the layout, move no HBM
          traffic), counted once per operand;
  loops   each while loop's body (and condition) counted `trip count` times, the trip count read
          from the loop condition (`counter < constant`, as lax.scan, lax.map and kdjax's decoding
          loops compile); a loop whose bound is not a constant counts once and is named in `notes`.

Every kernel's bytes are attributed to the kdjax source line it came from (the HLO's stack-frame
tables), so a report can name the ops that move the most bytes. The byte count is what the
kernels read and write once; XLA's tiling may re-read an operand (its own estimate, `bytes
accessed`, includes such re-reads but counts loops once), so this is a floor on HBM traffic.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
            "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
            "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(ITEMSIZE, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
# instructions that launch nothing (views, bookkeeping) or whose cost is counted where it is used
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
        "replica-id", "opt-barrier", "add-dependency", "domain"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "ragged-all-to-all")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    args: str
    operands: list[str]
    attrs: str


@dataclasses.dataclass
class Cost:
    """Totals of a program: flops, HBM bytes, collective bytes (results of the collectives), and
    HBM bytes by source (`where` -> bytes), plus notes on what could not be counted."""
    flops: float = 0.0
    bytes: float = 0.0
    collective_bytes: float = 0.0
    by_source: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    notes: list = dataclasses.field(default_factory=list)

    def add(self, other: "Cost", times: float = 1.0):
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        self.collective_bytes += times * other.collective_bytes
        for k, v in other.by_source.items():
            self.by_source[k] += times * v
        self.notes += [n for n in other.notes if n not in self.notes]


def array_bytes(shape: str, hbm_only: bool = True) -> float:
    """Bytes of every array in an HLO shape string (a tuple sums its elements), as laid out: the
    minor dimensions padded to the layout's tile (`T(8,128)`); with hbm_only, arrays in another
    memory space (layout `S(n)`, n > 0: on-chip) count 0."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if hbm_only and layout and re.search(r"S\([1-9]\d*\)", layout):
            continue
        sizes = [int(d) for d in dims.split(",") if d]
        order = re.match(r"\{([\d,]*)", layout or "")
        tile = re.search(r"T\(([\d,]+)\)", layout or "")
        if order and order.group(1) and tile:
            minor_to_major = [int(d) for d in order.group(1).split(",")]
            for dim, t in zip(minor_to_major, reversed([int(x) for x in tile.group(1).split(",")])):
                sizes[dim] = -(-sizes[dim] // t) * t
        total += ITEMSIZE[dtype] * math.prod(sizes)
    return total


def dims_of(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def conv_macs(attrs: str, lhs: list[int], kernel: list[int], out: list[int]) -> float:
    """Multiply-adds of an HLO convolution: every output element (batch, feature) sums over the
    kernel's input features and the window taps that land on real input (not padding, not the holes
    of lhs dilation: XLA writes batched matmuls as such convolutions)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    lhs_l, ker_l, out_l = labels.groups()
    window = dict(re.findall(r"(\w+)=([\w\-]+)", (re.search(r"window=\{([^}]*)\}", attrs) or [""," "])[1]))
    spatial = sorted(c for c in out_l if c.isdigit())

    def per_dim(key, default):
        vals = window.get(key)
        return [default] * len(spatial) if vals is None else vals.split("x")

    size, stride = per_dim("size", "1"), per_dim("stride", "1")
    pad, lhs_d, rhs_d = per_dim("pad", "0_0"), per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
    taps = 1
    for j, d in enumerate(spatial):
        n_in, n_out = lhs[lhs_l.index(d)], out[out_l.index(d)]
        k, s, ld, rd = int(size[j]), int(stride[j]), int(lhs_d[j]), int(rhs_d[j])
        lo = int(pad[j].split("_")[0])
        last = (n_in - 1) * ld
        pos = np.arange(n_out)[:, None] * s + np.arange(k)[None, :] * rd - lo
        taps *= int(np.sum((pos >= 0) & (pos <= last) & (pos % ld == 0)))
    rest = math.prod(n for n, c in zip(out, out_l) if not c.isdigit())
    return float(rest * kernel[ker_l.index("i")] * taps)


def _split_type(rest: str) -> tuple[str, str]:
    """'TYPE opcode(...)...' -> (TYPE, remainder); TYPE may be a parenthesised tuple."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    i = rest.index(" ")
    return rest[:i], rest[i + 1:]


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    shape, rest = _split_type(line[m.end():])
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    depth, start = 0, op.end() - 1
    for i in range(start, len(rest)):
        depth += rest[i] == "("
        depth -= rest[i] == ")"
        if depth == 0:
            break
    args, attrs = rest[start + 1:i], rest[i + 1:]
    return Instr(m.group(1), shape, op.group(1), args, re.findall(r"%([\w.\-]+)", args), attrs)


class Module:
    """An optimized HLO module (compiled.as_text()): computations, instructions, source lines."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instr]] = {}
        self.entry = None
        self.frames = _stack_frames(text)
        current = None
        for line in text.splitlines():
            h = _HEADER.match(line)
            if h:
                current = h.group(2)
                self.computations[current] = []
                if h.group(1):
                    self.entry = current
                continue
            if current is None:
                continue
            if line.strip() == "}":
                current = None
                continue
            ins = _parse_instr(line)
            if ins is not None:
                self.computations[current].append(ins)
        self.by_name = {i.name: i for comp in self.computations.values() for i in comp}
        self._memo: dict[str, Cost] = {}

    # ---- FLOPs inside a fused (or called) computation ---------------------------------------------
    def flops(self, ins: Instr) -> float:
        """FLOPs of one dot / convolution instruction from its shapes."""
        out = math.prod(dims_of(ins.shape))
        if ins.opcode == "dot":
            lhs = dims_of(self.by_name[ins.operands[0]].shape)
            m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
            contract = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m else 1
            return 2.0 * out * contract
        if ins.opcode == "convolution":
            return 2.0 * conv_macs(ins.attrs, dims_of(self.by_name[ins.operands[0]].shape),
                                   dims_of(self.by_name[ins.operands[1]].shape), dims_of(ins.shape))
        return 0.0

    def fused_flops(self, computation: str) -> float:
        total = 0.0
        for ins in self.computations.get(computation, []):
            total += self.flops(ins)
            for called in re.findall(r"calls=%([\w.\-]+)", ins.attrs):
                total += self.fused_flops(called)
        return total

    # ---- a computation whose instructions are kernels (the entry, loop bodies, branches) --------
    def cost(self, computation: str | None = None, loops: bool = True) -> Cost:
        """Cost of a computation; loops=False counts every loop body once (as XLA's analysis does)."""
        computation = computation or self.entry
        if (computation, loops) in self._memo:
            return self._memo[computation, loops]
        total = Cost()
        for ins in self.computations[computation]:
            total.add(self.kernel_cost(ins, loops))
        self._memo[computation, loops] = total
        return total

    def kernel_cost(self, ins: Instr, loops: bool = True) -> Cost:
        op, c = ins.opcode, Cost()
        if op in FREE or op.endswith("-start"):
            return c
        if op == "while":
            body = re.search(r"body=%([\w.\-]+)", ins.attrs).group(1)
            cond = re.search(r"condition=%([\w.\-]+)", ins.attrs).group(1)
            trips = self.trip_count(cond) if loops else 1
            if trips is None:
                trips = 1
                c.notes.append(f"a while loop ({self.source(ins)}) has no constant bound: its body is counted once")
            c.add(self.cost(body, loops), trips)
            c.add(self.cost(cond, loops), trips)
            return c
        if op == "conditional":
            branches = re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                                                  or re.search(r"(true_computation=.*)", ins.attrs)).group(1))
            costs = [self.cost(b, loops) for b in branches if b in self.computations]
            if costs:
                c.add(max(costs, key=lambda x: x.bytes))
            return c
        if op == "call":
            c.add(self.cost(re.search(r"to_apply=%([\w.\-]+)", ins.attrs).group(1), loops))
            return c
        operands = ins.operands
        where = self.source(ins)
        if op.endswith("-done"):  # an async pair: the start's operands in, the done's result out
            start = self.by_name.get(operands[0])
            operands = start.operands if start is not None else []
            if start is not None:
                named = 'op_name="' in start.attrs or not (operands and operands[0] in self.by_name)
                where = self.source(start) if named else f"{self.source(self.by_name[operands[0]])} ({op})"
        seen = set()
        moved = array_bytes(ins.shape)
        for name in operands:
            if name not in seen and name in self.by_name:
                seen.add(name)
                moved += array_bytes(self.by_name[name].shape)
        c.bytes = moved
        c.by_source[where] += moved
        if op == "fusion":
            c.flops = sum(self.fused_flops(x) for x in re.findall(r"calls=%([\w.\-]+)", ins.attrs))
        else:
            c.flops = self.flops(ins)
        if op.replace("-done", "") in COLLECTIVES:
            c.collective_bytes = array_bytes(ins.shape, hbm_only=False)
        return c

    def trip_count(self, cond: str) -> int | None:
        """N of a loop condition `counter < N` (N a constant); None when there is none."""
        consts = {}
        for ins in self.computations.get(cond, []):
            if ins.opcode == "constant":
                m = re.fullmatch(r"\s*(-?\d+)\s*", ins.args)
                if m:
                    consts[ins.name] = int(m.group(1))
        bounds = [consts[i.operands[1]] for i in self.computations.get(cond, [])
                  if i.opcode == "compare" and "direction=LT" in i.attrs and len(i.operands) == 2
                  and i.operands[1] in consts]
        return max(bounds) if bounds else None

    # ---- where an instruction came from ------------------------------------------------------
    def source(self, ins: Instr) -> str:
        """'kdjax/model.py:87 attend (dot_general)': the innermost kdjax frame of the instruction
        and the JAX primitive, or the primitive alone."""
        m = re.search(r'op_name="([^"]*)"', ins.attrs)
        prim = m.group(1).rsplit("/", 1)[-1] if m else ins.opcode
        prim = re.sub(r"^(jvp|transpose|vmap|remat|checkpoint)\((.*)\)$", r"\2", prim)
        f = re.search(r"stack_frame_id=(\d+)", ins.attrs)
        where = self.frames(int(f.group(1))) if f else None
        label = f"{ins.opcode} {prim}" if ins.opcode not in ("fusion",) else prim
        return f"{where} ({label})" if where else label


def _stack_frames(text: str):
    """A function: stack frame id -> 'kdjax/FILE.py:LINE function' of its innermost kdjax frame."""
    section, tables = None, {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    for line in text.splitlines():
        s = line.strip()
        if s in tables:
            section = s
            continue
        if not s or s.startswith(("%", "ENTRY", "HloModule")):
            if s.startswith(("%", "ENTRY")):
                break
            section = None if not s else section
            continue
        if section:
            key, _, value = s.partition(" ")
            if key.isdigit():
                tables[section][int(key)] = value
    files, funcs, locs, frames = (tables[k] for k in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"))

    def field(value, name):
        m = re.search(rf"{name}=(\d+)", value)
        return int(m.group(1)) if m else None

    def resolve(frame_id: int) -> str | None:
        for _ in range(64):  # innermost first, up through parent frames
            frame = frames.get(frame_id)
            if frame is None:
                return None
            loc = locs.get(field(frame, "file_location_id"))
            if loc is not None:
                path = files.get(field(loc, "file_name_id"), "").strip('"')
                if "/kdjax/" in path:
                    func = funcs.get(field(loc, "function_name_id"), "").strip('"')
                    return f"kdjax/{path.rsplit('/kdjax/', 1)[1]}:{field(loc, 'line')} {func}"
            parent = field(frame, "parent_frame_id")  # printed as the parent's id + 1; 0 = none
            if not parent or parent - 1 == frame_id:
                return None
            frame_id = parent - 1
        return None

    return resolve


def program_cost(hlo_text: str) -> tuple[Cost, Cost]:
    """Costs of the entry computation of an optimized HLO module: (loops counted by their trips,
    every loop body once as XLA's cost analysis counts it)."""
    module = Module(hlo_text)
    return module.cost(), module.cost(loops=False)
