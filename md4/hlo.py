"""What a compiled XLA program costs per device, read from its HLO text: matrix-product FLOPs, bytes
moved to and from memory, bytes moved between devices.

XLA's own `cost_analysis()` counts the body of a loop once, whatever its trip count, gives nothing
for custom kernels (Pallas), and nothing at all on the GPU. The training step has loops (gradient
accumulation, the logits chunks) and may call the splash attention kernel, so md4 compile counts
from the compiled program instead, each loop body times its known trip count:

  flops: 2 m n k for every dot and convolution (wherever it sits: inside fusions too), and the
    matrix products of the splash attention kernels (forward 2, dq 3 and dkv 4 products of
    L x L x H per head, as the kernels compute them); element-wise work is not counted: it does
    not run on the matrix units whose peak the roofline uses.
  bytes_accessed: the operands and results of every instruction the device runs as a unit (top
    level: fusions, dots, copies, kernels), each read from and written to memory once.
  collective_bytes: the result of every collective (all-gather, all-reduce, reduce-scatter,
    all-to-all, collective-permute), counted once at an asynchronous collective's start.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import numpy as np


class Costs(NamedTuple):
  flops: float
  bytes_accessed: float
  collective_bytes: float


class _Inst(NamedTuple):
  name: str
  type: str  # "f32[4,8]{1,0}" or a tuple "(f32[4], s32[])".
  opcode: str
  operands: tuple[str, ...]
  args: str  # The text between the opcode's parentheses (a constant's literal).
  attrs: str


# A computation's first line: "%name (params) -> type {" once compiled, "name {" before.
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->.*)?\{\s*$")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast", "ragged-all-to-all")
# Instructions that move no data of their own at the top level.
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
               "async-start", "async-update", "async-done", "add-dependency", "domain"}
# Attention kernels: (name prefix, matrix products of L x L x H per head and example, the axis of L
# in their q-shaped result). Splash (md4/networks/attention.py, [..., heads, L, H]): the forward's
# q k^T and p v, dq's three and dkv's four with the scores recomputed. cuDNN's fused attention
# (its results are [B, heads, L, H], whatever the layout puts outermost): the forward's two, the
# backward's five.
_ATTENTION_KERNELS = (("splash_mha_fwd", 2, -2), ("splash_mha_dq", 3, -2),
                      ("splash_mha_dkv", 4, -2), ("__cudnn$fmhaSoftmaxBackward", 5, -2),
                      ("__cudnn$fmhaSoftmax", 2, -2))


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _ARRAY.findall(type_text)]


def _nbytes(type_text: str) -> int:
  return sum(_BYTES.get(dtype, 1) * math.prod(shape) for dtype, shape in _arrays(type_text))


def _split_type(rest: str) -> tuple[str, str]:
  """("type", "opcode(operands), attrs") from the text after "name = "."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  type_text, _, tail = rest.partition(" ")
  return type_text, tail


def _parse(text: str) -> tuple[dict[str, list[_Inst]], str | None]:
  computations: dict[str, list[_Inst]] = {}
  current, entry = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
      continue
    definition = _DEF.match(line)
    if current is None or definition is None:
      continue
    type_text, tail = _split_type(line[definition.end():])
    opcode, _, args = tail.partition("(")
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        end = i
        break
    # Operands are named with or without "%", and may carry their types inline.
    operands = tuple(re.findall(r"%?([A-Za-z_][\w.\-]*)", args[:end]))
    computations[current].append(
        _Inst(definition.group(1), type_text, opcode.strip(), operands, args[:end],
              args[end + 1:]))
  for name, insts in computations.items():
    defined = {inst.name for inst in insts}
    computations[name] = [inst._replace(operands=tuple(o for o in inst.operands if o in defined))
                          for inst in insts]
  return computations, entry


def _dims(attrs: str, key: str) -> list[int]:
  match = re.search(rf"{key}=\{{([\d,]*)\}}", attrs)
  return [int(d) for d in match.group(1).split(",") if d] if match else []


def _matmul_flops(inst: _Inst, types: dict[str, str]) -> float:
  result = _arrays(inst.type)
  if inst.opcode == "dot" and result and inst.operands and inst.operands[0] in types:
    lhs = _arrays(types[inst.operands[0]])[0][1]
    return 2.0 * math.prod(result[0][1]) * math.prod(lhs[d] for d in _dims(inst.attrs,
                                                                          "lhs_contracting_dims"))
  if inst.opcode == "convolution" and result and len(inst.operands) > 1:
    lhs_type, rhs_type = types.get(inst.operands[0]), types.get(inst.operands[1])
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
    if lhs_type is None or rhs_type is None or labels is None:
      return 0.0
    lhs, rhs, out = _arrays(lhs_type)[0][1], _arrays(rhs_type)[0][1], result[0][1]
    lhs_labels, rhs_labels, out_labels = labels.groups()
    window = re.search(r"window=\{([^}]*)\}", inst.attrs)
    window = window.group(1) if window else ""
    per_output = float(rhs[rhs_labels.index("i")])
    for d in range(sum(ch.isdigit() for ch in rhs_labels)):
      field = lambda key, default: _window_field(window, key, d, default)
      pad = field("pad", "0_0").split("_")
      per_output *= _taps(lhs[lhs_labels.index(str(d))], out[out_labels.index(str(d))],
                          int(field("size", "1")), int(field("stride", "1")), int(pad[0]),
                          int(field("lhs_dilate", "1")), int(field("rhs_dilate", "1")))
    return 2.0 * math.prod(out) * per_output
  if inst.opcode == "custom-call":
    for prefix, products, length_axis in _ATTENTION_KERNELS:
      if inst.name.startswith(prefix) or f'"{prefix}' in inst.attrs:
        # The output or gradient of q (or k): among the results of the highest rank (4, or 3 for one
        # example), the one with the smallest minor dimension (the others are scratch buffers of
        # lower rank, or the log-sum-exp padded to 128 lanes).
        rank = max((len(shape) for _, shape in result), default=0)
        if rank < 3:
          return 0.0
        q = min((shape for _, shape in result if len(shape) == rank), key=lambda shape: shape[-1])
        return products * 2.0 * math.prod(q) * q[length_axis]
  return 0.0


def _window_field(window: str, key: str, dim: int, default: str) -> str:
  """Dimension dim's value of a convolution window's field ("size=1x12 pad=0_0x11_11")."""
  match = re.search(rf"\b{key}=([\w\-]+(?:x[\w\-]+)*)", window)
  return match.group(1).split("x")[dim] if match else default


@functools.lru_cache(maxsize=None)
def _taps(in_size: int, out_size: int, size: int, stride: int, pad_lo: int, lhs_dilate: int,
          rhs_dilate: int) -> float:
  """The window taps per output position, on average, that land on an input element (not on
  padding, nor between the elements of a dilated input): XLA:TPU writes batched products as
  convolutions whose windows mostly fall on padding or holes."""
  o = np.arange(out_size)[:, None]
  k = np.arange(size)[None, :]
  pos = o * stride + k * rhs_dilate - pad_lo
  real = (pos >= 0) & (pos % lhs_dilate == 0) & (pos // lhs_dilate < in_size)
  return float(real.sum()) / out_size


def _trip_count(inst: _Inst, caller: dict[str, _Inst],
                computations: dict[str, list[_Inst]]) -> int:
  """A while loop's trip count: XLA's known_trip_count, else read from its counter: the condition
  `counter < N`, the counter's start in the loop's initial tuple and its step in the body (XLA:TPU's
  windowed matrix products count by 2); 1 if it cannot be read."""
  match = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', inst.attrs)
  if match:
    return int(match.group(1))
  names = dict(re.findall(r"\b(condition|body)=%?([\w.\-]+)", inst.attrs))
  cond = {i.name: i for i in computations.get(names.get("condition"), [])}
  body = {i.name: i for i in computations.get(names.get("body"), [])}
  literal = lambda insts, name: (int(insts[name].args) if name in insts and insts[name].opcode ==
                                 "constant" and insts[name].args.isdigit() else None)
  for compare in cond.values():
    if compare.opcode != "compare" or "direction=LT" not in compare.attrs:
      continue
    counter, bound = (cond.get(n) for n in compare.operands[:2])
    limit = literal(cond, compare.operands[1])
    index = re.search(r"index=(\d+)", counter.attrs) if counter else None
    if limit is None or index is None or counter.opcode != "get-tuple-element":
      continue
    i = int(index.group(1))
    root = next((x for x in body.values() if x.opcode == "tuple" and len(x.operands) > i), None)
    start, step = 0, 1
    init = caller.get(inst.operands[0]) if inst.operands else None
    if init is not None and init.opcode == "tuple" and len(init.operands) > i:
      start = literal(caller, init.operands[i]) or 0
    update = body.get(root.operands[i]) if root else None
    if update is not None and update.opcode == "add":
      step = next((v for v in (literal(body, o) for o in update.operands) if v), 1)
    return max(0, -(-(limit - start) // step))
  return 1


def _callees(inst: _Inst) -> list[str]:
  names = []
  for key in ("calls", "body", "condition", "to_apply", "branch_computations"):
    for match in re.finditer(rf"\b{key}=\{{?([^}}=]*?)(?:\}}|,\s*\w+=|$)", inst.attrs):
      names += re.findall(r"%?([\w.\-]+)", match.group(1))
  return names


_SLICING = ("dynamic-slice", "slice", "gather")
# XLA:TPU's custom calls that allocate, bitcast or bracket a collective: no memory traffic.
_BOOKKEEPING = re.compile(r'custom_call_target="(AllocateBuffer|AsyncCollectiveStart|'
                          r'AsyncCollectiveDone|ConcatBitcast|AssumeGatherIndicesInBound)"')


def _traffic(inst: _Inst, types: dict[str, str], computations: dict[str, list[_Inst]]) -> float:
  """Bytes an instruction run as a unit reads and writes: its operands and its result, except where
  it reads part of an operand (a slice) or writes part of one in place (a dynamic-update-slice, as
  each step of a loop does into the loop's stacked output), which count as that part only."""
  operands = [_nbytes(types.get(o, "")) for o in inst.operands]
  result = float(_nbytes(inst.type))
  if inst.opcode.endswith("-start") and inst.type.startswith("("):
    # An asynchronous copy or slice: its tuple holds the operand, the result and a context.
    arrays = _arrays(inst.type)
    return 2.0 * _BYTES.get(arrays[1][0], 1) * math.prod(arrays[1][1]) if len(arrays) > 1 else 0.0
  if inst.opcode in _SLICING:
    return 2.0 * result
  if inst.opcode == "dynamic-update-slice" and len(operands) > 1:
    return 2.0 * operands[1]
  fused = re.search(r"calls=%?([\w.\-]+)", inst.attrs) if inst.opcode == "fusion" else None
  body = computations.get(fused.group(1), []) if fused else []
  if not body:
    return result + sum(operands)
  by_name = {i.name: i for i in body}
  params = {i.name: int(i.args) for i in body if i.opcode == "parameter" and i.args.isdigit()}
  users: dict[str, list[_Inst]] = {}
  for i in body:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  root = body[-1]
  outputs = [by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
  for out in outputs:
    if out.opcode == "dynamic-update-slice" and len(out.operands) > 1:
      update = _nbytes(by_name[out.operands[1]].type) if out.operands[1] in by_name else 0
      result -= _nbytes(out.type) - update
      if out.operands[0] in params:
        operands[params[out.operands[0]]] = 0
  for name, index in params.items():
    uses = users.get(name, [])
    if uses and index < len(operands) and all(u.opcode in _SLICING and u.operands[0] == name
                                              for u in uses):
      operands[index] = min(operands[index], sum(_nbytes(u.type) for u in uses))
  return result + sum(operands)


def costs(text: str) -> Costs:
  """The per-device costs of a compiled HLO module (`compiled.as_text()`)."""
  computations, entry = _parse(text)

  @functools.lru_cache(maxsize=None)
  def total(name: str, top_level: bool) -> tuple[float, float, float]:
    insts = computations.get(name, [])
    types = {inst.name: inst.type for inst in insts}
    by_name = {inst.name: inst for inst in insts}
    flops = traffic = moved = 0.0
    for inst in insts:
      flops += _matmul_flops(inst, types)
      base = inst.opcode.removesuffix("-start").removesuffix("-done")
      if base in _COLLECTIVES:
        if not inst.opcode.endswith("-done"):
          sizes = [_BYTES.get(d, 1) * math.prod(s) for d, s in _arrays(inst.type)]
          tuple_start = inst.opcode.endswith("-start") and inst.type.startswith("(")
          moved += sizes[1] if tuple_start and len(sizes) > 1 else sum(sizes)
      elif (top_level and inst.opcode not in _NO_TRAFFIC and not inst.opcode.endswith("-done")
            and not _BOOKKEEPING.search(inst.attrs)):
        traffic += _traffic(inst, types, computations)
      control = top_level and inst.opcode in ("while", "conditional", "call", "async-start")
      for callee in _callees(inst):
        if callee == name or callee not in computations:
          continue
        repeat = _trip_count(inst, by_name, computations) if inst.opcode == "while" else 1
        f, t, m = total(callee, control)
        flops, traffic, moved = flops + repeat * f, traffic + repeat * t, moved + repeat * m
    return flops, traffic, moved

  return Costs(*total(entry, True)) if entry else Costs(0.0, 0.0, 0.0)
