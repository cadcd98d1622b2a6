"""One preallocated key/value cache per model: full layers hold `max_tokens` positions,
sliding-window layers a ring of `window` slots (position p lives in slot p % window).
Layers that reuse another layer's keys and values (Gemma 3n's KV sharing) get a `SharedLayerCache`."""

from __future__ import annotations

import numpy as np

from .errors import InvalidOptionError

KV_CACHE_TYPES = {"f16": np.float16, "f32": np.float32}  # what a layer's keys and values may be stored as
# The cpu backend's, as llama.cpp's: float16 halves the cache and the bytes a decode step reads (logits within
# 0.5% of float32's); "f32" on request. The reference and webgpu backends always keep float32.
DEFAULT_KV_CACHE = "f16"


def cache_dtype(kv_cache: str):
    """The numpy type of a KV cache named "f16" or "f32"; anything else is a one-line error."""
    if kv_cache not in KV_CACHE_TYPES:
        raise InvalidOptionError(f"kv_cache {kv_cache!r} is not one of {', '.join(KV_CACHE_TYPES)}")
    return KV_CACHE_TYPES[kv_cache]


class LayerCache:
    shared = False  # set by KVCache when a SharedLayerCache reads this layer's `last`

    def __init__(
        self, capacity: int, n_kv_heads: int, k_dim: int, v_dim: int, window: int | None, dtype=np.float32
    ):
        """`dtype`: what keys and values are stored as (float32, or float16: half the memory and
        the bytes decode reads, values rounded to 11 significant bits; beyond +-65504, as in
        llama.cpp's float16 cache, they become infinite and the attention output NaN)."""
        self.window = window
        self.capacity = min(capacity, window) if window else capacity
        self.keys = np.zeros((self.capacity, n_kv_heads, k_dim), dtype)
        self.values = np.zeros((self.capacity, n_kv_heads, v_dim), dtype)
        self.positions = np.full(self.capacity, -1, np.int64)  # -1: empty slot

    def update_and_fetch(self, k: np.ndarray, v: np.ndarray, start: int):
        """Store k/v [T, Hkv, D] for positions start.. and return what those queries may see:
        (keys, values, key_positions); kept as `last` if layers share them (only then: a
        window layer's prompt fetch is a copy, and kept by every layer they added up to 16 MB
        for Gemma 3 at 512 tokens)."""
        fetched = self._update_and_fetch(k, v, start)
        if self.shared:
            self.last = fetched
        return fetched

    def _update_and_fetch(self, k: np.ndarray, v: np.ndarray, start: int):
        T = len(k)
        if T == 1 and not self.window:  # decode: the common case, without the array of positions
            self.keys[start], self.values[start], self.positions[start] = k[0], v[0], start
            return self.keys[: start + 1], self.values[: start + 1], self.positions[: start + 1]
        positions = np.arange(start, start + T)
        if not self.window:
            self.keys[start : start + T], self.values[start : start + T] = k, v
            self.positions[start : start + T] = positions
            end = start + T
            return self.keys[:end], self.values[:end], self.positions[:end]
        if T == 1:
            # One new token may take the slot of the one a window behind it, which it cannot see:
            # attend over the ring in place (empty slots have position -1 and are masked).
            slot = start % self.capacity
            self.keys[slot], self.values[slot], self.positions[slot] = k[0], v[0], start
            return self.keys, self.values, self.positions
        # Several: earlier entries still in the window, then the new ones (all of them, since the
        # first new queries may need new keys that the ring cannot keep), rounded as the ring keeps
        # them (so that a prompt gives the same in one piece as in several).
        k, v = k.astype(self.keys.dtype, copy=False), v.astype(self.values.dtype, copy=False)
        old = (self.positions >= 0) & (self.positions < start)
        keys = np.concatenate([self.keys[old], k])
        values = np.concatenate([self.values[old], v])
        key_positions = np.concatenate([self.positions[old], positions])
        keep = slice(max(0, T - self.capacity), T)
        slots = positions[keep] % self.capacity
        self.keys[slots], self.values[slots], self.positions[slots] = k[keep], v[keep], positions[keep]
        return keys, values, key_positions

    def copy(self) -> LayerCache:
        clone = object.__new__(LayerCache)
        clone.window, clone.capacity = self.window, self.capacity
        clone.keys, clone.values, clone.positions = (
            self.keys.copy(),
            self.values.copy(),
            self.positions.copy(),
        )
        return clone

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class SharedLayerCache:
    """A layer that stores nothing and attends over what layer `source` fetched in the same
    forward pass (its keys, values and positions)."""

    nbytes = 0

    def __init__(self, source: int):
        self.source = source
        self.layer: LayerCache | None = None  # set by KVCache

    def fetch(self):
        return self.layer.last

    def copy(self) -> SharedLayerCache:
        return SharedLayerCache(self.source)


class KVCache:
    """The cache of a whole model; `offset` is how many positions are filled."""

    def __init__(self, layers: list[LayerCache | SharedLayerCache], max_tokens: int):
        self.layers = layers
        self.max_tokens = max_tokens
        self.offset = 0
        for layer in layers:
            if isinstance(layer, SharedLayerCache):
                layer.layer = layers[layer.source]
                layer.layer.shared = True

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def clear(self) -> None:
        """Forget every position; the buffers stay (a recorded GPU pass keeps reading them)."""
        self.offset = 0
        for layer in self.layers:
            if isinstance(layer, LayerCache):
                layer.positions.fill(-1)

    def copy(self) -> KVCache:
        clone = KVCache([layer.copy() for layer in self.layers], self.max_tokens)
        clone.offset = self.offset
        return clone

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
