"""The WebGPU backend: the CPU backend's op set, run by WGSL kernels through wgpu-py.

Activations are `GpuTensor`s: a scratch buffer, an element offset and a shape. They support what
architecture files do with activations besides calling ops (`+`, `*` by a tensor or a number,
`reshape`, row slices, `len`), so the same model code records GPU work. Nothing is computed
until `to_host` submits the pass and reads the logits back.

Weights are uploaded once at load: quantized matrices as the same int8 + per-sub-block scales
(and offsets) the CPU backend repacks them to (`kernels.int8.repack`, exact for every GGUF type),
float ones as float32. Matrices larger than the device's binding limit are split by rows.
The KV cache of every layer holds every position (sliding windows are applied by the mask).
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import UnsupportedError
from ...formats.gguf import Tensor
from ...formats.quants import GGMLType
from ...kernels import int8
from ..base import ALIBI, EXACT_GELU, LAYER_NORM
from .device import WORKGROUP, Buffer, Device, grid, wgsl_constants

_FLOAT = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def _ops() -> dict[str, int]:
    """The elementwise kernel's op codes, as its WGSL declares them (const OP_ADD: u32 = 0u; ...)."""
    return wgsl_constants("elementwise", "OP")


class GpuTensor:
    """float32 values [shape] at element `offset` of a device buffer."""

    __array_ufunc__ = None  # numpy scalars defer to our operators

    def __init__(self, ops: WebGPUBackend, buf: Buffer, shape: tuple[int, ...], offset: int = 0):
        self.ops, self.buf, self.shape, self.offset = ops, buf, tuple(int(s) for s in shape), offset

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
        return GpuTensor(self.ops, self.buf, tuple(shape), self.offset)

    def __getitem__(self, key) -> GpuTensor:
        """Rows along the first axis: an index or a slice with step 1."""
        row = self.size // self.shape[0]
        if isinstance(key, int):
            key = key % self.shape[0]
            return GpuTensor(self.ops, self.buf, self.shape[1:], self.offset + key * row)
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return GpuTensor(
                self.ops, self.buf, (max(0, stop - start), *self.shape[1:]), self.offset + start * row
            )
        raise UnsupportedError(f"webgpu tensors take row indices and slices, not {key!r}")

    def __add__(self, other):
        return self.ops.elementwise("add", self, other)

    __radd__ = __add__

    def __mul__(self, other):
        if isinstance(other, GpuTensor):
            return self.ops.elementwise("mul", self, other)
        return self.ops.elementwise("scale", self, s=float(other))

    __rmul__ = __mul__


class GpuLayerCache:
    """Keys and values of every position of one layer, in device memory."""

    shared = False  # set by KVCache when a SharedLayerCache reads this layer's `last`

    def __init__(self, ops: WebGPUBackend, capacity: int, n_kv_heads: int, k_dim: int, v_dim: int, window):
        self.ops, self.capacity, self.window = ops, capacity, window
        self.k_shape, self.v_shape = (capacity, n_kv_heads, k_dim), (capacity, n_kv_heads, v_dim)
        self.keys = ops.device.buffer(4 * math.prod(self.k_shape), "cache")
        self.values = ops.device.buffer(4 * math.prod(self.v_shape), "cache")

    def update_and_fetch(self, k: GpuTensor, v: GpuTensor, start: int):
        self.ops.write_cache(k, self.keys, start)
        self.ops.write_cache(v, self.values, start)
        fetched = (
            GpuTensor(self.ops, self.keys, self.k_shape),
            GpuTensor(self.ops, self.values, self.v_shape),
            None,
        )
        if self.shared:
            self.last = fetched
        return fetched

    def copy(self) -> GpuLayerCache:
        twin = object.__new__(GpuLayerCache)
        twin.__dict__.update(self.__dict__)
        twin.keys = self.ops.device.buffer(self.keys.size, "cache")
        twin.values = self.ops.device.buffer(self.values.size, "cache")
        self.ops.device.copy(self.keys, twin.keys)
        self.ops.device.copy(self.values, twin.values)
        return twin

    @property
    def nbytes(self) -> int:
        return self.keys.size + self.values.size


class _Matrix:
    """An uploaded weight matrix: row chunks of (first row, rows, buffers)."""

    def __init__(self, shape, chunks, quantized: bool, sub: int = 0, has_offset: bool = False):
        self.shape, self.chunks, self.quantized, self.sub, self.has_offset = (
            shape,
            chunks,
            quantized,
            sub,
            has_offset,
        )


class WebGPUBackend:
    """The op set (`backends.base.Backend`) in WGSL through wgpu-py; no numpy on activations."""

    name = "webgpu"
    capabilities = frozenset({LAYER_NORM, EXACT_GELU, ALIBI})
    reads_rows_from_file = False  # a table the CPU reads row by row from the file is uploaded whole

    def __init__(self, keep_host_copies: bool = False):
        self.device = Device()
        self.keep = keep_host_copies  # keep uploaded arrays (for exporting a web package)
        self._matrices: dict[str, _Matrix] = {}
        self._vectors: dict[str, Buffer] = {}
        self._rope: dict[tuple, tuple[Buffer, Buffer]] = {}
        self.max_positions = 0
        self._first_position = 0
        self._ids = np.zeros(0, np.int64)  # the tokens of the pass being recorded
        self._decode_plans: dict[int, tuple] = {}

    # -- weights --------------------------------------------------------------------------------

    def prepare(self, tensors, on_packed=None, copy_out=None) -> None:
        """Upload every matrix now; `on_packed(tensor)` after each (its file pages are not read
        again). `copy_out` (host copies of the file's bytes, for the cpu backend) is not needed."""
        for w in tensors:
            if len(w.shape) == 2 and w.name not in self._matrices:
                self.matrix(w)
                if on_packed:
                    on_packed(w)

    def matrix(self, w: Tensor) -> _Matrix:
        if w.name not in self._matrices:
            rows, cols = w.shape
            if w.kind in _FLOAT:
                values = np.ascontiguousarray(w.dequantize(), np.float32)
                per_chunk = max(1, self.device.max_binding // (4 * cols))
                chunks = [
                    (
                        r,
                        min(per_chunk, rows - r),
                        [
                            self.device.buffer(
                                4 * cols * min(per_chunk, rows - r),
                                "weight",
                                values[r : r + per_chunk],
                                self.keep,
                            )
                        ],
                    )
                    for r in range(0, rows, per_chunk)
                ]
                self._matrices[w.name] = _Matrix(w.shape, chunks, False)
            else:
                packed = int8.repack(w.data, w.kind, w.shape)
                per_chunk = max(1, self.device.max_binding // cols)
                chunks = []
                for r in range(0, rows, per_chunk):
                    part = slice(r, r + per_chunk)
                    q, scale = packed.q[part], packed.scale[part]
                    offset = packed.offset[part] if packed.offset.shape[1] else np.zeros(1, np.float32)
                    bufs = [self.device.buffer(a.nbytes, "weight", a, self.keep) for a in (q, scale, offset)]
                    chunks.append((r, len(q), bufs))
                self._matrices[w.name] = _Matrix(
                    w.shape, chunks, True, packed.sub, packed.offset.shape[1] > 0
                )
        return self._matrices[w.name]

    def vector(self, w: Tensor | np.ndarray, name: str | None = None) -> Buffer:
        name = name or w.name
        if name not in self._vectors:
            values = w if isinstance(w, np.ndarray) else self.dense(w)
            values = np.ascontiguousarray(values, np.float32).ravel()
            self._vectors[name] = self.device.buffer(values.nbytes, "weight", values, self.keep)
        return self._vectors[name]

    @staticmethod
    def dense(w: Tensor) -> np.ndarray:
        return w.dequantize()

    @property
    def weight_bytes(self) -> int:
        return sum(b.size for b in self.device.buffers if b.role == "weight")

    # -- tensors --------------------------------------------------------------------------------

    def new(self, shape) -> GpuTensor:
        return GpuTensor(self, self.device.scratch(math.prod(shape)), shape)

    def to_host(self, x) -> np.ndarray:
        """Submit the recorded pass and read x back (the logits)."""
        if not isinstance(x, GpuTensor):
            return x
        raw = self.device.finish(x.buf, 4 * x.offset, 4 * x.size)
        return raw.view(np.float32).reshape(x.shape)

    def upload(self, x: np.ndarray) -> GpuTensor:
        """Host values as a tensor (tests)."""
        x = np.ascontiguousarray(x, np.float32)
        return GpuTensor(self, self.device.buffer(x.nbytes, "data", x), x.shape)

    def layer_cache(self, capacity, n_kv_heads, k_dim, v_dim, window) -> GpuLayerCache:
        self.max_positions = max(self.max_positions, capacity)
        return GpuLayerCache(self, capacity, n_kv_heads, k_dim, v_dim, window)

    def warm_up(self, model, make_cache) -> None:
        """Nothing: pipelines are made as the first pass records them."""

    def pin(self, name: str, data: np.ndarray) -> None:
        raise UnsupportedError("the webgpu backend reads no tensor from the host per token")

    def decode_step(self, model, cache, token: int) -> np.ndarray:
        """One token through the model: recorded once per cache (the pass reads its position and
        token from the step buffer), then replayed without running the model's Python again."""
        plan = self._decode_plans.get(id(cache))
        if plan is None or plan[0] != self.device.generation or plan[1] is not cache:
            self.device.commands = []
            out = model.forward(self, np.array([token]), cache)
            commands, self.device.commands = self.device.commands, None
            if len(self._decode_plans) >= 4:  # plans hold their caches: keep the latest few
                del self._decode_plans[next(iter(self._decode_plans))]
            self._decode_plans[id(cache)] = (self.device.generation, cache, commands, out)
            return self.to_host(out)[-1]
        _, _, commands, out = plan
        self.device.set_step(cache.offset, np.array([token]))
        self.device.replay(commands)
        cache.offset += 1
        return self.to_host(out)[-1]

    # -- ops ------------------------------------------------------------------------------------

    def linears(self, x: GpuTensor, weights: list[Tensor], biases: list[Tensor | None]) -> list[GpuTensor]:
        return [self.linear(x, w, b) for w, b in zip(weights, biases)]

    def linear(self, x: GpuTensor, w: Tensor, bias: Tensor | None = None) -> GpuTensor:
        m = self.matrix(w)
        rows, cols = m.shape
        T = x.size // cols
        y = self.new((T, rows))
        for first, n, bufs in m.chunks:
            if m.quantized:
                params = dict(rows=n, cols=cols, sub=m.sub, n_tokens=T, x_off=x.offset, x_stride=cols)
                params.update(y_off=0, y_stride=rows, row_base=first, has_offset=int(m.has_offset))
                self.device.dispatch("linear_q8", params, [*bufs, x.buf, y.buf], grid(-(-n // 4)))
            else:
                params = dict(rows=n, cols=cols, n_tokens=T, x_off=x.offset, x_stride=cols)
                params.update(y_off=0, y_stride=rows, row_base=first)
                self.device.dispatch("linear_f32", params, [*bufs, x.buf, y.buf], grid(-(-n // 4)))
        return self.elementwise("add", y, bias) if bias is not None else y

    def embedding(self, w: Tensor, ids: np.ndarray, stride: int = 1, offset: int = 0) -> GpuTensor:
        m = self.matrix(w)
        cols, T = m.shape[1], len(ids)
        self._ids = np.asarray(ids)
        self.device.set_step(self._first_position, self._ids)
        y = self.new((T, cols))
        for first, n, bufs in m.chunks:
            if m.quantized:
                params = dict(n_tokens=T, cols=cols, sub=m.sub, has_offset=int(m.has_offset))
                params.update(row_base=first, rows=n, y_off=0, id_mul=stride, id_add=offset)
                self.device.dispatch(
                    "embed_q8", params, [self.device.step, *bufs, y.buf], grid(-(-T * cols // WORKGROUP))
                )
            else:
                params = dict(
                    n_tokens=T, cols=cols, row_base=first, rows=n, y_off=0, id_mul=stride, id_add=offset
                )
                self.device.dispatch(
                    "embed_f32", params, [self.device.step, *bufs, y.buf], grid(-(-T * cols // WORKGROUP))
                )
        return y

    def rms_norm(self, x: GpuTensor, w: Tensor | None, eps: float) -> GpuTensor:
        dim = x.shape[-1]
        rows = x.size // dim
        y = self.new(x.shape)
        weight = self.vector(w) if w is not None else x.buf
        params = dict(n_rows=rows, dim=dim, x_off=x.offset, y_off=0, has_weight=int(w is not None), eps=eps)
        self.device.dispatch("rms_norm", params, [x.buf, weight, y.buf], grid(rows))
        return y

    def layer_norm(self, x: GpuTensor, w: Tensor, b: Tensor | None, eps: float) -> GpuTensor:
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
        if b is not None and not isinstance(b, GpuTensor):
            b = GpuTensor(self, self.vector(b), b.shape)  # a weight (bias)
        y = self.new(a.shape)
        b_len = b.size if b is not None else 1
        params = dict(n=a.size, op=_ops()[op], a_off=a.offset, b_off=b.offset if b is not None else 0)
        params.update(b_len=b_len, y_off=0, s=s)
        self.device.dispatch(
            "elementwise", params, [a.buf, (b or a).buf, y.buf], grid(-(-a.size // WORKGROUP))
        )
        return y

    def silu(self, x):
        return self.elementwise("silu", x)

    def gelu_tanh(self, x):
        return self.elementwise("gelu_tanh", x)

    def gelu(self, x: GpuTensor) -> GpuTensor:
        return self.elementwise("gelu", x)

    def softcap(self, x, cap: float):
        return self.elementwise("softcap", x, s=float(cap))

    def rope_tables(self, base, n_dims, freq_scale, freq_factors) -> tuple[Buffer, Buffer]:
        """cos and sin [positions, n_dims / 2], computed in float64 as the CPU backend does."""
        key = (
            base,
            n_dims,
            freq_scale,
            None if freq_factors is None else freq_factors.tobytes(),
            self.max_positions,
        )
        if key not in self._rope:
            inv_freq = base ** (-np.arange(n_dims // 2, dtype=np.float64) * 2 / n_dims)
            if freq_factors is not None:
                inv_freq = inv_freq / freq_factors
            angles = (np.arange(self.max_positions, dtype=np.float64)[:, None] * freq_scale) * inv_freq[
                None, :
            ]
            cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
            self._rope[key] = (
                self.device.buffer(cos.nbytes, "data", cos, True),
                self.device.buffer(sin.nbytes, "data", sin, True),
            )
        return self._rope[key]

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
        T, H, D = x.shape
        cos, sin = self.rope_tables(base, n_dims, freq_scale, freq_factors)
        y = self.new(x.shape)
        params = dict(
            n_tokens=T, n_heads=H, head_dim=D, n_dims=n_dims, neox=int(neox), x_off=x.offset, y_off=0
        )
        self.device.dispatch(
            "rope", params, [self.device.step, cos, sin, x.buf, y.buf], grid(-(-x.size // WORKGROUP))
        )
        return y

    def _check_positions(self, positions: np.ndarray) -> None:
        first = int(positions[0])
        if first != self._first_position:
            self._first_position = first
            self.device.set_step(first, self._ids)
        if int(positions[-1]) >= self.max_positions:
            raise UnsupportedError(
                f"position {int(positions[-1])} is beyond the cache ({self.max_positions})"
            )

    def write_cache(self, x: GpuTensor, cache: Buffer, start: int) -> None:
        self._check_positions(np.array([start]))
        stride = x.size // len(x)
        self.device.dispatch(
            "kv_write",
            dict(n=x.size, src_off=x.offset, stride=stride),
            [self.device.step, x.buf, cache],
            grid(-(-x.size // WORKGROUP)),
        )

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
        if D > 8 * WORKGROUP or v_dim != D:
            raise UnsupportedError(f"the webgpu attention kernel takes head_dim <= 512 (got {D})")
        y = self.new((T, n_heads * D))
        params = dict(n_tokens=T, n_heads=n_heads, n_kv_heads=n_kv, head_dim=D, q_off=q.offset, y_off=0)
        params.update(window=window or 0, has_softcap=int(bool(softcap)), scale=scale, softcap=softcap or 1.0)
        params["has_alibi"] = int(alibi is not None)
        slopes = (
            self.vector(np.asarray(alibi, np.float32), f"alibi-{np.asarray(alibi).tobytes().hex()}")
            if alibi is not None
            else q.buf
        )
        self.device.dispatch(
            "attention", params, [self.device.step, q.buf, k.buf, v.buf, y.buf, slopes], (n_heads, T, 1)
        )
        return y
