"""TFLite models (.tflite, and the TFLite sections of .litertlm and .task files), read-only.

A FlatBuffer with identifier "TFL3" (schema: tensorflow/lite/schema/schema.fbs): subgraphs of
tensors and operators, buffers holding the weights (inside the FlatBuffer, or after it at
`offset`/`size` for models over 2 GB), signatures such as `prefill_128` and `decode` whose inputs
include the KV caches. Every offset is checked (flatbuf.py) and every buffer must lie inside the
file; tensor data are numpy views of the mapping.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelFileError
from .flatbuf import FlatBuffer, Table, map_file

# TensorType: name, bits per element (schema.fbs)
TENSOR_TYPES = {
    0: ("FLOAT32", 32),
    1: ("FLOAT16", 16),
    2: ("INT32", 32),
    3: ("UINT8", 8),
    4: ("INT64", 64),
    5: ("STRING", 0),
    6: ("BOOL", 8),
    7: ("INT16", 16),
    8: ("COMPLEX64", 64),
    9: ("INT8", 8),
    10: ("FLOAT64", 64),
    11: ("COMPLEX128", 128),
    12: ("UINT64", 64),
    13: ("RESOURCE", 0),
    14: ("VARIANT", 0),
    15: ("UINT32", 32),
    16: ("UINT16", 16),
    17: ("INT4", 4),
    18: ("BFLOAT16", 16),
}
_FLOATS = {
    "FLOAT32": np.dtype("<f4"),
    "FLOAT16": np.dtype("<f2"),
    "BFLOAT16": np.dtype("<u2"),
    "FLOAT64": np.dtype("<f8"),
}
_INTS = {"INT8": np.int8, "UINT8": np.uint8, "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4")}
_BLOCKWISE = 2  # QuantizationDetails union: 1 CustomQuantization, 2 BlockwiseQuantization
# BuiltinOperator codes (schema.fbs) of the ops an LLM export is made of; others read as BUILTIN_<n>
BUILTIN_OPS = {
    0: "ADD",
    2: "CONCATENATION",
    6: "DEQUANTIZE",
    7: "EMBEDDING_LOOKUP",
    9: "FULLY_CONNECTED",
    14: "LOGISTIC",
    18: "MUL",
    19: "RELU",
    22: "RESHAPE",
    25: "SOFTMAX",
    28: "TANH",
    36: "GATHER",
    39: "TRANSPOSE",
    40: "MEAN",
    41: "SUB",
    42: "DIV",
    43: "SQUEEZE",
    45: "STRIDED_SLICE",
    47: "EXP",
    49: "SPLIT",
    53: "CAST",
    55: "MAXIMUM",
    57: "MINIMUM",
    59: "NEG",
    65: "SLICE",
    66: "SIN",
    69: "TILE",
    70: "EXPAND_DIMS",
    74: "SUM",
    75: "SQRT",
    76: "RSQRT",
    78: "POW",
    83: "PACK",
    92: "SQUARE",
    99: "SQUARED_DIFFERENCE",
    107: "GATHER_ND",
    108: "COS",
    114: "QUANTIZE",
    123: "SELECT_V2",
    126: "BATCH_MATMUL",
    130: "BROADCAST_TO",
    150: "GELU",
    151: "DYNAMIC_UPDATE_SLICE",
    206: "STABLEHLO_COMPOSITE",
}
_COMPOSITE_OPTIONS = 21  # BuiltinOptions2 union: StableHLOCompositeOptions


@dataclass
class Quantization:
    """How a tensor's integers map to reals: `scheme` is none, per-tensor, per-channel or blockwise."""

    scheme: str
    axis: int | None = None  # per-channel: the quantized dimension
    block_size: int | None = None  # blockwise: elements per scale, along the last dimension
    scales: np.ndarray | None = None  # per-tensor / per-channel (float32)
    zero_points: np.ndarray | None = None
    scale_tensor: int | None = None  # blockwise: the tensor (of the same subgraph) holding the scales

    def describe(self) -> str:
        if self.scheme == "per-channel":
            return f"per-channel (axis {self.axis})"
        if self.scheme == "blockwise":
            return f"blockwise ({self.block_size})"
        return self.scheme


@dataclass
class TFLiteTensor:
    name: str
    type: str
    shape: tuple[int, ...]
    buffer: int  # index into the model's buffers (0: none)
    quantization: Quantization
    nbytes: int  # bytes of its data (0: an activation, no constant data)
    data: np.ndarray | None = None  # uint8 view of the data
    subgraph: int = 0


@dataclass
class Operator:
    op: str  # the builtin's name ("FULLY_CONNECTED"), or a custom op's code
    inputs: tuple[int, ...]  # tensor indices of its subgraph; -1: an optional input left out
    outputs: tuple[int, ...]
    composite: str | None = None  # STABLEHLO_COMPOSITE: its name ("odml.rms_norm") ...
    decomposition: int | None = None  # ... and the subgraph that spells it out


@dataclass
class Subgraph:
    name: str
    tensors: list[TFLiteTensor]
    inputs: list[int]
    outputs: list[int]
    ops: list[Operator]

    @property
    def operators(self) -> int:
        return len(self.ops)


@dataclass
class Signature:
    key: str
    subgraph: int
    inputs: dict[str, int]  # name -> tensor index in the subgraph
    outputs: dict[str, int]


@dataclass
class TFLiteModel:
    path: Path
    version: int
    description: str | None
    subgraphs: list[Subgraph]
    signatures: list[Signature]
    buffers: list[memoryview]
    external_buffers: int  # buffers stored after the FlatBuffer (offset/size)
    size: int
    metadata: dict[str, int] = field(default_factory=dict)  # name -> buffer index

    def dequantize(self, t: TFLiteTensor) -> np.ndarray:
        """A constant tensor's values as float32: float types as they are, INT8 / INT4 / INT16 / UINT8
        through their per-tensor, per-channel or blockwise scales."""
        if t.data is None:
            raise ModelFileError(f"{self.path}: tensor {t.name!r} has no constant data")
        if t.type in _FLOATS:
            raw = t.data.view(_FLOATS[t.type])
            values = (raw.astype(np.uint32) << 16).view(np.float32) if t.type == "BFLOAT16" else raw
            return values.astype(np.float32).reshape(t.shape)
        if t.type == "INT4":
            packed = t.data
            q = np.empty(packed.size * 2, np.int8)
            q[0::2], q[1::2] = packed & 0x0F, packed >> 4  # the even element in the low nibble
            q = np.where(q >= 8, q - 16, q)[: math.prod(t.shape)].astype(np.float32)
        elif t.type in _INTS:
            q = t.data.view(_INTS[t.type]).astype(np.float32)
        else:
            raise ModelFileError(f"{self.path}: tensor {t.name!r} of type {t.type} has no numeric values")
        q = q.reshape(t.shape)
        quant = t.quantization
        if quant.scheme == "blockwise":
            graph = self.subgraphs[t.subgraph].tensors
            index = quant.scale_tensor
            scale = graph[index] if index is not None and 0 <= index < len(graph) else None
            blocks = (*t.shape[:-1], t.shape[-1] // quant.block_size)
            if scale is None or scale.type not in _FLOATS or scale.shape != blocks:
                raise ModelFileError(f"{self.path}: tensor {t.name!r} lacks scales of shape {list(blocks)}")
            scales = np.repeat(self.dequantize(scale), quant.block_size, axis=-1)
            return q * scales
        if quant.scheme in ("per-tensor", "per-channel"):
            axis = quant.axis or 0
            view = [1] * len(t.shape)
            if quant.scheme == "per-channel":
                view[axis] = -1
            zero = (
                quant.zero_points if quant.zero_points is not None and len(quant.zero_points) else np.zeros(1)
            )
            return (q - zero.astype(np.float32).reshape(view)) * quant.scales.reshape(view)
        return q

    def weights(self) -> list[TFLiteTensor]:
        """Every tensor with constant data, once per buffer (the subgraphs of an LLM export share them)."""
        seen, out = set(), []
        for graph in self.subgraphs:
            for t in graph.tensors:
                if t.nbytes and t.buffer not in seen:
                    seen.add(t.buffer)
                    out.append(t)
        return out


def read_tflite(buf: memoryview, path: Path, base: int = 0, what: str = "TFLite model") -> TFLiteModel:
    """Parse a TFLite FlatBuffer held in `buf` (a whole file, or a section of one starting at byte
    `base`; external buffer offsets count from the start of `buf`)."""
    fb = FlatBuffer(buf, path, what, base)
    model = fb.root(b"TFL3")
    buffers, external = [], 0
    for i, b in enumerate(model.tables(4, "buffers")):
        offset, size = b.scalar(1, "u64"), b.scalar(2, "u64")
        if offset > 1:  # stored after the FlatBuffer
            if offset + size > len(buf):
                raise fb.fail(
                    offset, f"buffer {i} ({size} bytes at {offset}) lies outside the {len(buf)} bytes"
                )
            buffers.append(buf[offset : offset + size])
            external += 1
        else:
            buffers.append(b.bytes(0, f"buffer {i}"))
    codes = []
    for c in model.tables(1, "operator codes"):
        code = max(c.scalar(0, "i8"), c.scalar(3, "i32"))  # the deprecated byte, or the int32 past 127
        custom = c.string(1, "a custom op code")
        codes.append(custom if code == 32 and custom else BUILTIN_OPS.get(code, f"BUILTIN_{code}"))
    subgraphs = [_subgraph(fb, g, j, buffers, codes) for j, g in enumerate(model.tables(2, "subgraphs"))]
    for j, graph in enumerate(subgraphs):
        for op in graph.ops:
            if op.decomposition is not None and not 0 <= op.decomposition < len(subgraphs):
                raise fb.fail(
                    0, f"subgraph {j}: composite {op.composite!r} names subgraph {op.decomposition}"
                )
    signatures = []
    for s in model.tables(7, "signature_defs"):
        key = s.string(2, "a signature key") or ""
        index = s.scalar(4, "u32")
        if index >= len(subgraphs):
            raise fb.fail(s.at, f"signature {key!r} names subgraph {index} of {len(subgraphs)}")
        maps = [
            {
                m.string(0, "a signature tensor name") or "": m.scalar(1, "u32")
                for m in s.tables(k, "signature tensors")
            }
            for k in (0, 1)
        ]
        for name, tensor in (*maps[0].items(), *maps[1].items()):
            if tensor >= len(subgraphs[index].tensors):
                raise fb.fail(
                    s.at, f"signature {key!r}: {name!r} is tensor {tensor} of {len(subgraphs[index].tensors)}"
                )
        signatures.append(Signature(key, index, maps[0], maps[1]))
    metadata = {m.string(0, "a metadata name") or "": m.scalar(1, "u32") for m in model.tables(6, "metadata")}
    return TFLiteModel(
        path=path,
        version=model.scalar(0, "u32"),
        description=model.string(3, "the description"),
        subgraphs=subgraphs,
        signatures=signatures,
        buffers=buffers,
        external_buffers=external,
        size=len(buf),
        metadata=metadata,
    )


def _subgraph(fb: FlatBuffer, g: Table, j: int, buffers: list[memoryview], codes: list[str]) -> Subgraph:
    tensors = []
    for k, t in enumerate(g.tables(0, f"subgraph {j} tensors")):
        name = t.string(3, "a tensor name") or f"tensor {k}"
        type_id = t.scalar(1, "i8")
        if type_id not in TENSOR_TYPES:
            raise fb.fail(t.at, f"tensor {name!r} has unknown type {type_id}")
        type_name, bits = TENSOR_TYPES[type_id]
        shape = tuple(int(d) for d in t.array(0, "i4", f"the shape of {name!r}"))
        if len(shape) > 8 or any(d < 0 for d in shape):
            raise fb.fail(t.at, f"tensor {name!r} has shape {list(shape)}")
        buffer = t.scalar(2, "u32")
        if buffer >= max(len(buffers), 1):
            raise fb.fail(t.at, f"tensor {name!r} names buffer {buffer} of {len(buffers)}")
        data = buffers[buffer] if buffers else memoryview(b"")
        expected = math.prod(shape) * bits // 8 + (math.prod(shape) * bits % 8 > 0)
        if len(data) and bits and len(data) != expected:
            raise fb.fail(
                t.at,
                f"tensor {name!r} ({type_name} {list(shape)}) needs {expected} bytes, its buffer has {len(data)}",
            )
        quant = _quantization(t.table(4, f"the quantization of {name!r}"), name, shape, fb)
        view = np.frombuffer(data, np.uint8) if len(data) else None
        tensors.append(TFLiteTensor(name, type_name, shape, buffer, quant, len(data), view, j))
    inputs = [int(i) for i in g.array(1, "i4", f"subgraph {j} inputs")]
    outputs = [int(i) for i in g.array(2, "i4", f"subgraph {j} outputs")]
    if any(not 0 <= i < len(tensors) for i in inputs + outputs):
        raise fb.fail(g.at, f"subgraph {j} names an input or output tensor that it does not have")
    ops = []
    for o in g.tables(3, f"subgraph {j} operators"):
        code = o.scalar(0, "u32")
        if code >= len(codes):
            raise fb.fail(o.at, f"subgraph {j}: an operator names op code {code} of {len(codes)}")
        ins = tuple(int(i) for i in o.array(1, "i4", f"subgraph {j} operator inputs"))
        outs = tuple(int(i) for i in o.array(2, "i4", f"subgraph {j} operator outputs"))
        if any(not -1 <= i < len(tensors) for i in ins) or any(not 0 <= i < len(tensors) for i in outs):
            raise fb.fail(o.at, f"subgraph {j}: a {codes[code]} operator names a tensor it does not have")
        composite = decomposition = None
        if o.scalar(11, "u8") == _COMPOSITE_OPTIONS:
            options = o.table(12, "composite options")
            if options is not None:
                composite = options.string(0, "a composite name") or ""
                decomposition = options.scalar(1, "i32")
        ops.append(Operator(codes[code], ins, outs, composite, decomposition))
    return Subgraph(g.string(4, "a subgraph name") or "", tensors, inputs, outputs, ops)


def _quantization(q: Table | None, name: str, shape: tuple[int, ...], fb: FlatBuffer) -> Quantization:
    if q is None:
        return Quantization("none")
    scales = q.array(2, "f4", f"the scales of {name!r}")
    zero_points = q.array(3, "i8", f"the zero points of {name!r}")
    if len(zero_points) not in (0, 1, len(scales)):
        raise fb.fail(q.at, f"tensor {name!r} has {len(zero_points)} zero points for {len(scales)} scales")
    if q.scalar(4, "u8") == _BLOCKWISE:
        details = q.table(5, f"the blockwise quantization of {name!r}")
        block = details.scalar(2, "i32") if details else 0
        if block <= 0 or not shape or shape[-1] % block:
            raise fb.fail(q.at, f"tensor {name!r} has blocks of {block} along a dimension of {shape[-1:]}")
        return Quantization("blockwise", block_size=block, scale_tensor=details.scalar(0, "i32"))
    if len(scales) == 0:
        return Quantization("none")
    axis = q.scalar(6, "i32")
    if len(scales) == 1:
        return Quantization("per-tensor", scales=scales, zero_points=zero_points)
    if not 0 <= axis < len(shape) or shape[axis] != len(scales):
        raise fb.fail(
            q.at, f"tensor {name!r} has {len(scales)} scales for axis {axis} of shape {list(shape)}"
        )
    return Quantization("per-channel", axis=axis, scales=scales, zero_points=zero_points)


def open_tflite(path: str | os.PathLike) -> TFLiteModel:
    """A .tflite file, memory-mapped."""
    path = Path(path)
    buf = map_file(path)
    if len(buf) < 8:
        raise ModelFileError(f"{path}: too short for a TFLite model ({len(buf)} bytes)")
    return read_tflite(buf, path)
