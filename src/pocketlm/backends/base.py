"""The op set architectures are written in: every operation a model may apply to activations.

A backend implements `Backend`; architecture files (`models/`) call nothing else on activations.
Activations are the backend's own arrays (numpy on the CPU, `GpuTensor` on the GPU) of float32
values, shaped [T, n] (T tokens), [T, heads, head_dim] or [streams, T, n]; besides these ops they
support `+` and `*` (same shape, a broadcast of trailing axes, or a scalar), `-` (same shape),
`reshape`, `len`, and indexing and slicing the first axis. Weights are
`formats.gguf.Tensor`s, read by the backend in whatever layout it prepared.

Ops some backends lack are *capabilities*: a model lists those it needs (`CausalLM.requires`), and
the engine compares them with `Backend.capabilities` before it runs anything, so a model a backend
cannot run is refused with one line naming what is missing, never by the backend's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

Activation = Any  # np.ndarray | GpuTensor: see the module docstring
Weight = Any  # formats.gguf.Tensor

# Capabilities: ops (or uses of them) that not every backend provides.
LAYER_NORM = "layer_norm"  # `layer_norm`
EXACT_GELU = "gelu"  # `gelu` (erf); `gelu_tanh` every backend has
ALIBI = "alibi"  # `attention(..., alibi=slopes)`
ALL_CAPABILITIES = frozenset({LAYER_NORM, EXACT_GELU, ALIBI})


@runtime_checkable
class Backend(Protocol):
    name: str  # for messages and reports only: nothing outside backends/ branches on it
    capabilities: frozenset[str]

    # -- weights, caches, the token loop ---------------------------------------------------------

    def prepare(self, tensors: list[Weight], on_packed=None, copy_out=None) -> None:
        """Lay out every weight as the kernels read it, at load. `on_packed(tensor)` after each
        that was copied (its file pages may be let go), `copy_out(tensor)` makes resident copies."""

    def pin(self, name: str, data: np.ndarray) -> None:
        """Read tensor `name` from `data` (a resident copy) instead of the file."""

    def dense(self, w: Weight) -> np.ndarray:
        """A small weight's float32 values on the host (norm scales, RoPE factors)."""

    def layer_cache(self, capacity: int, n_kv_heads: int, k_dim: int, v_dim: int, window: int | None):
        """One layer's KV cache: `update_and_fetch(k, v, start) -> (keys, values, key_positions)`."""

    def to_host(self, x: Activation) -> np.ndarray:
        """An activation's values as a numpy array."""

    def warm_up(self, model, make_cache) -> None:
        """Whatever a backend does once at load so that the first prompt pays nothing extra
        (the CPU runs one token: kernels loaded from their cache, q/k/v rows stacked)."""

    def capture(
        self, forward: Callable[[Any, np.ndarray, Any], Activation]
    ) -> Callable[[np.ndarray, Any], Activation]:
        """`forward(ops, ids, cache)` (a model's pass, advancing cache.offset) as a step called
        `step(ids, cache)`: a backend may record the pass once and replay it for later tokens
        without running the model's Python (the GPU's, like CUDA graphs or mx.compile), or run it
        each time (the CPU's). The engine's decode steps go through it."""

    # -- ops -------------------------------------------------------------------------------------

    def linear(self, x: Activation, w: Weight, bias: Weight | None = None) -> Activation:
        """x [T, in] @ W [out, in].T (+ bias [out]) -> [T, out]."""

    def linears(self, x: Activation, weights: list[Weight], biases: list[Weight | None]) -> list[Activation]:
        """`linear` of one input by several matrices (q/k/v, gate/up): one pass where it pays."""

    def embedding(
        self, w: Weight, ids: np.ndarray, stride: int = 1, offset: int = 0, id_limit: int | None = None
    ) -> Activation:
        """Rows `ids * stride + offset` [T] of the table W [rows, n] -> [T, n] (a per-layer table
        read as [vocab * layers, n]: stride = layers, offset = the layer); ids at or beyond
        `id_limit` read as id 0 (Gemma 3n's per-layer table covers fewer ids than the vocabulary)."""

    def rms_norm(self, x: Activation, w: Weight | None, eps: float) -> Activation:
        """x / sqrt(mean(x^2) + eps) * w over the last axis (w None: no scale); x [..., n]."""

    def layer_norm(self, x: Activation, w: Weight, b: Weight | None, eps: float) -> Activation:
        """(x - mean) / sqrt(var + eps) * w + b over the last axis. Capability LAYER_NORM."""

    def silu(self, x: Activation) -> Activation:
        """x * sigmoid(x), elementwise."""

    def gelu_tanh(self, x: Activation) -> Activation:
        """GELU, tanh approximation, elementwise."""

    def gelu(self, x: Activation) -> Activation:
        """GELU with erf, elementwise. Capability EXACT_GELU."""

    def softcap(self, x: Activation, cap: float) -> Activation:
        """cap * tanh(x / cap), elementwise."""

    def concat(self, xs: list[Activation]) -> Activation:
        """xs [n_i, ...] joined along the first axis -> [sum n_i, ...]."""

    def mix(self, x: Activation, c: Activation) -> Activation:
        """Per-token weighted sums of K streams: x [K, T, n], c [T, M * K] ->
        y [M, T, n], y[j, t] = sum_k c[t, j * K + k] * x[k, t] (Gemma 3n's AltUp)."""

    def match_rms(self, x: Activation, ref: Activation) -> Activation:
        """Each row of x [T, n] rescaled to the root mean square of the same row of ref [T, n']:
        x * sqrt(mean(ref^2)) / sqrt(max(mean(x^2), 1e-5))."""

    def gaussian_topk(self, x: Activation, k: float, ddof: int = 0) -> Activation:
        """max(x - (mean + k * std), 0) over the last axis, std with `ddof` (Gemma 3n's
        activation sparsity: what lies above a Gaussian's top-k cut-off)."""

    def rope(
        self,
        x: Activation,
        positions: np.ndarray,
        base: float,
        n_dims: int,
        neox: bool,
        freq_scale: float = 1.0,
        freq_factors: np.ndarray | None = None,
    ) -> Activation:
        """Rotary embedding of the first `n_dims` of each head: x [T, heads, head_dim] at
        `positions` [T]; NeoX (halves) or GPT-J (interleaved) pairing; positions scaled by
        `freq_scale`, frequencies divided by `freq_factors` [n_dims / 2] (Llama 3)."""

    def attention(
        self,
        q: Activation,
        k: Activation,
        v: Activation,
        q_pos: np.ndarray,
        k_pos: np.ndarray,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
        alibi: np.ndarray | None = None,
    ) -> Activation:
        """Causal attention of q [T, heads, d] over the cache's k [S, kv_heads, d] and v [S, kv_heads, dv]
        (heads a multiple of kv_heads) at positions q_pos [T] / k_pos [S]; keys further back than
        `window` are masked, scores soft-capped, ALiBi slopes [heads] added (capability ALIBI)
        -> [T, heads * dv]."""


def missing_capabilities(model, backend) -> frozenset[str]:
    """What `model` needs that `backend` (a backend or its class) lacks."""
    return frozenset(getattr(model, "requires", frozenset())) - backend.capabilities
