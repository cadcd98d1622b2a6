"""Gemma 3n's text decoder: AltUp streams, LAuReL, per-layer embeddings (PLE), KV sharing,
Gaussian top-k activation sparsity, q/k/v norms, final soft-capping.

Every layer works on `altup_inputs` copies of the hidden state (streams, [N, T, D]); it runs the
usual Gemma block on the active stream only, after a learned linear prediction of all streams,
and corrects all of them from the result. Each layer also receives its slice of the per-layer
input: a row of the per-layer embedding table (which stays in the file and is read per token,
see `streamed`) mixed with a projection of the token embedding.

Unlike Gemma 1-3, the norms multiply by w itself (no 1 + w). Tensor and key names follow
llama.cpp's `gemma3n`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFileError
from ..formats.gguf import Tensor
from ..formats.quants import GGMLType
from ..kvcache import KVCache, LayerCache, SharedLayerCache
from .base import REQUIRED, AttentionSpec, Norm, Weights
from .gemma3 import Gemma3Args

PER_LAYER_TABLE = "per_layer_token_embd.weight"


@dataclass
class Gemma3nArgs(Gemma3Args):
    per_layer_dim: int = REQUIRED
    altup_inputs: int = 4
    altup_active: int = 0
    shared_kv_layers: int = 0
    sparsity_scale: object = None  # per layer: std multiplier of the top-k cut-off, -inf for none
    coef_clip: float | None = None

    _keys = {
        **Gemma3Args._keys,
        "per_layer_dim": "embedding_length_per_layer_input",
        "altup_inputs": "altup.num_inputs",
        "altup_active": "altup.active_idx",
        "shared_kv_layers": "attention.shared_kv_layers",
        "sparsity_scale": "activation_sparsity_scale",
        "coef_clip": "pocketlm.altup.coef_clip",
    }
    default_period = 5
    _per_layer = frozenset({"ffn_size"})  # MatFormer slices: one FFN width per layer

    def kv_source(self, i: int) -> int | None:
        return shared_kv_source(self, i)


def shared_kv_source(args, i: int) -> int | None:
    """The layer whose keys and values layer i reuses (the last unshared layer of its kind), or
    None when it computes its own (Gemma 3n and Gemma 4: the last `shared_kv_layers` share)."""
    first_shared = args.n_layers - args.shared_kv_layers
    if i < first_shared:
        return None
    same_kind = [j for j in range(first_shared) if args.is_sliding(j) == args.is_sliding(i)]
    if not same_kind:
        raise ModelFileError(f"layer {i} shares keys and values, but no earlier layer of its kind has them")
    return same_kind[-1]


def kv_sharing_cache(blocks, max_tokens: int, layer_cache=LayerCache) -> KVCache:
    """A cache for blocks with `kv_source` and `attention.spec`: a layer of its own for each block
    that computes keys and values, a SharedLayerCache for each that reuses another's."""
    layers = []
    for b in blocks:
        s = b.attention.spec
        layers.append(
            SharedLayerCache(b.kv_source)
            if b.kv_source is not None
            else layer_cache(max_tokens, s.n_kv_heads, s.head_dim, s.head_dim, s.window)
        )
    return KVCache(layers, max_tokens)


def clipped(t: Tensor, limit: float | None) -> Tensor:
    """A small weight with its values clipped to [-limit, limit] (float32, held in memory), or
    itself when there is no limit."""
    if not limit:
        return t
    values = np.clip(t.dequantize(), -limit, limit).astype(np.float32)
    return Tensor(f"{t.name}|clip", GGMLType.F32, t.shape, values.reshape(-1).view(np.uint8))


class Attention:
    """q/k norms with weights, v norm without; attention scale 1. A shared layer has only its
    query and output projections and attends over its source layer's keys and values."""

    def __init__(
        self, w: Weights, prefix: str, spec: AttentionSpec, eps: float, shared: bool, freq_factors=None
    ):
        """`freq_factors`: a tensor dividing RoPE's frequencies (Gemma 4's partial rotation), or None."""
        self.spec, self.eps, self.shared, self.freq_factors = spec, eps, shared, freq_factors
        self.wq, self.wo, self.q_norm = (
            w(f"{prefix}.{n}.weight") for n in ("attn_q", "attn_output", "attn_q_norm")
        )
        if not shared:
            self.wk, self.wv, self.k_norm = (
                w(f"{prefix}.{n}.weight") for n in ("attn_k", "attn_v", "attn_k_norm")
            )

    def __call__(self, ops, x, positions: np.ndarray, cache):
        s, T = self.spec, len(x)
        factors = ops.dense(self.freq_factors) if self.freq_factors is not None else None
        if self.shared:
            q = ops.linear(x, self.wq)
        else:
            q, k, v = ops.linears(x, [self.wq, self.wk, self.wv], [None, None, None])
        q = ops.rms_norm(q.reshape(T, s.n_heads, s.head_dim), self.q_norm, self.eps)
        q = ops.rope(q, positions, s.rope_base, s.rope_dims, True, freq_factors=factors)
        if self.shared:
            keys, values, key_positions = cache.fetch()
        else:
            k = ops.rms_norm(k.reshape(T, s.n_kv_heads, s.head_dim), self.k_norm, self.eps)
            v = ops.rms_norm(v.reshape(T, s.n_kv_heads, s.head_dim), None, self.eps)
            k = ops.rope(k, positions, s.rope_base, s.rope_dims, True, freq_factors=factors)
            keys, values, key_positions = cache.update_and_fetch(k, v, int(positions[0]))
        out = ops.attention(q, keys, values, positions, key_positions, s.scale, s.window)
        return ops.linear(out, self.wo)


class AltUp:
    """Predict all streams [N, T, D] from each other before the block; correct them after it."""

    def __init__(self, w: Weights, prefix: str, args: Gemma3nArgs):
        self.router, self.router_norm = (
            w(f"{prefix}.altup_router.weight"),
            w(f"{prefix}.altup_router_norm.weight"),
        )
        self.predict_coef, self.correct_coef = (
            clipped(w(f"{prefix}.altup_{n}_coef.weight"), args.coef_clip) for n in ("predict", "correct")
        )
        self.n, self.active, self.eps = args.altup_inputs, args.altup_active, args.norm_eps
        self.router_scale = 1.0 / args.hidden_size

    def modalities(self, ops, x):
        """tanh of the routed stream, [T, N] (a soft cap of 1 is tanh)."""
        routed = ops.linear(ops.rms_norm(x, self.router_norm, self.eps) * self.router_scale, self.router)
        return ops.softcap(routed, 1.0)

    def predict(self, ops, streams):
        """pred[j] = streams[j] + sum_k R[t, j, k] streams[k], R [T, N * N] from the active stream."""
        R = ops.linear(self.modalities(ops, streams[self.active]), self.predict_coef)
        return streams + ops.mix(streams, R)

    def correct(self, ops, predictions, activated):
        """corrected[j] = pred[j] + (C[t, j] + 1) (activated - pred[active]), C [T, N]."""
        scale = ops.linear(self.modalities(ops, activated), self.correct_coef) + 1.0
        innovation = activated - predictions[self.active]
        return predictions + ops.mix(innovation.reshape(1, *innovation.shape), scale)


class Block:
    std_ddof = 0  # the population std, as transformers computes it (llama.cpp divides by n - 1)

    def __init__(self, w: Weights, i: int, args: Gemma3nArgs):
        sliding = args.is_sliding(i)
        spec = args.attention_spec(
            rope_base=args.rope_base_swa if sliding else args.rope_base,
            scale=1.0,
            window=args.sliding_window if sliding else None,
        )
        p, eps = f"blk.{i}", args.norm_eps
        self.kv_source = args.kv_source(i)
        self.attention = Attention(w, p, spec, eps, shared=self.kv_source is not None)
        norms = (
            "attn_norm",
            "post_attention_norm",
            "ffn_norm",
            "post_ffw_norm",
            "laurel_post_norm",
            "post_norm",
        )
        (
            self.attn_norm,
            self.post_attn_norm,
            self.ffn_norm,
            self.post_ffn_norm,
            self.laurel_norm,
            self.ple_norm,
        ) = (Norm(w, f"{p}.{n}", "rms", eps) for n in norms)
        self.gate, self.up, self.down = (w(f"{p}.ffn_{n}.weight") for n in ("gate", "up", "down"))
        self.laurel_l, self.laurel_r = w(f"{p}.laurel_l.weight"), w(f"{p}.laurel_r.weight")
        self.ple_gate, self.ple_proj = w(f"{p}.inp_gate.weight"), w(f"{p}.proj.weight")
        self.correct_scale = w(f"{p}.altup_correct_scale.weight")
        self.altup = AltUp(w, p, args)
        scale = args.sparsity_scale[i] if args.sparsity_scale is not None else -math.inf
        self.sparsity = np.float32(scale) if math.isfinite(scale) else None

    def mlp(self, ops, x):
        gate, up = ops.linears(x, [self.gate, self.up], [None, None])
        if self.sparsity is not None:  # keep what lies above mean + k * std (Gaussian top-k)
            gate = ops.gaussian_topk(gate, self.sparsity, self.std_ddof)
        return ops.linear(ops.gelu_tanh(gate) * up, self.down)

    def __call__(self, ops, streams, per_layer, positions, cache):
        predictions = self.altup.predict(ops, streams)
        a = predictions[self.altup.active]
        x = self.attn_norm(ops, a)
        laurel = x + self.laurel_norm(ops, ops.linear(ops.linear(x, self.laurel_l), self.laurel_r))
        attn = self.post_attn_norm(ops, self.attention(ops, x, positions, cache))
        h = (a + attn + laurel) * (1 / math.sqrt(2))
        h = h + self.post_ffn_norm(ops, self.mlp(ops, self.ffn_norm(ops, h)))
        corrected = self.altup.correct(ops, predictions, h)
        # the per-layer input, gated by the corrected active stream, is added to the other streams
        gate = ops.gelu_tanh(
            ops.linear(corrected[self.altup.active] * ops.dense(self.correct_scale), self.ple_gate)
        )
        added = self.ple_norm(ops, ops.linear(gate * per_layer, self.ple_proj))
        return ops.concat([corrected[:1], corrected[1:] + added])


class PerLayerInputs:
    """Each layer's per-layer input [T, P] (Gemma 3n and Gemma 4): its slice of the table's rows
    times sqrt(P), plus the normed projection of the scaled token embedding, times 1/sqrt(2).

    Layer i's part of each token's row of the table [ids, L * P] is row id * L + i of the same
    bytes read as [ids * L, P] (ids the table lacks read row 0); its part of the projection
    [L * P, D], rows i * P .. (i + 1) * P: every layer reads its own through ops alone."""

    def __init__(self, w: Weights, args):
        self.args, P, L = args, args.per_layer_dim, args.n_layers
        table = w(PER_LAYER_TABLE)
        self.id_limit = table.shape[0]
        self.table = table.regrouped(table.shape[0] * L)
        proj = w("per_layer_model_proj.weight")
        self.proj = [proj.rows(i * P, (i + 1) * P) for i in range(L)]
        self.norm = Norm(w, "per_layer_proj_norm", "rms", args.norm_eps)

    def __call__(self, ops, i: int, ids: np.ndarray, embedded):
        a = self.args
        rows = ops.embedding(self.table, ids, stride=a.n_layers, offset=i, id_limit=self.id_limit)
        proj = ops.linear(embedded, self.proj[i]) * a.hidden_size**-0.5
        return (self.norm(ops, proj) + rows * math.sqrt(a.per_layer_dim)) * 2**-0.5


class Model:
    """Satisfies the engine's contract (`make_cache`, `forward`, `vocab_size`, `args`)."""

    # Tensors the runtime leaves in the file and reads row by row (never made resident).
    streamed = frozenset({PER_LAYER_TABLE})

    def __init__(self, args: Gemma3nArgs, w: Weights):
        self.args = args
        self.token_embd = w("token_embd.weight")
        self.per_layer = PerLayerInputs(w, args)
        n = args.altup_inputs - 1
        self.altup_proj = [w("altup_proj.weight").part(j) for j in range(n)]
        self.altup_unembed = [w("altup_unembd_proj.weight").part(j) for j in range(n)]
        self.output_norm = Norm(w, "output_norm", "rms", args.norm_eps)
        self.vocab_size = self.token_embd.shape[0]
        self.layers = [Block(w, i, args) for i in range(args.n_layers)]

    def make_cache(self, max_tokens: int, layer_cache=LayerCache) -> KVCache:
        return kv_sharing_cache(self.layers, max_tokens, layer_cache)

    def forward(self, ops, ids: np.ndarray, cache: KVCache, all_logits: bool = False):
        positions = np.arange(cache.offset, cache.offset + len(ids))
        ids = np.asarray(ids, np.int64)
        T, D, N = len(ids), self.args.hidden_size, self.args.altup_inputs
        e = ops.embedding(self.token_embd, ids) * math.sqrt(D)
        # the other streams: projections of the embedding, at its root mean square
        streams = ops.concat(
            [e.reshape(1, T, D)]
            + [ops.match_rms(ops.linear(e, w), e).reshape(1, T, D) for w in self.altup_proj]
        )
        for i, layer in enumerate(self.layers):
            streams = layer(ops, streams, self.per_layer(ops, i, ids, e), positions, cache[i])
        cache.offset += len(ids)
        last = [streams[j] if all_logits else streams[j][-1:] for j in range(N)]
        merged = last[0]
        for s, w in zip(last[1:], self.altup_unembed):  # back to the first stream's magnitude
            merged = merged + ops.match_rms(ops.linear(s, w), last[0])
        logits = ops.linear(self.output_norm(ops, merged * (1.0 / N)), self.token_embd)
        return ops.softcap(logits, self.args.final_softcap) if self.args.final_softcap else logits


ARGS = Gemma3nArgs
