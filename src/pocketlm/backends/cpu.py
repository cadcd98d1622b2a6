"""The CPU backend: the op set architecture files are written in, in numpy and numba.

Activations are float32 arrays [T, ...]. Weights arrive as GGUF tensors (views into the mmap).
With `fast=True` (the default) quantized matrices are multiplied by numba kernels: Q8_0 and
Q5_0 ones read as the file lays them out (`kernels.blocks`; Q8_0 from a resident copy in huge
pages when loaded by the engine, `_resident`), 4-bit types repacked once to nibbles
(`kernels.int4`), the others to int8 (`kernels.int8`), each with per-block scales. For one
token (decode) the kernels quantize the activations to int8 blocks and multiply integers
(`kernels.intdot`); a prompt's tokens are rounded alike and multiplied by packed panels of the
weights (`kernels.intgemm`; with `prefill="f32"`, float32 BLAS over dequantized tiles). In the
reference mode matrices are dequantized once to float32 and multiplied with numpy. float32
matrices are used in place. Embedding lookups dequantize only the rows they read.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..errors import InvalidOptionError, ModelFileError
from ..formats.gguf import Tensor
from ..formats.quants import BLOCK_LAYOUT, GGMLType, dequantize
from ..kernels import activations, blocks, int4, int8, intgemm, isa
from ..kernels import attention as attention_kernels
from ..kernels.attention import attend, softmax_scores, widen_f16
from ..kernels.memory import release_code_pages
from ..kernels.norms import rms_norm_rows
from ..kernels.rope import rope_rows
from ..kvcache import DEFAULT_KV_CACHE, LayerCache, cache_dtype
from .base import ALL_CAPABILITIES

DECODE_ATTENTION_MAX_T = 4  # up to this many new tokens, attention runs in numba (no BLAS)
PROMPT_ATTENTION_CHUNK = 128  # queries a prompt's attention takes at a time (over the slots they see)
PREFILLS = ("int8", "f32")  # how a prompt's activations meet quantized weights (`CpuBackend`)
DEFAULT_PREFILL = "int8"


def check_prefill(prefill: str) -> str:
    if prefill not in PREFILLS:
        raise InvalidOptionError(f"prefill {prefill!r}: choose one of {', '.join(PREFILLS)}")
    return prefill


_FLOAT = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
Packed = int8.Int8Weight | int4.Int4Weight | blocks.BlockWeight


# The numba kernels trust their arrays' sizes (they read a row's length of the input), so a file
# whose tensor shapes disagree with its hyper-parameters is stopped before a kernel runs.
def _mismatch(w: Tensor, what: str) -> ModelFileError:
    return ModelFileError(
        f"tensor {w.name!r} {list(w.shape)} {what}: its shape does not match the model's "
        "hyper-parameters (a corrupt or hand-edited file)"
    )


def _cache_array(a: np.ndarray) -> np.ndarray:
    """Keys or values for the decode kernels: float32, or float16 as its bits (uint16)."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _zeros(name: str, kind: GGMLType, shape: tuple[int, int], read_only: bool = False) -> Tensor:
    """A matrix of `kind` whose blocks are all zero bytes (zero values, in every block type);
    `read_only` as a file's mapped bytes are (numba compiles a kernel apart for those)."""
    values, size = BLOCK_LAYOUT[kind]
    data = np.zeros(shape[0] * shape[1] // values * size, np.uint8)
    data.setflags(write=not read_only)
    return Tensor(name, kind, shape, data)


def _check_width(x: np.ndarray, w: Tensor) -> None:
    if len(w.shape) != 2 or x.shape[-1] != w.shape[-1]:
        raise _mismatch(w, f"multiplies vectors of {x.shape[-1]} values")


def _visible_slots(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> tuple[int, int]:
    """The first and past-the-last cache slot any of these queries can see (slots in between
    that they cannot are masked as usual); all slots if none is visible."""
    seen = (k_pos >= 0) & (k_pos <= q_pos.max())
    if window:
        seen &= k_pos > q_pos.min() - window
    slots = np.flatnonzero(seen)
    return (int(slots[0]), int(slots[-1]) + 1) if slots.size else (0, len(k_pos))


class CpuBackend:
    """The op set (`backends.base.Backend`) in numpy and numba: every capability."""

    capabilities = ALL_CAPABILITIES

    def __init__(self, fast: bool = True, kv_cache: str = DEFAULT_KV_CACHE, prefill: str = DEFAULT_PREFILL):
        """`fast`: the numba kernels (else numpy only: the reference); `kv_cache` "f16" or "f32",
        what the fast backend's KV cache holds (the reference's holds float32); `prefill` "int8"
        or "f32", how the fast backend multiplies several tokens by a quantized matrix: with the
        activations rounded to int8 blocks as for one token (`kernels.intgemm`; on CPUs without
        its path, the portable one, float32), or exactly in float32 (BLAS)."""
        if fast:
            isa.check()
        self.fast = fast
        self.int8_prefill = fast and check_prefill(prefill) == "int8" and intgemm.available()
        dtype = cache_dtype(kv_cache)
        self.kv_dtype = dtype if fast else np.float32
        self.name = "cpu" if fast else "reference"
        self._dequantized: dict[str, np.ndarray] = {}
        self._packed: dict[str, Packed] = {}
        self._pinned: dict[str, np.ndarray] = {}
        self._stacked: dict[tuple[str, ...], tuple | None] = {}
        self._rope_tables: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._on_packed = self._copy_out = None

    def layer_cache(self, capacity: int, n_kv_heads: int, k_dim: int, v_dim: int, window: int | None):
        """The KV cache of one layer, as models make it."""
        return LayerCache(capacity, n_kv_heads, k_dim, v_dim, window, self.kv_dtype)

    # -- weights --------------------------------------------------------------------------------

    def dense(self, w: Tensor) -> np.ndarray:
        """The float32 values of a weight: float32 matrices in place, others dequantized once.
        Vectors (norm weights, biases) are copied out of the file: read in place, each would map
        the pages around it, which in a file cached in large folios are megabytes of the
        neighbouring matrices' bytes (measured: SmolLM2's whole 62 MB of repacked matrices came
        back into resident memory after their pages were let go)."""
        if w.type == GGMLType.F32 and len(w.shape) > 1:
            return w.data.view("<f4").reshape(w.shape)
        if w.name not in self._dequantized:
            self._dequantized[w.name] = np.array(w.dequantize(), np.float32)  # a copy, never a view
        return self._dequantized[w.name]

    def packed(self, w: Tensor) -> Packed | None:
        """A quantized matrix as the kernels read it (made once): Q8_0 and Q5_0 blocks as the
        file lays them out, nibbles for the 4-bit types, int8 for the others; None for float
        matrices."""
        if not self.fast or w.type in _FLOAT or len(w.shape) != 2:
            return None
        if w.name not in self._packed:
            if w.type == GGMLType.Q8_0:
                self._packed[w.name] = blocks.wrap(self._resident(w), w.type, w.shape)
            elif blocks.fits(w.type, w.shape):  # Q5_0: most are stacked (copied) at first use
                self._packed[w.name] = blocks.wrap(w.data, w.type, w.shape)
            else:
                kernels = int4 if int4.fits(w.type, w.shape) else int8
                self._packed[w.name] = kernels.repack(w.data, w.type, w.shape)
        return self._packed[w.name]

    def _resident(self, w: Tensor) -> np.ndarray:
        """The bytes of a Q8_0 matrix, which the kernels read as the file lays them out: a
        resident copy when `prepare` was given `copy_out`, else the file's mapped bytes.

        The copy is anonymous memory, which numpy asks the kernel to back with huge pages; the
        file's mapping goes through 4 KB pages, which a matrix read whole every token (Gemma 3's
        178 MB output matrix) reads at about half the speed (`benchmarks/RESULTS.md`). The copy is
        made chunk by chunk, its file pages let go as it goes, so memory holds one of the two."""
        if self._copy_out is None:
            return w.data
        if w.name not in self._pinned:
            self._pinned[w.name] = self._copy_out(w)
        return self._pinned[w.name]

    def prepare(self, tensors, on_packed=None, copy_out=None) -> None:
        """Repack every quantized matrix up front, so that load time is paid at load;
        `on_packed(tensor)` is called after each that was copied (not those kept as the file
        lays them out), `copy_out(tensor)` makes the resident copy of those (`_resident`)."""
        self._on_packed, self._copy_out = on_packed, copy_out
        tensors = list(tensors)
        if self.fast:
            self.load_kernels({w.type for w in tensors if len(w.shape) >= 2})  # 3-D: stacked matrices
        for w in tensors:  # vectors first: reading one maps its neighbours, let go below
            if len(w.shape) == 1:
                self.dense(w)
        for w in tensors:
            packed = self.packed(w)
            if packed is not None and on_packed and not getattr(packed, "in_place", False):
                on_packed(w)

    def load_kernels(self, types) -> None:
        """Load (or compile, the first time) the numba kernels this backend calls for matrices of
        these GGUF `types`, by running each op once on small made-up inputs, a prompt's and a
        token's; then let go of the LLVM code that loading paged in (`memory.release_code_pages`).

        `prepare` does this before the weights are resident: each kernel load pages in some 50 MB
        of LLVM's code, and loaded in the warm-up, on top of the weights, it was the process's peak
        memory (SmolLM2: 321 MB, of which 70 MB LLVM's; 255 MB since)."""
        probe = CpuBackend(kv_cache="f32" if self.kv_dtype == np.float32 else "f16", prefill="f32")
        probe.int8_prefill = self.int8_prefill
        heads, kv_heads, dim = 4, 2, 64
        width = heads * dim
        rng = np.random.default_rng(0)
        norm = Tensor("probe.norm", GGMLType.F32, (width,), np.ones(width, np.float32).view(np.uint8))
        cache = probe.layer_cache(16, kv_heads, dim, dim, None)
        start = 0
        for T in (DECODE_ATTENTION_MAX_T + 4, 1):  # a prompt's kernels, then a token's
            for kind in sorted(set(types) - set(_FLOAT)):
                # rows of a width the 4-bit kernels cannot take are held as int8 (`packed`)
                for cols in sorted({width, width + BLOCK_LAYOUT[kind][0]}):
                    x = rng.standard_normal((T, cols)).astype(np.float32)
                    names = [f"probe.{kind.name}.{cols}.{i}" for i in range(3)]
                    probe.linears(x, [_zeros(n, kind, (width, cols)) for n in names], [None] * 3)
                    for read_only in (True, False):  # the file's mapped bytes, a resident copy
                        name = f"probe.{kind.name}.{cols}.{read_only}"
                        probe.linear(x, _zeros(name, kind, (width, cols), read_only))
            x = probe.rms_norm(rng.standard_normal((T, width)).astype(np.float32), norm, 1e-6)
            positions = np.arange(start, start + T)
            qkv = np.concatenate([x, x[:, : 2 * kv_heads * dim]], axis=1)  # views of it, as stacked products
            q, k, v = qkv[:, :width], qkv[:, width : width + kv_heads * dim], qkv[:, width + kv_heads * dim :]
            q, k, v = q.reshape(T, heads, dim), k.reshape(T, kv_heads, dim), v.reshape(T, kv_heads, dim)
            k = probe.rms_norm(k, None, 1e-6)  # a contiguous one, as q/k norms leave them
            q, k = (probe.rope(a, positions, 1e4, dim, neox) for a, neox in ((q, False), (k, True)))
            keys, values, key_positions = cache.update_and_fetch(k, v, start)
            out = probe.attention(q, keys, values, positions, key_positions, dim**-0.5)
            probe.silu(out)
            probe.gelu_tanh(np.zeros(activations.PARALLEL_MIN, np.float32))  # the parallel loop
            start += T
        release_code_pages()

    @staticmethod
    def to_host(x: np.ndarray) -> np.ndarray:
        """Values as a numpy array (they already are)."""
        return x

    def warm_up(self, model, make_cache) -> None:
        """One token through the model: the q/k/v and gate/up rows are stacked now, not in the
        first prompt, and any kernel `load_kernels` did not foresee is loaded (llama.cpp, too, runs
        a warm-up pass when it loads a model). The reference backend has nothing to warm."""
        if self.fast:
            model.forward(self, np.zeros(1, np.int64), make_cache(1))
            release_code_pages()  # paged in by kernels `load_kernels` did not foresee, if any

    def capture(self, forward):
        """The step as it is: the model's Python runs each time (the webgpu backend records it)."""
        return functools.partial(forward, self)

    def pin(self, name: str, data: np.ndarray) -> None:
        """Read tensor `name`'s bytes from `data` (a resident copy) instead of the file."""
        self._pinned[name] = data

    def linear(self, x: np.ndarray, w: Tensor, bias: Tensor | None = None) -> np.ndarray:
        """x [T, in] @ W[out, in].T (+ bias) -> [T, out]."""
        _check_width(x, w)
        packed = self.packed(w)
        if packed is None:
            y = x @ self.dense(w).T
        else:
            y = self._product(packed, x)
        return y + self.dense(bias) if bias is not None else y

    def linears(self, x: np.ndarray, weights: list[Tensor], biases: list[Tensor | None]) -> list[np.ndarray]:
        """[x @ W.T (+ b) for each W]: matrices that take the same input (q/k/v, gate/up) are
        multiplied in one kernel call when they are repacked alike; a decode step makes a few
        hundred calls, each costing some microseconds besides its work."""
        stacked = self._stack(weights)
        if stacked is None:
            return [self.linear(x, w, b) for w, b in zip(weights, biases)]  # each checked there
        for w in weights:
            _check_width(x, w)
        packed, ends = stacked
        y = self._product(packed, x)
        parts = [y[:, first:end] for first, end in zip([0, *ends], ends)]  # (np.split: 10 us a call)
        return [p + self.dense(b) if b is not None else p for p, b in zip(parts, biases)]

    def _product(self, packed: Packed, x: np.ndarray) -> np.ndarray:
        if len(x) == 1:
            return packed.matvec(x[0])[None]
        if self.int8_prefill and intgemm.supports(packed):
            return intgemm.matmul(packed, x)
        return packed.matmul(x)

    def _stack(self, weights: list[Tensor]):
        """(the weights' rows in one repacked matrix, the row where each ends), made at first
        use; each weight's own entry becomes a view of its rows (no second copy). None when
        they cannot be stacked (reference mode, float matrices, mixed kinds). Stacked Q8_0 / Q5_0
        blocks are a copy, and their file pages or resident copies are then let go."""
        key = tuple(w.name for w in weights)
        if key not in self._stacked:
            parts = [self.packed(w) for w in weights]
            kinds = {type(p) for p in parts}
            stacked = None
            if len(kinds) == 1 and kinds <= {int8.Int8Weight, int4.Int4Weight, blocks.BlockWeight}:
                stacked = kinds.pop().stack(parts)
            if stacked is not None:
                ends = np.cumsum([p.shape[0] for p in parts]).tolist()
                for w, part, first, end in zip(weights, parts, [0, *ends], ends):
                    self._packed[w.name] = stacked.rows(first, end)
                    if getattr(part, "in_place", False):  # its bytes, copied to the stack, are not read again
                        self._pinned.pop(w.name, None)
                        if self._on_packed:
                            self._on_packed(w)
                stacked = (stacked, ends)
            self._stacked[key] = stacked
        return self._stacked[key]

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights this backend computes with: its repacked or dequantized copies,
        pinned tables, and the file's bytes of matrices read in place."""
        pinned = [p for name, p in self._pinned.items() if name not in self._packed]  # others are views
        return sum(p.nbytes for p in [*self._packed.values(), *self._dequantized.values(), *pinned])

    def embedding(
        self, w: Tensor, ids: np.ndarray, stride: int = 1, offset: int = 0, id_limit: int | None = None
    ) -> np.ndarray:
        """Rows `ids * stride + offset` of an embedding table [rows, D], dequantizing just those rows."""
        if id_limit is not None:
            ids = np.where(np.asarray(ids) < id_limit, ids, 0)
        if stride != 1 or offset:
            ids = np.asarray(ids, np.int64) * stride + offset
        if w.name in self._dequantized:
            return self._dequantized[w.name][ids]
        n_rows, dim = w.shape
        if len(ids) and (int(np.min(ids)) < 0 or int(np.max(ids)) >= n_rows):
            raise ModelFileError(
                f"tensor {w.name!r} has {n_rows} rows but token id {int(np.max(ids))} was asked for: "
                "the file's vocabulary and embedding disagree"
            )
        row_bytes = w.nbytes // n_rows
        rows = self._pinned.get(w.name, w.data).reshape(n_rows, row_bytes)[np.asarray(ids)]
        return dequantize(rows, w.type, (len(ids), dim))

    # -- normalisation and activations ----------------------------------------------------------

    def rms_norm(self, x: np.ndarray, w: Tensor | None, eps: float) -> np.ndarray:
        weight = self.dense(w) if w is not None else None
        if weight is not None and weight.shape[-1] != x.shape[-1]:
            raise _mismatch(w, f"normalises vectors of {x.shape[-1]} values")
        if self.fast and weight is not None and weight.ndim == 1 and x.dtype == np.float32:
            rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
            out = np.empty_like(rows)
            rms_norm_rows(rows, weight, eps, out)
            return out.reshape(x.shape)
        y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
        return y * weight if weight is not None else y

    def layer_norm(self, x: np.ndarray, w: Tensor, b: Tensor | None, eps: float) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        y = (x - mean) / np.sqrt(var + eps) * self.dense(w)
        return y + self.dense(b) if b is not None else y

    def silu(self, x: np.ndarray) -> np.ndarray:
        if self.fast and x.dtype == np.float32:
            return activations.silu(x)
        return x / (1.0 + np.exp(-x))

    def gelu_tanh(self, x: np.ndarray) -> np.ndarray:
        if self.fast and x.dtype == np.float32:
            return activations.gelu_tanh(x)
        # x * x * x, not x**3: numpy's float32 power is a slow general pow (80 ns an element)
        return (
            0.5
            * x
            * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * (x * x * x))))
        )

    @staticmethod
    def gelu(x: np.ndarray) -> np.ndarray:
        """Exact GELU, x * Phi(x), with erf from Abramowitz & Stegun 7.1.26 (error < 1.5e-7)."""
        z = np.abs(x) / math.sqrt(2.0)
        t = 1.0 / (1.0 + 0.3275911 * z)
        poly = t * (
            0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
        )
        erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
        return (0.5 * x * (1.0 + erf)).astype(x.dtype)

    @staticmethod
    def softcap(x: np.ndarray, cap: float) -> np.ndarray:
        return np.tanh(x / cap) * cap

    @staticmethod
    def concat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs, axis=0)

    @staticmethod
    def mix(x: np.ndarray, c: np.ndarray) -> np.ndarray:
        K, T, _ = x.shape
        return np.einsum("tjk,ktn->jtn", c.reshape(T, -1, K), x).astype(np.float32, copy=False)

    @staticmethod
    def match_rms(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
        target = np.sqrt(np.mean(ref * ref, axis=-1, keepdims=True))
        return x * (target / np.sqrt(np.maximum(np.mean(x * x, axis=-1, keepdims=True), np.float32(1e-5))))

    @staticmethod
    def gaussian_topk(x: np.ndarray, k: float, ddof: int = 0) -> np.ndarray:
        cutoff = x.mean(axis=-1, keepdims=True) + x.std(axis=-1, keepdims=True, ddof=ddof) * np.float32(k)
        return np.maximum(x - cutoff, np.float32(0.0))

    # -- position and attention -----------------------------------------------------------------

    def rope_tables(
        self,
        positions: np.ndarray,
        base: float,
        n_dims: int,
        freq_scale: float,
        freq_factors: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [T, 1, n_dims/2] for these positions; kept for the next layers, which
        ask for the same (a forward pass asks once per distinct base)."""
        key = (
            positions.tobytes(),
            base,
            n_dims,
            freq_scale,
            None if freq_factors is None else freq_factors.tobytes(),
        )
        if key not in self._rope_tables:
            if len(self._rope_tables) > 8:
                self._rope_tables.clear()
            half = n_dims // 2
            inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2 / n_dims)
            if freq_factors is not None:
                inv_freq = inv_freq / freq_factors
            angles = (positions.astype(np.float64)[:, None] * freq_scale) * inv_freq[None, :]
            tables = (
                np.cos(angles).astype(np.float32)[:, None, :],
                np.sin(angles).astype(np.float32)[:, None, :],
            )
            self._rope_tables[key] = tables
        return self._rope_tables[key]

    def rope(
        self,
        x: np.ndarray,
        positions: np.ndarray,
        base: float,
        n_dims: int,
        neox: bool,
        freq_scale: float = 1.0,
        freq_factors: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rotate the first `n_dims` of each head of x [T, H, D] by position.

        `neox` pairs dimension i with i + n_dims/2 (GPT-NeoX / HF rotate_half); otherwise
        adjacent dimensions (2i, 2i+1) are paired, as llama.cpp's converted Llama weights expect.
        `freq_factors` (llama.cpp's rope_freqs tensor) divide each frequency (Llama 3 scaling).
        """
        half = n_dims // 2
        if not 0 < n_dims <= x.shape[-1] or n_dims % 2:
            raise ModelFileError(
                f"RoPE over {n_dims} dimensions of heads of {x.shape[-1]}: the file's "
                "rope dimension count does not fit its heads"
            )
        cos, sin = self.rope_tables(positions, base, n_dims, freq_scale, freq_factors)
        if self.fast and x.dtype == np.float32:
            out = np.empty(x.shape, np.float32)
            rope_rows(x, cos[:, 0, :], sin[:, 0, :], n_dims, neox, out)  # x may be a strided view: no copy
            return out
        out = x.copy()
        if neox:
            a, b = x[..., :half], x[..., half:n_dims]
            out[..., :half], out[..., half:n_dims] = a * cos - b * sin, b * cos + a * sin
        else:
            a, b = x[..., 0:n_dims:2], x[..., 1:n_dims:2]
            out[..., 0:n_dims:2], out[..., 1:n_dims:2] = a * cos - b * sin, b * cos + a * sin
        return out

    @staticmethod
    def _softmax_scores(scores, q_pos, k_pos, window, softcap, alibi) -> np.ndarray:
        """Scaled scores [Hkv, G, T, S] -> probabilities, with numpy (the reference mode)."""
        n_kv, group = scores.shape[:2]
        if softcap:
            scores = np.tanh(scores / softcap) * softcap
        if alibi is not None:
            scores = scores + alibi.reshape(n_kv, group, 1, 1) * k_pos.astype(np.float32)
        delta = q_pos[:, None] - k_pos[None, :]
        visible = (delta >= 0) & (k_pos[None, :] >= 0)  # position -1: an empty cache slot
        if window:
            visible &= delta < window
        scores = np.where(visible, scores, np.float32(-np.inf))
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        return probs

    def attention(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        q_pos: np.ndarray,
        k_pos: np.ndarray,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
        alibi: np.ndarray | None = None,
    ) -> np.ndarray:
        """Causal (optionally sliding-window) attention; q [T, Hq, D], k/v [S, Hkv, D] -> [T, Hq*Dv].

        Query heads share kv heads in groups (GQA / MQA). A key is visible to a query when it is
        not later and, with a window, fewer than `window` positions back; keys at position -1 are
        empty cache slots. `alibi` [Hq] adds
        slope * key position to each head's scores (softmax ignores the per-query offset).
        """
        T, n_heads, _ = q.shape
        S, n_kv, _ = k.shape
        if n_heads % n_kv or q.shape[-1] != k.shape[-1] or v.shape[:2] != k.shape[:2]:
            raise ModelFileError(
                f"attention of {n_heads} query heads {q.shape[-1]} wide over {n_kv} key heads "
                f"{k.shape[-1]} wide: the file's head counts do not fit its tensors"
            )
        if T <= DECODE_ATTENTION_MAX_T and self.fast and attention_kernels.fits(q.shape[-1], v.shape[-1]):
            out = np.empty((T, n_heads, v.shape[-1]), np.float32)
            slopes = np.zeros(0, np.float32) if alibi is None else alibi
            attend(
                np.ascontiguousarray(q),
                _cache_array(k),
                _cache_array(v),
                q_pos,
                k_pos,
                np.float32(scale),
                window or 0,
                np.float32(softcap or 0.0),
                slopes,
                out,
            )
            return out.reshape(T, -1)
        # Queries a chunk at a time, each over the cache slots it can see: causal attention over
        # a prompt sees half the keys on average, and the products skip the rest.
        low, high = _visible_slots(q_pos, k_pos, window)
        k, v, k_pos = k[low:high], v[low:high], k_pos[low:high]
        if k.dtype == np.float16:  # a float16 cache: BLAS multiplies float32
            k, v = widen_f16(k), widen_f16(v)
        out = np.empty((T, n_heads * v.shape[-1]), np.float32)
        for first in range(0, T, PROMPT_ATTENTION_CHUNK):
            end = min(T, first + PROMPT_ATTENTION_CHUNK)
            low, high = _visible_slots(q_pos[first:end], k_pos, window)
            out[first:end] = self._prompt_attention(
                q[first:end],
                k[low:high],
                v[low:high],
                q_pos[first:end],
                k_pos[low:high],
                scale,
                window,
                softcap,
                alibi,
            )
        return out

    def _prompt_attention(self, q, k, v, q_pos, k_pos, scale, window, softcap, alibi) -> np.ndarray:
        """`attention` with BLAS products (float32 keys and values), every query over every slot given."""
        T, n_heads, _ = q.shape
        S, n_kv, _ = k.shape
        group = n_heads // n_kv
        # batched matmuls per kv head (BLAS), the query heads of a group stacked along rows
        qg = q.reshape(T, n_kv, group, -1).transpose(1, 2, 0, 3).reshape(n_kv, group * T, -1)
        scores = np.matmul(qg, k.transpose(1, 2, 0)).reshape(n_kv, group, T, S)
        if self.fast:  # one numba pass, in place
            softmax_scores(
                scores,
                q_pos,
                k_pos,
                np.float32(scale),
                window or 0,
                np.float32(softcap or 0.0),
                np.zeros(0, np.float32) if alibi is None else alibi,
            )
            probs = scores
        else:
            probs = self._softmax_scores(scores * np.float32(scale), q_pos, k_pos, window, softcap, alibi)
        out = np.matmul(probs.reshape(n_kv, group * T, S), v.transpose(1, 0, 2))  # [Hkv, G*T, Dv]
        return out.reshape(n_kv, group, T, -1).transpose(2, 0, 1, 3).reshape(T, -1)
