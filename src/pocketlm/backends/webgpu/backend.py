"""The WebGPU backend: the CPU backend's op set, run by WGSL kernels through wgpu-py.

Activations are `GpuTensor`s: a scratch buffer, an element offset and a shape. They support what
architecture files do with activations besides calling ops (`+`, `*` by a tensor or a number,
`reshape`, row slices, `len`), so the same model code records GPU work. Nothing is computed
until `to_host` submits the pass and reads the logits back.

Weights are uploaded once at load, in their own bits: 4-bit types as nibbles (`kernels.int4`'s
layout), 5-bit ones as nibbles and a plane of fifth bits (`_five_bits`), the others as int8
(`kernels.int8`'s layout), each with per-sub-block scales (and offsets), float16 where exact; float
types as float32. Matrices larger than the device's binding limit are split by rows; matrices
multiplied by one input (q/k/v, gate/up) are stacked into one at first use, and run as one dispatch.
The KV cache of every layer holds every position (sliding windows are applied by the mask).

Fusion: some ops return a tensor whose computation is only described (`_Lazy`) until something
reads it. The op that reads it may take the computation into its own kernel: an RMSNorm into the
next linear layer (a few tokens), an activation times a product into the down projection, a
residual add into the linear layer or norm before it, per-head q/k norms and RoPE into the
KV-cache write and the attention kernel; anything else computes it first (`_ready`). A llama
layer's decode step is 5 dispatches.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ...errors import ModelFileError, UnsupportedError
from ...formats.gguf import Tensor
from ...formats.quants import GGMLType, decompose, dequantize
from ...kernels import int4, int8
from ..base import ALIBI, EXACT_GELU, LAYER_NORM
from .device import WORKGROUP, Buffer, Device, grid, wgsl_constants

_FLOAT = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
FUSE_TOKENS = 8  # norms and gated activations are fused into linear layers for at most this many tokens
ID_LIMIT = 0xFFFFFFFF  # the embed kernels' id_limit when every id is a row
BIG_ROWS = 8192  # one-token products of at least this many rows: 4 threads a row (16 rows a workgroup)
MAX_SPLITS = 256  # attention over a few tokens is split into key ranges of a multiple of 64 keys
TOP_K = 256  # top_logits: the largest top-k cut chosen on the GPU
TOP_TIES = 256  # ... and the most logits equal to the k-th it reads back
# topk.wgsl's dispatches, in order: (variant, shift, workgroups: "one" or "all" of the row)
TOP_K_PASSES = (
    ("topk+pick", 32, "one"),
    *(
        (kernel, shift, size)
        for shift in (24, 16, 8, 0)
        for kernel, size in (("topk+count", "all"), ("topk+pick", "one"))
    ),
    ("topk+gather", 0, "all"),
)
_GATED = {"silu": 2, "gelu_tanh": 3, "gelu": 4}  # the linear kernel's x_mode for act(x) * x2


class _Lazy:
    """A tensor's computation, described but not yet dispatched: which one (`computation`: "norm",
    "linear", "act", "gated", "merge", "rope" or "resnorm": a residual plus a normed branch) and
    what it reads (`args`); `out` is the tensor it will fill. Shared by the views of that tensor."""

    __slots__ = ("computation", "out", "args", "done")

    def __init__(self, computation: str, out: GpuTensor, **args):
        self.computation, self.out, self.args, self.done = computation, out, args, False


def _ops() -> dict[str, int]:
    """The elementwise kernel's op codes, as its WGSL declares them (const OP_ADD: u32 = 0u; ...)."""
    return wgsl_constants("elementwise", "OP")


class GpuTensor:
    """float32 values [shape] at element `offset` of a device buffer."""

    __array_ufunc__ = None  # numpy scalars defer to our operators

    def __init__(
        self,
        ops: WebGPUBackend,
        buf: Buffer,
        shape: tuple[int, ...],
        offset: int = 0,
        lazy: _Lazy | None = None,
    ):
        self.ops, self.buf, self.shape, self.offset = ops, buf, tuple(int(s) for s in shape), offset
        self.lazy = lazy  # how it will be computed, while it is not yet
        # a holder of a scratch buffer taken in this pass (Device.scratch hands it out again once none is)
        self._held = buf.role == "scratch" and buf.pass_number == ops.device.pass_number
        self._pass = buf.pass_number
        if self._held:
            buf.users += 1

    def __del__(self):
        buf, device = self.buf, self.ops.device
        # held in the pass being recorded (a later pass has every buffer free, or handed it out again)
        if self._held and buf.pass_number == self._pass == device.pass_number:
            buf.users -= 1
            if buf.users == 0:
                device.release(buf)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape) -> GpuTensor:
        shape = list(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)
        if -1 in shape:
            shape[shape.index(-1)] = self.size // -math.prod(shape)
        return GpuTensor(self.ops, self.buf, tuple(shape), self.offset, self.lazy)

    def __getitem__(self, key) -> GpuTensor:
        """Rows along the first axis: an index or a slice with step 1."""
        row = self.size // self.shape[0]
        if isinstance(key, int):
            key = key % self.shape[0]
            return GpuTensor(self.ops, self.buf, self.shape[1:], self.offset + key * row, self.lazy)
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            shape = (max(0, stop - start), *self.shape[1:])
            return GpuTensor(self.ops, self.buf, shape, self.offset + start * row, self.lazy)
        raise UnsupportedError(f"webgpu tensors take row indices and slices, not {key!r}")

    def __add__(self, other):
        if isinstance(other, (int, float, np.floating)):
            return self.ops.elementwise("shift", self, s=float(other))
        return self.ops.elementwise("add", self, other)

    __radd__ = __add__

    def __sub__(self, other):
        return self.ops.elementwise("sub", self, other)

    def __mul__(self, other):
        if isinstance(other, GpuTensor) or np.ndim(other):  # a tensor, or host values broadcast
            return self.ops.elementwise("mul", self, other)
        return self.ops.elementwise("scale", self, s=float(other))

    __rmul__ = __mul__


@dataclass
class Recording:
    """One pass of a model, recorded as it ran: `commands` (pipeline, bind group, workgroups) to
    replay it, `trace` (kernel, parameter block id, buffer ids, workgroups) for a web package's plan,
    `out` the tensor it leaves its result in, `fills` the streamed table rows it reads, and the
    device's `generation` it binds (a replaced buffer makes it stale)."""

    commands: list
    trace: list
    out: GpuTensor
    fills: list
    generation: int


class CapturedStep:
    """A model's pass over one token, recorded for each cache at its first call and replayed after:
    the pass reads its position and token from the step buffer, so the model's Python runs once a
    cache (longer passes run as they are). `step(ids, cache)` leaves the logits on the GPU."""

    def __init__(self, ops: WebGPUBackend, forward):
        self.ops, self.forward = ops, forward
        self.recordings = weakref.WeakKeyDictionary()  # cache -> Recording

    def __call__(self, ids: np.ndarray, cache) -> GpuTensor:
        ops, device = self.ops, self.ops.device
        ids = np.asarray(ids, np.int64)
        if len(ids) != 1:
            return ops._ready(self.forward(ops, ids, cache))
        recorded = self.recordings.get(cache)
        if recorded is None or recorded.generation != device.generation:
            recorded = ops.record(lambda: self.forward(ops, ids, cache))
            self.recordings[cache] = recorded
            return recorded.out
        ops.replay(recorded, ids, cache.offset)
        cache.offset += 1
        return recorded.out

    def dispatches(self, cache) -> int | None:
        """Dispatches of the step recorded for `cache` (None before its first)."""
        recorded = self.recordings.get(cache)
        return len(recorded.commands) if recorded else None


class GpuLayerCache:
    """Keys and values of every position of one layer, in device memory."""

    shared = False  # set by KVCache when a SharedLayerCache reads this layer's `last`

    def __init__(self, ops: WebGPUBackend, capacity: int, n_kv_heads: int, k_dim: int, v_dim: int, window):
        self.ops, self.capacity, self.window = ops, capacity, window
        self.k_shape, self.v_shape = (capacity, n_kv_heads, k_dim), (capacity, n_kv_heads, v_dim)
        self.keys = ops.device.buffer(4 * math.prod(self.k_shape), "cache")
        self.values = ops.device.buffer(4 * math.prod(self.v_shape), "cache")

    def update_and_fetch(self, k: GpuTensor, v: GpuTensor, start: int):
        self.ops.write_kv(k, v, self.keys, self.values, start)
        fetched = (
            GpuTensor(self.ops, self.keys, self.k_shape),
            GpuTensor(self.ops, self.values, self.v_shape),
            None,
        )
        if self.shared:
            self.last = fetched
        return fetched

    def copy(self) -> GpuLayerCache:
        """The same positions in buffers of its own (a KVCache copy marks it shared again)."""
        if self.ops._pending_kv:  # written, and submitted before the copy's own submission
            self.ops.flush_kv()
            self.ops.device.finish()
        twin = object.__new__(GpuLayerCache)
        twin.ops, twin.capacity, twin.window = self.ops, self.capacity, self.window
        twin.k_shape, twin.v_shape = self.k_shape, self.v_shape
        twin.keys = self.ops.device.buffer(self.keys.size, "cache")
        twin.values = self.ops.device.buffer(self.values.size, "cache")
        self.ops.device.copy(self.keys, twin.keys)
        self.ops.device.copy(self.values, twin.values)
        return twin

    @property
    def nbytes(self) -> int:
        return self.keys.size + self.values.size


FLOAT32, INT8, NIBBLES, NIBBLES5 = 0, 1, 2, 3  # how a matrix's values are held (the kernels' weight_kind)
# linear / matmul kernel variant of each (5-bit values: the 4-bit code, plus their fifth bits)
_VARIANT = {FLOAT32: "f32", INT8: "int8", NIBBLES: "int4", NIBBLES5: "int4+int5"}
FIVE_BIT = (GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K)  # 32 levels per value, 32 values per scale
# the linear kernel's input variant, by x_mode
_INPUT = {0: "plain", 1: "norm", 2: "gated", 3: "gated", 4: "gated", 5: "merged", 6: "resnorm"}


def _linear_kernel(variant: str, source: str, cols: int, one_token: bool) -> str:
    """The linear kernel's variant for weights held as `variant`, input read as `source`: +one
    stages one token's input in workgroup memory, in the +wide array beyond XS_SMALL values."""
    kernel = f"linear+{variant}+{source}"
    if one_token:
        kernel += "+one" if cols <= wgsl_constants("linear", "XS")["small"] else "+one+wide"
    return kernel


def _held(w: Tensor) -> int:
    """How a matrix is held on the GPU: float types as FLOAT32, 4-bit types of whole 64-value runs
    as NIBBLES (4 bits still), 5-bit types of whole 128-value groups as NIBBLES5 (5 bits still),
    every other block type repacked to INT8."""
    if w.type in _FLOAT:
        return FLOAT32
    if w.type in FIVE_BIT and len(w.shape) == 2 and w.shape[1] % 128 == 0:
        return NIBBLES5
    return NIBBLES if int4.fits(w.type, w.shape) else INT8


def _five_bits(w: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q5_0 / Q5_1 / Q5_K matrix [rows, cols] -> (uint8 [rows, 5 cols / 8], scale, offset [rows,
    cols / 32]). A row: its values' low four bits in kernels.int4's layout (cols / 2 bytes: runs of 64
    values in 32 bytes, value j and 32 + j in byte j), then one 32-bit word for each 16 bytes of them
    (cols / 8 bytes): bit k holds the fifth bit of the value in the low nibble of byte k of those 16,
    bit 16 + k that of the value in its high nibble. Q5_K's values are 0..31 with an offset each 32."""
    rows, cols = w.shape
    if w.type in (GGMLType.Q5_0, GGMLType.Q5_1):
        return _five_bits_of_blocks(w)
    q, scale, offset = decompose(w.data, w.type)
    scale = scale.reshape(rows, cols // 32).astype(np.float32)
    offset = offset.reshape(rows, cols // 32).astype(np.float32)
    q = q.reshape(rows, cols // 64, 2, 2, 16).astype(np.uint8)  # [row, run, nibble half, 16 bytes, byte]
    nibbles = (q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)  # [row, run, 16 bytes, byte]
    fifths = (q >> 4).transpose(0, 1, 3, 2, 4)  # [row, run, 16 bytes, half, byte]: 32 bits
    words = np.packbits(fifths.reshape(rows, -1, 32), axis=-1, bitorder="little")  # little-endian words
    packed = np.concatenate([nibbles.reshape(rows, -1), words.reshape(rows, -1)], axis=1)
    return packed, scale, offset


def _five_bits_of_blocks(w: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_five_bits` of a Q5_0 / Q5_1 matrix straight from its blocks (a run of 64 values is two blocks:
    d, [m,] qh (bit j: value j's fifth bit), 16 bytes holding values j and 16 + j), without unpacking
    every value: ~10x quicker, a second of Gemma 3 270M's start on the CPU that feeds the GPU."""
    rows, cols = w.shape
    size = 22 if w.type == GGMLType.Q5_0 else 24
    blocks = np.asarray(w.data, np.uint8).reshape(rows, cols // 64, 2, size)
    d = blocks[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32).reshape(rows, -1)
    if w.type == GGMLType.Q5_0:  # d (q - 16): the 0..31 kept, the shift moved into the offset
        qh_at, scale, offset = 2, d, -16 * d
    else:
        qh_at, scale = 4, d
        offset = blocks[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32).reshape(rows, -1)
    qh = blocks[..., qh_at : qh_at + 4].copy().view("<u4")[..., 0]  # [row, run, block]
    qs = blocks[..., qh_at + 4 :]  # [row, run, block, 16]
    first, second = qs[:, :, 0], qs[:, :, 1]
    # byte j of a run: value j (block 0) low, value 32 + j (block 1) high; j < 16 from the blocks'
    # low nibbles, 16 + j from their high ones
    nibbles = np.concatenate([(first & 15) | (second << 4), (first >> 4) | (second & 0xF0)], axis=2)
    low, high = qh[:, :, 0], qh[:, :, 1]  # the words of bytes 0-15 and 16-31 of each run
    words = np.stack([(low & 0xFFFF) | (high << 16), (low >> 16) | (high & 0xFFFF0000)], axis=2)
    packed = np.concatenate(
        [nibbles.reshape(rows, -1), words.astype("<u4").reshape(rows, -1).view(np.uint8)], axis=1
    )
    return packed, scale, offset


def _as_half(scale: np.ndarray, offset: np.ndarray) -> bool:
    """Whether a matrix's scales (and offsets) are held as float16: where each is one exactly (the
    float16 fields of every 32-value block type, and Q4_0's and Q5_0's shifts of them) and a row
    holds an even number (whole 32-bit words a row, for stacking by rows)."""

    def exact(a: np.ndarray) -> bool:  # and normal: a driver may flush float16 subnormals to zero
        with np.errstate(over="ignore"):
            normal = bool(np.all((a == 0) | (np.abs(a) >= 2.0**-14)))
            return normal and bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))

    return scale.shape[1] % 2 == 0 and exact(scale) and (offset.shape[1] == 0 or exact(offset))


_STACKS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))  # a decoder's stacked matrices


def _held_alike(tensors) -> dict[str, int]:
    """Storage for the matrices of a layer's stacks (q/k/v, gate/up) that the stack's others are held
    unlike (Gemma 3 Q4_K_M's Q8_0 value matrix beside its Q5_0 query and key ones): INT8 for all of
    that stack, so that they stack (one dispatch for three costs a few more bytes than three)."""
    stacks: dict[tuple, list[Tensor]] = {}
    for w in tensors:
        parts = w.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and len(w.shape) == 2:
            for i, roles in enumerate(_STACKS):
                if parts[2] in roles:
                    stacks.setdefault((parts[1], i), []).append(w)
    alike = {}
    for ws in stacks.values():
        held = {_held(w) for w in ws}
        if len(held) > 1 and FLOAT32 not in held and _stack_as_int8(ws):
            alike.update((w.name, INT8) for w in ws)
    return alike


def _stack_as_int8(weights) -> bool:
    """Whether these matrices, held as INT8, would stack: the same values per scale (Q6_K has 16, the
    others 32) and all with offsets or none (Q4_K M's Q6_K value matrix beside Q4_K query and key ones
    would not: those stay 4 bits, in three products)."""
    with_offset = (GGMLType.Q4_1, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K)
    return len({(w.type == GGMLType.Q6_K, w.type in with_offset) for w in weights}) == 1


def table_rows(name: str, n_rows: int, ids, stride: int, offset: int, limit: int) -> np.ndarray:
    """The rows of a table read row by row that tokens `ids` read: id * stride + offset, id 0 for ids
    at or past `limit` (the webgpu backend's streamed tables; a web package's fills)."""
    ids = np.asarray(ids, np.int64)
    rows = np.where(ids < limit, ids, 0) * stride + offset
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n_rows):
        raise ModelFileError(
            f"tensor {name!r} has {n_rows} rows but row {int(rows.max())} was asked for: "
            "the file's vocabulary and table disagree"
        )
    return rows


class _Matrix:
    """An uploaded weight matrix: row chunks of (first row, rows, buffers [values, scale, offset] or
    [float32 values]); a matrix stacked with others reads its rows from `row0` of the stack's.
    `storage`: FLOAT32, INT8 (one byte a value, `kernels.int8`'s repacking), NIBBLES (4-bit types kept
    in 4 bits, `kernels.int4`'s layout: runs of 64 values in 32 bytes, value j and 32 + j in byte j) or
    NIBBLES5 (5-bit types in 5 bits, `_five_bits`); `half`: scales and offsets held as float16."""

    def __init__(
        self,
        shape,
        chunks,
        storage: int,
        sub: int = 0,
        has_offset: bool = False,
        row0: int = 0,
        half: bool = False,
    ):
        self.shape, self.chunks, self.storage = shape, chunks, storage
        self.sub, self.has_offset, self.row0, self.half = sub, has_offset, row0, half

    @property
    def quantized(self) -> bool:
        return self.storage != FLOAT32

    @property
    def row_bytes(self) -> list[int]:
        """Bytes a row in each buffer (0: a shared placeholder)."""
        cols = self.shape[1]
        if self.storage == FLOAT32:
            return [4 * cols]
        n_sub, per_scale = cols // self.sub, 2 if self.half else 4
        values = {NIBBLES: cols // 2, NIBBLES5: 5 * cols // 8}.get(self.storage, cols)
        return [values, per_scale * n_sub, per_scale * n_sub if self.has_offset else 0]


class TopK:
    """A sampler's top-k cut on the GPU: topk.wgsl's dispatches (TOP_K_PASSES) over a row of logits
    in one submission, then the host keeps k of the pairs read back (the webgpu backend's
    `top_logits`; a web package's runner, as the page's runtime does)."""

    def __init__(self, device: Device):
        constants = wgsl_constants("topk+gather", "TOP")
        self.device, self.pairs, self.per_group = device, constants["pairs"], constants["per_group"]
        size = 4 * (self.pairs + 2 * (TOP_K + TOP_TIES))
        self.out, self.read = device.buffer(size, "data"), device.readback_buffer(size)

    def raw(self, logits: Buffer, l_off: int, n: int, k: int, meanwhile=None) -> np.ndarray:
        """topk.wgsl's output (uint32) over n logits from l_off of `logits`, after the pass being
        recorded: its header, then from `pairs` up to k + TOP_TIES (id, logit) pairs, every logit at
        or above the k-th. `meanwhile()` runs after the submission, while the GPU works."""
        groups = {"one": (1, 1, 1), "all": grid(-(-n // self.per_group))}
        for kernel, shift, size in TOP_K_PASSES:
            params = dict(n=n, l_off=l_off, k=k, cap=k + TOP_TIES, shift=shift)
            self.device.dispatch(kernel, params, [logits, self.out], groups[size])
        nbytes = 4 * (self.pairs + 2 * (k + TOP_TIES))
        self.device.submit([(self.out, 0, self.read, nbytes)])
        if meanwhile is not None:
            meanwhile()
        return self.device.read(self.read, nbytes).view(np.uint32)

    def __call__(self, logits: Buffer, l_off: int, n: int, k: int, meanwhile=None):
        """(ids, logits) of the k largest in id order (ties at the k-th: the lowest ids), or None where
        the GPU could not choose them (a logit NaN or infinite, more than TOP_TIES equal to the k-th)."""
        raw = self.raw(logits, l_off, n, k, meanwhile)
        written, bad = int(raw[0]), int(raw[1])
        if bad or written > k + TOP_TIES:
            return None
        pairs = raw[self.pairs : self.pairs + 2 * written].reshape(written, 2)
        ids, values = pairs[:, 0].astype(np.int64), pairs[:, 1].copy().view(np.float32)
        best = np.lexsort((ids, -values))[:k]  # by value, then id: the k-th's ties beyond k dropped
        kept = best[np.argsort(ids[best])]
        return ids[kept], values[kept]


class WebGPUBackend:
    """The op set (`backends.base.Backend`) in WGSL through wgpu-py; no numpy on activations."""

    name = "webgpu"
    capabilities = frozenset({LAYER_NORM, EXACT_GELU, ALIBI})

    def __init__(self, keep_host_copies: bool = False):
        self.device = Device()
        self.keep = keep_host_copies  # keep uploaded arrays (for exporting a web package)
        # Tables a model reads row by row (Gemma's per-layer inputs): their rows are gathered from
        # the file and copied to the GPU per pass, never uploaded whole (a web package's plan lists
        # these fills; the browser reads the rows from the package's table files).
        self._streamed: frozenset[str] = frozenset()
        self._pinned: dict[str, np.ndarray] = {}
        self._fills: list[tuple] = []  # the streamed rows the pass being recorded reads
        # one token's keys and values not yet written, by cache key buffer: the attention over that
        # cache writes them (attention+fresh); anything else that needs them first flushes them
        self._pending_kv: dict[int, tuple] = {}
        self._argmax_out: Buffer | None = None  # greedy_tokens: [token, non-finite flag]
        self._top: TopK | None = None  # top_logits' kernels and buffers
        self._ahead: tuple | None = None  # top_logits: (recording, position, the pass encoded ahead)
        self._readbacks: list[Buffer] = []
        self._matrices: dict[str, _Matrix] = {}
        self._vectors: dict[str, Buffer] = {}
        self._rope_tables: dict[tuple, Buffer] = {}
        self._stacks: dict[tuple, _Matrix | None] = {}
        self.max_positions = 0
        self._first_position = 0
        self._ids = np.zeros(0, np.int64)  # the tokens of the pass being recorded

    # -- weights --------------------------------------------------------------------------------

    def prepare(self, tensors, on_packed=None, copy_out=None) -> None:
        """Upload every matrix now; `on_packed(tensor)` after each (its file pages are not read
        again). `copy_out` (host copies of the file's bytes, for the cpu backend) is not needed.
        Meanwhile the kernels that a model of these matrices runs in every pass are compiled."""
        tensors = list(tensors)
        alike = _held_alike(tensors)
        self.device.precompile(self._likely_kernels(tensors, alike))
        for w in tensors:
            if len(w.shape) == 2 and w.name not in self._matrices:
                self._matrices[w.name] = self._upload(w, alike.get(w.name, _held(w)))
                if on_packed:
                    on_packed(w)
        # a decoder's q/k/v and gate/up stacked now (copies on the GPU), not in the first prompt
        names = {w.name: w for w in tensors if len(w.shape) == 2}
        layers = sorted({n.split(".")[1] for n in names if n.startswith("blk.") and n.count(".") == 3})
        for layer, roles in itertools.product(layers, _STACKS):
            group = [names.get(f"blk.{layer}.{role}.weight") for role in roles]
            if all(group):
                self.stacked(group)

    @staticmethod
    def _likely_kernels(tensors, alike: dict[str, int] | None = None) -> list[str]:
        """The kernels a decoder of these matrices runs in every pass, in the order a first prompt
        needs them (they compile in that order while the weights upload): the tiled prefill of each
        weight variant of the layers' matrices, the norm, cache write and attention, the output
        matrix's one-token product after the final norm; then decode's one-token products (after a
        norm, a gated activation, the attention merge, a post-norm's sum), its attention, argmax, top-k."""

        matrices = [w for w in tensors if len(w.shape) == 2]
        alike = alike or {}

        def held(w: Tensor) -> int:  # as `prepare` holds it
            return alike.get(w.name, _held(w))

        def one_token(w: Tensor, x: str) -> str:
            cols = w.shape[1]
            return _linear_kernel(_VARIANT[held(w)], x, cols, cols <= wgsl_constants("linear", "XS")["max"])

        layers = [w for w in matrices if w.name.startswith("blk.")]
        kernels = [f"matmul+{v}" for v in sorted({_VARIANT[held(w)] for w in layers})]
        kernels += ["rms_norm", "kv_write", "attention"]
        quantized = [w for w in matrices if held(w) != FLOAT32]
        kernels += sorted({one_token(w, "norm") for w in quantized if not w.name.startswith("blk.")})
        inputs = {"ffn_down": "gated", "attn_output": "merged"}  # what else reads a normed input
        roles = [
            (w, inputs.get(w.name.split(".")[-2], "norm")) for w in quantized if w.name.startswith("blk.")
        ]
        kernels += sorted({one_token(w, x) for w, x in roles} - set(kernels))
        names = [w.name for w in tensors]
        if any(".post_" in n for n in names) and not any("altup" in n for n in names):
            # Gemma 2 / 3's post-norms: their sums read by q/k/v and gate/up on the way
            kernels += sorted({one_token(w, "resnorm") for w, x in roles if x == "norm"})
        return [*kernels, "attention+fresh", "argmax", *sorted({kernel for kernel, _, _ in TOP_K_PASSES})]

    def matrix(self, w: Tensor) -> _Matrix:
        if w.name not in self._matrices:
            self._matrices[w.name] = self._upload(w, _held(w))
        return self._matrices[w.name]

    def _upload(self, w: Tensor, storage: int, half_ok: bool = True) -> _Matrix:
        """W in buffers of at most one binding's worth of rows each, held as `storage` (scales and
        offsets as float16 where that is exact and `half_ok`)."""
        rows, cols = w.shape
        if storage == FLOAT32:
            values = np.ascontiguousarray(w.dequantize(), np.float32)
            per_chunk = max(1, self.device.max_binding // (4 * cols))
            chunks = []
            for r in range(0, rows, per_chunk):
                part = values[r : r + per_chunk]
                chunks.append((r, len(part), [self.device.buffer(part.nbytes, "weight", part, self.keep)]))
            return _Matrix(w.shape, chunks, storage)
        if storage == NIBBLES:
            nib = int4.repack(w.data, w.type, w.shape)
            values, scale, offset, sub = nib.packed, nib.scale, nib.offset, int4.SUB
        elif storage == NIBBLES5:
            (values, scale, offset), sub = _five_bits(w), 32
        else:  # numpy's unpacking: kernels.int8.repack's numba one would load a compiled kernel (0.5 s)
            packed = int8.unpack(w.data, w.type, w.shape)
            values, scale, offset, sub = packed.q, packed.scale, packed.offset, packed.sub
        half = half_ok and _as_half(scale, offset)
        if half:
            scale, offset = scale.astype("<f2"), offset.astype("<f2")
        per_chunk = max(1, self.device.max_binding // values.shape[1])
        chunks = []
        for r in range(0, rows, per_chunk):
            part = slice(r, r + per_chunk)
            q, sc = values[part], scale[part]
            o = offset[part] if offset.shape[1] else np.zeros(1, np.float32)
            bufs = [self.device.buffer(a.nbytes, "weight", a, self.keep) for a in (q, sc, o)]
            chunks.append((r, len(q), bufs))
        return _Matrix(w.shape, chunks, storage, sub, offset.shape[1] > 0, half=half)

    def _alike(self, parts: list[_Matrix], weights: list[Tensor]) -> list[_Matrix]:
        """Matrices to stack that are held differently uploaded again alike: as INT8 where their
        storages differ (and INT8 copies would stack), scales as float16 only where all can be
        (`prepare` already holds a decoder's q/k/v and gate/up alike, see `_held_alike`; this is for
        other stacks, and for scales)."""
        if any(not m.quantized or m.row0 for m in parts) or len({(m.storage, m.half) for m in parts}) < 2:
            return parts
        storage = parts[0].storage if len({m.storage for m in parts}) == 1 else INT8
        if storage == INT8 and not _stack_as_int8(weights):
            return parts
        for half_ok in (True, False):
            again = [m.storage != storage or (m.half and not half_ok) for m in parts]
            for i, w in enumerate(weights):
                if again[i]:
                    self.device.free([b for _, _, bufs in parts[i].chunks for b in bufs])
                    parts[i] = self._matrices[w.name] = self._upload(w, storage, half_ok)
            if len({m.half for m in parts}) == 1:
                break
        return parts

    def vector(self, w: Tensor | np.ndarray, name: str | None = None) -> Buffer:
        """A weight's (or host array's) float32 values in a buffer, made once per name (a host
        array's name is a digest of its values)."""
        if name is None:
            name = (
                w.name
                if isinstance(w, Tensor)
                else "host:" + hashlib.sha1(np.ascontiguousarray(w)).hexdigest()
            )
        if name not in self._vectors:
            values = w if isinstance(w, np.ndarray) else self.dense(w)
            values = np.ascontiguousarray(values, np.float32).ravel()
            self._vectors[name] = self.device.buffer(values.nbytes, "weight", values, self.keep)
        return self._vectors[name]

    def stacked(self, weights: list[Tensor]) -> _Matrix | None:
        """One matrix of `weights`' rows, in order, made from their uploaded copies (by `prepare` for
        a decoder's q/k/v and gate/up, at first use for others)
        (which it replaces: each weight then reads its rows of the stack); None where they cannot
        stack (different layouts or widths, or more than one binding's worth)."""
        key = tuple(w.name for w in weights)
        if key not in self._stacks:
            parts = self._alike([self.matrix(w) for w in weights], weights)
            self._stacks[key] = self._stack(parts, weights)
        return self._stacks[key]

    def _stack(self, parts: list[_Matrix], weights: list[Tensor]) -> _Matrix | None:
        first = parts[0]
        rows, cols = sum(m.shape[0] for m in parts), first.shape[1]
        layout = (first.storage, cols, first.sub, first.has_offset, first.half)
        if (
            len(parts) < 2
            or len({id(m) for m in parts}) < len(parts)
            or any(
                (m.storage, m.shape[1], m.sub, m.has_offset, m.half) != layout or len(m.chunks) > 1 or m.row0
                for m in parts
            )
        ):
            return None
        per_row = first.row_bytes
        if rows * max(per_row) > self.device.max_binding:
            return None
        stacked = []
        for i, row_bytes in enumerate(per_row):
            olds = [m.chunks[0][2][i] for m in parts]
            if row_bytes == 0:
                stacked.append(olds[0])  # the placeholder, shared
                continue
            data = None
            if self.keep:
                data = np.concatenate([np.ascontiguousarray(b.data).view(np.uint8).ravel() for b in olds])
            stacked.append(self.device.concatenate(olds, [m.shape[0] * row_bytes for m in parts], data))
        whole = _Matrix(
            (rows, cols), [(0, rows, stacked)], first.storage, first.sub, first.has_offset, half=first.half
        )
        start = 0
        for w, m in zip(weights, parts):
            self._matrices[w.name] = _Matrix(
                m.shape, [(0, m.shape[0], stacked)], m.storage, m.sub, m.has_offset, row0=start, half=m.half
            )
            start += m.shape[0]
        return whole

    @staticmethod
    def dense(w: Tensor) -> np.ndarray:
        return w.dequantize()

    @property
    def weight_bytes(self) -> int:
        return sum(b.size for b in self.device.buffers if b.role == "weight")

    # -- tensors --------------------------------------------------------------------------------

    def new(self, shape, fresh: bool = False) -> GpuTensor:
        """A scratch tensor (`fresh`: in a buffer nothing earlier in the pass used, see Device.scratch)."""
        return GpuTensor(self, self.device.scratch(math.prod(shape), fresh), shape)

    def _lazy(self, computation: str, shape, **args) -> GpuTensor:
        y = self.new(shape)
        return self._pending(y, computation, **args)

    @staticmethod
    def _pending(y: GpuTensor, computation: str, **args) -> GpuTensor:
        """y's values, to be computed by `computation`: a view of y holding the description (y itself
        does not, so no reference cycle delays freeing its buffer: see Device.scratch)."""
        return GpuTensor(y.ops, y.buf, y.shape, y.offset, _Lazy(computation, y, **args))

    def _ready(self, x):
        """x, computed: a lazy tensor's kernel is dispatched now."""
        if isinstance(x, GpuTensor) and x.lazy is not None and not x.lazy.done:
            self._run(x.lazy)
        return x

    @staticmethod
    def _whole(x, computation: str) -> _Lazy | None:
        """x's pending `computation`, when x is all of what it computes."""
        lazy = getattr(x, "lazy", None)
        if lazy is None or lazy.done or lazy.computation != computation:
            return None
        out = lazy.out
        return lazy if (x.buf is out.buf and x.offset == out.offset and x.size == out.size) else None

    def _run(
        self, lazy: _Lazy, residual: GpuTensor | None = None, into: GpuTensor | None = None
    ) -> GpuTensor:
        """Dispatch a lazy tensor's kernel (with `residual` added in its epilogue, where given) into
        its own output, or into `into`, leaving the lazy tensor pending: a sum fused into the
        kernel must not change a tensor that something else may still read (Gemma 3n adds its
        normed input to LAuReL's output and also attends over it)."""
        if into is None:
            lazy.done = True
        a, out = lazy.args, into if into is not None else lazy.out
        if lazy.computation == "norm":
            self._rms_norm(self._ready(a["x"]), a["w"], a["eps"], out, residual)
        elif lazy.computation == "resnorm":  # residual + norm(branch): the norm's epilogue
            branch = a["branch"].args
            self._rms_norm(self._ready(branch["x"]), branch["w"], branch["eps"], out, a["residual"])
        elif lazy.computation == "linear":
            self._linear(a["input"], a["matrix"], a["bias"], [out], residual)
        elif lazy.computation == "act":
            self._elementwise(a["op"], a["x"], None, 0.0, out)
        elif lazy.computation == "gated":
            self._elementwise(f"{a['op']}_mul", a["gate"], a["up"], 0.0, out)
        elif lazy.computation == "merge":
            T, heads = a["parts"].shape[:2]
            params = dict(n_heads=heads, head_dim=a["dim"], n_splits=a["splits"], y_off=out.offset)
            self.device.dispatch("attention_merge", params, [a["parts"].buf, out.buf], (heads, T, 1))
        else:  # "rope": of a tensor, or of its per-head norm
            head = a["head"]
            src = head["src"]
            if head["norm"]:
                src = self.new(src.shape)
                self._rms_norm(head["src"], head["w"], head["eps"], src, None)
            self._rope(src, a["rope"], out)
        return out

    def to_host(self, x) -> np.ndarray:
        """Submit the recorded pass and read x back (the logits)."""
        if not isinstance(x, GpuTensor):
            return x
        self._complete(x)
        raw = self.device.finish(x.buf, 4 * x.offset, 4 * x.size)
        return raw.view(np.float32).reshape(x.shape)

    def _complete(self, x: GpuTensor) -> None:
        """Dispatch what x still waits for, and copy in the streamed rows the pass reads."""
        self._ready(x)
        self.flush_kv()
        fills, self._fills = self._fills, []
        self._fill(fills, self._ids)

    def top_logits(
        self, step: CapturedStep, cache, token: int, k: int
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Step `step` over `token`, and of its logits the `k` largest (ties at the k-th: the lowest
        ids), as (ids, logits) in id order, chosen on the GPU (topk.wgsl): a sampler's top-k cut reads
        back k ids and logits, not the vocabulary. (None, the whole row) where the GPU cannot choose
        them: a logit NaN or infinite, more than TOP_TIES logits equal to the k-th, k not between 0
        and the vocabulary's size or above TOP_K."""
        recorded, ahead = step.recordings.get(cache), self._ahead
        self._ahead = None
        if (  # this step's commands were encoded while the last one ran (and nothing since changed)
            ahead is not None
            and ahead[0] is recorded
            and ahead[1] == cache.offset
            and recorded.generation == self.device.generation
            and self.device.adopt(ahead[2])
        ):
            self._step_inputs(recorded, np.array([token]), cache.offset)
            cache.offset += 1
            out = recorded.out
        else:
            out = step(np.array([token]), cache)
            recorded = step.recordings.get(cache)
        n = out.shape[-1]
        if not 0 < k < min(n, TOP_K + 1):
            return None, self.to_host(out)[-1]
        self._complete(out)

        def encode_next() -> None:  # the next step of this cache, in case it is asked for
            if recorded is not None and cache.offset < cache.max_tokens:
                self._ahead = (recorded, cache.offset, self.device.encode_ahead(recorded.commands))

        self._top = self._top or TopK(self.device)
        found = self._top(out.buf, out.offset + out.size - n, n, k, encode_next)
        return found if found is not None else (None, self.to_host(out)[-1])

    def upload(self, x: np.ndarray) -> GpuTensor:
        """Host values as a tensor (tests)."""
        x = np.ascontiguousarray(x, np.float32)
        return GpuTensor(self, self.device.buffer(x.nbytes, "data", x), x.shape)

    def layer_cache(self, capacity, n_kv_heads, k_dim, v_dim, window) -> GpuLayerCache:
        self.max_positions = max(self.max_positions, capacity)
        return GpuLayerCache(self, capacity, n_kv_heads, k_dim, v_dim, window)

    def warm_up(self, model, make_cache) -> None:
        """Notes the tables the model streams (pipelines are made as the first pass records them)."""
        self._streamed = frozenset(getattr(model, "streamed", ())) - set(self._pinned)

    def pin(self, name: str, data: np.ndarray) -> None:
        """Upload table `name` whole, from this resident copy, instead of streaming its rows."""
        self._pinned[name] = data

    def _fill(self, fills: list[tuple], ids: np.ndarray) -> None:
        """Copy the rows of streamed tables that a pass over tokens `ids` reads to the GPU (as
        float32, where the pass's embedding reads them), before it is submitted."""
        for w, stride, offset, limit, y in fills:
            n_rows, cols = w.shape
            rows = table_rows(w.name, n_rows, ids, stride, offset, limit)
            raw = w.data.reshape(n_rows, w.nbytes // n_rows)[rows]
            values = np.ascontiguousarray(dequantize(raw, w.type, (len(rows), cols)), np.float32)
            self.device.device.queue.write_buffer(y.buf.gpu, 4 * y.offset, values)

    def record(self, forward: Callable[[], GpuTensor]) -> Recording:
        """Run one pass, `forward()`, and keep it as a Recording (the pass reads its position and
        tokens from the step buffer, so it can be replayed for others). Its result is not read."""
        device = self.device
        device.commands, device.trace = [], []
        try:
            out = self._ready(forward())
            self.flush_kv()
            return Recording(device.commands, device.trace, out, list(self._fills), device.generation)
        finally:
            device.commands = device.trace = None

    def replay(self, recorded: Recording, ids: np.ndarray, position: int) -> None:
        """Encode a recorded pass again over tokens `ids` at `position` (the streamed rows it reads
        are copied in when it is submitted)."""
        self.device.replay(recorded.commands)
        self._step_inputs(recorded, ids, position)

    def _step_inputs(self, recorded: Recording, ids: np.ndarray, position: int) -> None:
        """The position, tokens and streamed rows of a replayed pass (written when it is submitted)."""
        self._ids = np.asarray(ids)
        self.device.set_step(position, self._ids)
        self._fills = list(recorded.fills)

    def capture(self, forward) -> CapturedStep:
        """`forward(ops, ids, cache)` over one token, recorded per cache and replayed after."""
        return CapturedStep(self, forward)

    def greedy_tokens(self, step: CapturedStep, cache, token: int, limit: int) -> Iterator[int]:
        """Up to `limit` greedy tokens after `token`, each chosen on the GPU (argmax.wgsl), which also
        feeds it to the next step there: step N + 1 is encoded and submitted before step N's token is
        read back, so the host's work overlaps the GPU's. A token is in the cache once the next one is
        asked for, so a reader that stops leaves the cache as `step` would (the step run ahead
        is overwritten later). -1 stands for a step whose logits were not all finite."""
        if limit <= 0:
            return

        def on_host(token: int) -> int:
            logits = self.to_host(step(np.array([token]), cache))[-1]
            return int(np.argmax(logits)) if np.isfinite(logits).all() else -1

        token = on_host(token)  # records the step if needed
        recorded = step.recordings[cache]
        commands, out = recorded.commands, recorded.out
        if recorded.fills or token < 0:  # rows streamed from the file need the host between steps
            yield token
            for _ in range(limit - 1):
                token = on_host(token)
                yield token
            return
        if self._argmax_out is None:
            self._argmax_out = self.device.buffer(16, "data")
            self._readbacks = [self.device.readback_buffer(16) for _ in range(2)]

        def submit(k: int, first: bool) -> int:
            if first:
                self.replay(recorded, np.array([token]), cache.offset)
            else:  # later steps read the position and token the previous step's argmax left
                self.device.replay(commands)
            params = dict(n=out.size, l_off=out.offset)
            self.device.dispatch("argmax", params, [out.buf, self.device.step, self._argmax_out], (1, 1, 1))
            self.device.submit([(self._argmax_out, 0, self._readbacks[k % 2], 8)], write_step=first)
            return k

        produced, pending = 1, None
        if produced < limit and cache.offset < cache.max_tokens:
            pending = submit(0, True)
        yield token
        while pending is not None:
            cache.offset += 1  # the token just yielded was taken: the step that fed it counts
            produced += 1
            ahead = None
            if produced < limit and cache.offset < cache.max_tokens:
                ahead = submit(pending + 1, False)
            value, bad = self.device.read(self._readbacks[pending % 2], 8).view(np.uint32)
            pending = ahead
            yield -1 if bad else int(value)

    # -- ops ------------------------------------------------------------------------------------

    def _input(self, x: GpuTensor, m: _Matrix) -> dict:
        """How the linear kernel reads x: a pending RMSNorm over rows of `cols` or a gated
        activation of a few tokens, or one token's split attention partials, are computed on the way
        (x_mode); anything else is computed first."""
        cols = m.shape[1]
        tokens = x.size // cols
        plain = dict(x_mode=0, x=None, x2_off=0, w=None, eps=0.0, m_splits=0, m_dim=0)
        lazy = self._whole(x, "merge")
        if lazy is not None and tokens == 1:
            a = lazy.args
            if cols // a["dim"] * a["splits"] <= wgsl_constants("linear", "MW")["max"]:
                return dict(plain, x_mode=5, x=a["parts"], m_splits=a["splits"], m_dim=a["dim"])
        if tokens <= FUSE_TOKENS:
            lazy = self._whole(x, "norm")
            if lazy is not None and lazy.args["x"].shape[-1] == cols:
                norm = dict(plain, x_mode=1, w=lazy.args["w"], eps=lazy.args["eps"])
                h = self._whole(lazy.args["x"], "resnorm")
                branch = h.args["branch"].args if h is not None else None
                if (
                    h is not None
                    and tokens == 1
                    and self._one_token(m)
                    and m.shape[0] < BIG_ROWS  # a large matrix's many workgroups would each sum h again
                    and branch["x"].shape[-1] == cols  # the branch normed over rows as wide as h
                    and (branch["w"] is None or math.prod(branch["w"].shape) == cols)
                ):
                    return dict(norm, x_mode=6, x=self._ready(branch["x"]), resnorm=h)
                return dict(norm, x=self._ready(lazy.args["x"]))
            lazy = self._whole(x, "gated")
            if lazy is not None:
                gate, up = lazy.args["gate"], lazy.args["up"]
                if gate.buf is up.buf and gate.shape[-1] == cols and up.shape[-1] == cols:
                    return dict(plain, x_mode=_GATED[lazy.args["op"]], x=gate, x2_off=up.offset)
        return dict(plain, x=self._ready(x))

    def linears(self, x: GpuTensor, weights: list[Tensor], biases: list[Tensor | None]) -> list[GpuTensor]:
        """One dispatch for all of `weights` where they stack (each output a view of one buffer)."""
        stack = self.stacked(weights) if len(weights) > 1 else None
        if stack is None:
            return [self.linear(x, w, b) for w, b in zip(weights, biases)]
        cols = stack.shape[1]
        T = x.size // cols
        bias = None
        if any(b is not None for b in biases):
            key = "bias:" + "|".join(w.name for w in weights)
            values = [
                self.dense(b) if b is not None else np.zeros(w.shape[0], np.float32)
                for w, b in zip(weights, biases)
            ]
            bias = self.vector(np.concatenate([np.ravel(v) for v in values]), key)
        y = self.new((T, stack.shape[0]))
        outs, start = [], 0
        for w in weights:
            outs.append(GpuTensor(self, y.buf, (T, w.shape[0]), y.offset + T * start))
            start += w.shape[0]
        self._linear(self._input(x, stack), stack, bias, outs, None)
        return outs

    def linear(self, x: GpuTensor, w: Tensor, bias: Tensor | None = None) -> GpuTensor:
        m = self.matrix(w)
        rows, cols = m.shape
        source = self._input(x, m)
        bias_buf = self.vector(bias) if bias is not None else None
        return self._lazy("linear", (x.size // cols, rows), input=source, matrix=m, bias=bias_buf)

    @staticmethod
    def _one_token(m: _Matrix) -> bool:
        """Whether the linear kernel's one-token path (input staged in workgroup memory) takes m."""
        return m.quantized and m.shape[1] <= wgsl_constants("linear", "XS")["max"]

    def _linear(self, source: dict, m: _Matrix, bias: Buffer | None, outs: list[GpuTensor], residual) -> None:
        """y = W x' (+ bias) (+ residual) into `outs`, one tensor per stacked matrix (at most 3)."""
        rows, cols = m.shape
        resnorm = source.get("resnorm")
        if resnorm is not None and (bias is not None or residual is not None):
            # +resnorm reads the residual sum's inputs through the bias and residual bindings
            h = self._ready(resnorm.out)
            source = dict(source, x_mode=1, x=h, resnorm=None)
            resnorm = None
        x = source["x"]
        T = outs[0].size // outs[0].shape[-1]
        one_token = T == 1 and self._one_token(m)
        bounds = np.cumsum([o.shape[-1] for o in outs]).tolist()
        bounds += [bounds[-1]] * (3 - len(bounds))
        offsets = [o.offset for o in outs] + [0] * (3 - len(outs))
        norm_w = self.vector(source["w"]) if source["w"] is not None else None
        rn = dict(r_off=0, h_off=0, post_off=0, has_post_w=0, eps_post=0.0)
        extra = None
        if resnorm is not None:  # nw: the norm's weight, then the branch norm's
            branch = resnorm.args["branch"].args
            weights = [w for w in (source["w"], branch["w"]) if w is not None]
            if branch["w"] is not None:
                name = "rn:" + "|".join(w.name for w in weights)
                norm_w = self.vector(np.concatenate([self.dense(w).ravel() for w in weights]), name)
            rn.update(r_off=resnorm.args["residual"].offset, h_off=resnorm.out.offset)
            rn.update(
                post_off=cols if source["w"] is not None else 0, has_post_w=int(branch["w"] is not None)
            )
            rn["eps_post"] = branch["eps"]
            extra = [resnorm.args["residual"].buf, resnorm.out.buf]
        base = dict(cols=cols, sub=m.sub, n_tokens=T, x_off=x.offset, x_stride=cols, w_row0=m.row0)
        base.update(has_offset=int(m.has_offset), seg1=bounds[0], seg2=bounds[1], seg3=bounds[2])
        base.update(half_scales=int(m.half))
        base.update(y_off0=offsets[0], y_off1=offsets[1], y_off2=offsets[2])
        base.update(has_bias=int(bias is not None), has_res=int(residual is not None))
        base.update(res_off=residual.offset if residual is not None else 0)
        extra = extra or [bias or x.buf, residual.buf if residual is not None else x.buf]
        tiled = T > FUSE_TOKENS and source["x_mode"] == 0  # many tokens: the tiled kernel
        kernel = "matmul+" + _VARIANT[m.storage]
        if not tiled:
            kernel = _linear_kernel(_VARIANT[m.storage], _INPUT[source["x_mode"]], cols, one_token)
        for first, n, bufs in m.chunks:
            params = dict(base, rows=n, row_base=first)
            weights = bufs if m.quantized else [bufs[0]] * 3
            if tiled:
                groups = (-(-n // 64), -(-T // 32), 1)
                self.device.dispatch(kernel, params, [*weights, x.buf, outs[0].buf, *extra], groups)
                continue
            params.update(rn, x_mode=source["x_mode"], x2_off=source["x2_off"], eps=source["eps"])
            params.update(
                has_norm_w=int(source["w"] is not None), m_splits=source["m_splits"], m_dim=source["m_dim"]
            )
            # threads a row: large matrices, more rows a workgroup
            lanes = 4 if one_token and n >= BIG_ROWS else 16
            params["lanes"] = lanes
            groups = grid(-(-n // (64 // lanes)))
            self.device.dispatch(
                kernel, params, [*weights, x.buf, outs[0].buf, norm_w or x.buf, *extra], groups
            )
        if resnorm is not None:  # the first workgroup wrote the residual sum
            resnorm.done = True

    def embedding(
        self, w: Tensor, ids: np.ndarray, stride: int = 1, offset: int = 0, id_limit: int | None = None
    ) -> GpuTensor:
        limit = ID_LIMIT if id_limit is None else min(int(id_limit), ID_LIMIT)
        if w.name in self._streamed:  # its rows are copied in when the pass is submitted
            self._ids = np.asarray(ids)
            self.device.set_step(self._first_position, self._ids)
            # written before the pass runs: a buffer nothing earlier in the pass used
            y = self.new((len(ids), w.shape[1]), fresh=True)
            self._fills.append((w, stride, offset, limit, y))
            return y
        if w.name in self._pinned:  # uploaded from the resident copy, which is then let go
            w = Tensor(w.name, w.type, w.shape, self._pinned.pop(w.name))
        m = self.matrix(w)
        if m.row0:
            raise UnsupportedError(f"{w.name} is read as rows of a stacked matrix, not as a table")
        cols, T = m.shape[1], len(ids)
        self._ids = np.asarray(ids)
        self.device.set_step(self._first_position, self._ids)
        y = self.new((T, cols))
        for first, n, bufs in m.chunks:
            if m.quantized:
                params = dict(
                    n_tokens=T, cols=cols, sub=m.sub, has_offset=int(m.has_offset), weight_kind=m.storage
                )
                params["half_scales"] = int(m.half)
                params.update(row_base=first, rows=n, y_off=0, id_mul=stride, id_add=offset, id_limit=limit)
                self.device.dispatch(
                    "embed_q8", params, [self.device.step, *bufs, y.buf], grid(-(-T * cols // WORKGROUP))
                )
            else:
                params = dict(n_tokens=T, cols=cols, row_base=first, rows=n, y_off=0)
                params.update(id_mul=stride, id_add=offset, id_limit=limit)
                self.device.dispatch(
                    "embed_f32", params, [self.device.step, *bufs, y.buf], grid(-(-T * cols // WORKGROUP))
                )
        return y

    def rms_norm(self, x: GpuTensor, w: Tensor | None, eps: float) -> GpuTensor:
        """A pending norm; of one token's pending residual sum with a normed branch (Gemma's
        post-norms), that sum stays pending too, for the next linear layer to compute (+resnorm)."""
        if not (self._whole(x, "resnorm") and x.size == x.shape[-1]):
            x = self._ready(x)
        return self._lazy("norm", x.shape, x=x, w=w, eps=eps)

    def _rms_norm(self, x: GpuTensor, w: Tensor | None, eps: float, y: GpuTensor, residual) -> None:
        dim = x.shape[-1]
        rows = x.size // dim
        weight = self.vector(w) if w is not None else x.buf
        params = dict(
            n_rows=rows, dim=dim, x_off=x.offset, y_off=y.offset, has_weight=int(w is not None), eps=eps
        )
        params.update(
            has_res=int(residual is not None), res_off=residual.offset if residual is not None else 0
        )
        res = residual.buf if residual is not None else x.buf
        self.device.dispatch("rms_norm", params, [x.buf, weight, y.buf, res], grid(rows))

    def layer_norm(self, x: GpuTensor, w: Tensor, b: Tensor | None, eps: float) -> GpuTensor:
        x = self._ready(x)
        dim = x.shape[-1]
        rows = x.size // dim
        y = self.new(x.shape)
        weight = self.vector(w)
        w_rows = math.prod(w.shape) // dim  # per-head norms (StableLM, Phi): one row per head
        bias = self.vector(b) if b is not None else weight
        params = dict(n_rows=rows, dim=dim, x_off=x.offset, y_off=0, has_bias=int(b is not None), eps=eps)
        params["w_rows"] = w_rows
        self.device.dispatch("layer_norm", params, [x.buf, weight, bias, y.buf], grid(rows))
        return y

    def elementwise(self, op: str, a: GpuTensor, b=None, s: float = 0.0) -> GpuTensor:
        """op(a, b); a sum with a pending linear layer or norm of the same size is that kernel's
        epilogue, a product with a pending activation a gated activation the next linear reads."""
        if isinstance(b, GpuTensor) and a.size == b.size and op in ("add", "mul"):
            for first, second in ((a, b), (b, a)):
                if op == "add":
                    lazy = self._whole(first, "norm")
                    if lazy is not None and second.lazy is not lazy:
                        return self._lazy("resnorm", a.shape, branch=lazy, residual=self._ready(second))
                    lazy = self._whole(first, "linear")
                    if lazy is not None and second.lazy is not lazy:
                        return self._run(lazy, self._ready(second), into=self.new(a.shape))
                else:
                    lazy = self._whole(first, "act")
                    if lazy is not None and second.lazy is not lazy:
                        x = lazy.args["x"]
                        return self._lazy(
                            "gated", a.shape, op=lazy.args["op"], gate=x, up=self._ready(second)
                        )
        if b is not None and not isinstance(b, GpuTensor):
            b = GpuTensor(self, self.vector(b), b.shape)  # a weight (bias)
        y = self.new(a.shape)
        self._elementwise(op, self._ready(a), self._ready(b), s, y)
        return y

    def _elementwise(self, op: str, a: GpuTensor, b: GpuTensor | None, s: float, y: GpuTensor) -> None:
        b_len = b.size if b is not None else 1
        params = dict(n=a.size, op=_ops()[op], a_off=a.offset, b_off=b.offset if b is not None else 0)
        params.update(b_len=b_len, y_off=y.offset, s=s)
        self.device.dispatch(
            "elementwise", params, [a.buf, (b or a).buf, y.buf], grid(-(-a.size // WORKGROUP))
        )

    def _activation(self, op: str, x: GpuTensor) -> GpuTensor:
        return self._lazy("act", x.shape, op=op, x=self._ready(x))

    def silu(self, x):
        return self._activation("silu", x)

    def gelu_tanh(self, x):
        return self._activation("gelu_tanh", x)

    def gelu(self, x: GpuTensor) -> GpuTensor:
        return self._activation("gelu", x)

    def softcap(self, x, cap: float):
        return self.elementwise("softcap", x, s=float(cap))

    def concat(self, xs: list[GpuTensor]) -> GpuTensor:
        xs = [self._ready(x) for x in xs]
        y = self.new((sum(len(x) for x in xs), *xs[0].shape[1:]))
        at = y.offset
        for x in xs:  # copied as x * 1
            self._elementwise("scale", x, None, 1.0, GpuTensor(self, y.buf, x.shape, at))
            at += x.size
        return y

    def mix(self, x: GpuTensor, c: GpuTensor) -> GpuTensor:
        x, c = self._ready(x), self._ready(c)
        K, T, n = x.shape
        y = self.new((c.size // (T * K), T, n))
        params = dict(
            n=n, n_tokens=T, n_out=y.shape[0], n_in=K, x_off=x.offset, c_off=c.offset, y_off=y.offset
        )
        self.device.dispatch("mix", params, [x.buf, c.buf, y.buf], grid(-(-y.size // WORKGROUP)))
        return y

    def _rows(self, variant: str, x: GpuTensor, other: GpuTensor, k: float = 0.0, ddof: int = 0) -> GpuTensor:
        x, other = self._ready(x), self._ready(other)
        dim = x.shape[-1]
        y = self.new(x.shape)
        params = dict(n_rows=x.size // dim, dim=dim, x_off=x.offset, y_off=y.offset, other_off=other.offset)
        params.update(other_dim=other.shape[-1], k=k, ddof=ddof)
        self.device.dispatch(f"rows+{variant}", params, [x.buf, other.buf, y.buf], grid(x.size // dim))
        return y

    def match_rms(self, x: GpuTensor, ref: GpuTensor) -> GpuTensor:
        return self._rows("match", x, ref)

    def gaussian_topk(self, x: GpuTensor, k: float, ddof: int = 0) -> GpuTensor:
        return self._rows("topk", x, x, float(k), int(ddof))

    def rope_tables(self, base, n_dims, freq_scale, freq_factors) -> Buffer:
        """cos then sin [positions, n_dims / 2], computed in float64 as the CPU backend does."""
        key = (
            base,
            n_dims,
            freq_scale,
            None if freq_factors is None else freq_factors.tobytes(),
            self.max_positions,
        )
        if key not in self._rope_tables:
            inv_freq = base ** (-np.arange(n_dims // 2, dtype=np.float64) * 2 / n_dims)
            if freq_factors is not None:
                inv_freq = inv_freq / freq_factors
            angles = (np.arange(self.max_positions, dtype=np.float64)[:, None] * freq_scale) * inv_freq[
                None, :
            ]
            tables = np.concatenate([np.cos(angles).ravel(), np.sin(angles).ravel()]).astype(np.float32)
            self._rope_tables[key] = self.device.buffer(tables.nbytes, "data", tables, True)
        return self._rope_tables[key]

    def rope(
        self,
        x: GpuTensor,
        positions: np.ndarray,
        base: float,
        n_dims: int,
        neox: bool,
        freq_scale: float = 1.0,
        freq_factors: np.ndarray | None = None,
    ) -> GpuTensor:
        self._check_positions(positions)
        tables = self.rope_tables(base, n_dims, freq_scale, freq_factors)
        rope = dict(tables=tables, n_dims=n_dims, neox=int(neox), sin_off=self.max_positions * (n_dims // 2))
        head = self._head(x, allow_rope=False)
        return self._lazy("rope", x.shape, head=head, rope=rope)

    def _head(self, x: GpuTensor, allow_rope: bool = True) -> dict:
        """How a kernel that loads one head at a time reads x [T, heads, dim]: a pending per-head
        RMSNorm (norm 1: no weight, 2: weight) and RoPE are applied on the way, where fusable."""
        dim = x.shape[-1]
        lazy = self._whole(x, "rope") if allow_rope else None
        if lazy is not None:
            return dict(lazy.args["head"], rope=lazy.args["rope"])
        lazy = self._whole(x, "norm")
        if lazy is not None and lazy.args["x"].shape[-1] == dim:
            w = lazy.args["w"]
            if w is None or math.prod(w.shape) == dim:
                return dict(
                    src=self._ready(lazy.args["x"]),
                    norm=2 if w is not None else 1,
                    w=w,
                    eps=lazy.args["eps"],
                    rope=None,
                )
        return dict(src=self._ready(x), norm=0, w=None, eps=0.0, rope=None)

    def _rope(self, x: GpuTensor, rope: dict, y: GpuTensor) -> None:
        T, H, D = x.shape
        params = dict(n_tokens=T, n_heads=H, head_dim=D, n_dims=rope["n_dims"], neox=rope["neox"])
        params.update(x_off=x.offset, y_off=y.offset, sin_off=rope["sin_off"])
        self.device.dispatch(
            "rope", params, [self.device.step, rope["tables"], x.buf, y.buf], grid(-(-x.size // WORKGROUP))
        )

    def _check_positions(self, positions: np.ndarray) -> None:
        first = int(positions[0])
        if first != self._first_position:
            self._first_position = first
            self.device.set_step(first, self._ids)
        if int(positions[-1]) >= self.max_positions:
            raise UnsupportedError(
                f"position {int(positions[-1])} is beyond the cache ({self.max_positions})"
            )

    def write_kv(self, k: GpuTensor, v: GpuTensor, keys: Buffer, values: Buffer, start: int) -> None:
        """Keys (their pending norm and RoPE applied on the way) and values (a pending norm without
        weight likewise) of T tokens into the cache at positions start..: one dispatch where both
        are read from one buffer, else one each. One token's are left pending for the attention
        over this cache to write (`attention`), or for `flush_kv`."""
        self._check_positions(np.array([start]))
        kh, vh = self._kv_heads(k, v)
        if k.shape[0] == 1:
            self.flush_kv(keys.id)
            self._pending_kv[keys.id] = (k, v, kh, vh, keys, values)
            return
        self._write_kv(k, v, kh, vh, keys, values)

    def _kv_heads(self, k: GpuTensor, v: GpuTensor) -> tuple[dict, dict]:
        """How keys and values are read for the cache (see _head): a value norm with a weight, or
        with another eps than the key's, is computed first."""
        kh, vh = self._head(k), self._head(v, allow_rope=False)
        if vh["norm"] == 2 or (vh["norm"] and kh["norm"] and vh["eps"] != kh["eps"]):
            vh = dict(src=self._ready(v), norm=0, w=None, eps=0.0, rope=None)
        return kh, vh

    def flush_kv(self, keys_id: int | None = None) -> None:
        """Write the pending keys and values of one cache (of every cache: None) now."""
        for key in [keys_id] if keys_id is not None else list(self._pending_kv):
            pending = self._pending_kv.pop(key, None)
            if pending is not None:
                self._write_kv(*pending)

    def _write_kv(self, k, v, kh: dict, vh: dict, keys: Buffer, values: Buffer) -> None:
        T, H, k_dim = k.shape
        v_dim = v.size // (T * H)
        rope = kh["rope"] or dict(tables=None, n_dims=0, neox=0, sin_off=0)
        params = dict(n_heads=H, k_dim=k_dim, v_dim=v_dim, k_off=kh["src"].offset, v_off=vh["src"].offset)
        params.update(k_norm=kh["norm"], v_norm=vh["norm"], eps=kh["eps"] if kh["norm"] else vh["eps"])
        params.update(n_dims=rope["n_dims"], neox=rope["neox"], sin_off=rope["sin_off"])
        src = kh["src"].buf
        extra = [rope["tables"] or src, self.vector(kh["w"]) if kh["w"] is not None else src]
        if vh["src"].buf is src:
            self.device.dispatch(
                "kv_write", dict(params, first=0), [self.device.step, src, *extra, keys, values], (H, T, 2)
            )
            return
        self.device.dispatch(
            "kv_write", dict(params, first=0), [self.device.step, src, *extra, keys, values], (H, T, 1)
        )
        other = vh["src"].buf
        self.device.dispatch(
            "kv_write",
            dict(params, first=1),
            [self.device.step, other, other, other, keys, values],
            (H, T, 1),
        )

    def _fresh_kv(self, k: GpuTensor, v: GpuTensor, head: dict, T: int, alibi) -> tuple | None:
        """The pending keys and values of the cache k / v when this attention can write them itself
        (attention+fresh: one token, read from the query's buffer, rotated as the query is, the
        same eps for every norm, no ALiBi); else they are written first (None)."""
        pending = self._pending_kv.get(k.buf.id)
        if pending is None:
            return None
        _, _, kh, vh, keys, values = pending
        q_rope, k_rope = head["rope"], kh["rope"]
        same_rope = (q_rope is None and k_rope is None) or (
            q_rope is not None
            and k_rope is not None
            and q_rope["tables"] is k_rope["tables"]
            and (q_rope["n_dims"], q_rope["neox"]) == (k_rope["n_dims"], k_rope["neox"])
        )
        eps = {h["eps"] for h in (head, kh, vh) if h["norm"]}
        if (
            T != 1
            or alibi is not None
            or values is not v.buf
            or not same_rope
            or len(eps) > 1
            or kh["src"].buf is not head["src"].buf
            or vh["src"].buf is not head["src"].buf
            or kh["src"].shape[-1] != head["src"].shape[-1]
            or vh["src"].shape[-1] != head["src"].shape[-1]
        ):
            self.flush_kv(k.buf.id)
            return None
        del self._pending_kv[k.buf.id]
        return kh, vh, eps.pop() if eps else 0.0

    def attention(
        self,
        q: GpuTensor,
        k: GpuTensor,
        v: GpuTensor,
        q_pos: np.ndarray,
        k_pos,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
        alibi=None,
    ) -> GpuTensor:
        T, n_heads, D = q.shape
        n_kv, v_dim = k.shape[1], v.shape[2]
        if D > 8 * WORKGROUP or v_dim != D or D % 4:
            raise UnsupportedError(
                f"the webgpu attention kernel takes head_dim <= 512, a multiple of 4 (got {D})"
            )
        head = self._head(q)
        rope = head["rope"] or dict(tables=None, n_dims=0, neox=0, sin_off=0)
        fresh = self._fresh_kv(k, v, head, T, alibi)
        capacity = k.shape[0]
        chunk, splits = capacity, 1
        if T <= FUSE_TOKENS:  # few queries: more workgroups, each over a range of keys
            chunk = 64 * max(1, -(-capacity // (64 * MAX_SPLITS)))
            splits = -(-capacity // chunk)
        y = self.new((T, n_heads * D))
        out = y if splits == 1 else self.new((T, n_heads, splits, D + 2))
        params = dict(n_tokens=T, n_heads=n_heads, n_kv_heads=n_kv, head_dim=D, q_off=head["src"].offset)
        params.update(y_off=out.offset, window=window or 0, has_softcap=int(bool(softcap)), scale=scale)
        params.update(
            softcap=softcap or 1.0, has_alibi=int(alibi is not None), q_norm=head["norm"], eps=head["eps"]
        )
        params.update(
            n_dims=rope["n_dims"], neox=rope["neox"], sin_off=rope["sin_off"], n_splits=splits, chunk=chunk
        )
        src = head["src"].buf
        slopes = (
            self.vector(np.asarray(alibi, np.float32), f"alibi-{np.asarray(alibi).tobytes().hex()}")
            if alibi is not None
            else src
        )
        norm_w = self.vector(head["w"]) if head["w"] is not None else src
        params.update(k_src=0, v_src=0, k_norm=0, v_norm=0, kw_off=0)
        kernel = "attention"
        if fresh is not None:
            kernel = "attention+fresh"
            kh, vh, eps = fresh
            params.update(
                k_src=kh["src"].offset, v_src=vh["src"].offset, k_norm=kh["norm"], v_norm=vh["norm"]
            )
            params["eps"] = eps
            if kh["w"] is not None:  # the key norm's weight after the query's, in one buffer
                qw = [self.dense(head["w"]).ravel()] if head["w"] is not None else []
                name = "qk:" + "|".join(w.name for w in (head["w"], kh["w"]) if w is not None)
                norm_w = self.vector(np.concatenate([*qw, self.dense(kh["w"]).ravel()]), name)
                params["kw_off"] = sum(len(w) for w in qw)
        buffers = [self.device.step, src, k.buf, v.buf, out.buf, slopes, norm_w, rope["tables"] or src]
        self.device.dispatch(kernel, params, buffers, (n_heads, T, splits))
        if splits > 1:  # merged by attention_merge, or by the linear layer that reads one token's
            return self._pending(y, "merge", parts=out, splits=splits, dim=D)
        return y
