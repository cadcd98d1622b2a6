"""Google's LLM files (.litertlm, .task, .tflite made by litert-torch / ai-edge-torch) -> GGUF.

The model is read from the graph of the `decode` signature, not from tensor names: the exporter
merges the names of tensors that share a buffer, so a tensor named `...Linear_gate_proj` may hold
the up projection. In each layer:
- key / value projections: the matmuls whose outputs reach the layer's `kv_cache_k_i` /
  `kv_cache_v_i` writes (a norm on the way is the k norm); the query: the other matmul reading
  the same normed input; the norm that produced that input: the attention norm;
- the output projection: the matmul reading attention @ V; a norm on its output (Gemma): the
  post-attention norm;
- gate / up: the two matmuls reading the next norm's output, gate being the one through the
  activation; down: the matmul reading their product; a norm on its output: the post-FFN norm;
- RMSNorm epsilon from the norm's decomposition, the attention scale from the constant that
  multiplies the query, RoPE bases (and linear or per-frequency scaling) from the inverse
  frequencies, sliding windows from the constant each such layer's mask is built with.
The graph decides the architecture (llama, qwen2, qwen3, gemma3); where the exporter recorded the
Hugging Face class, that must agree.

Weights keep their own bits where GGUF has the same block: INT8 per output channel becomes Q8_0
with the channel's scale in every block (no rounding but the scale's to float16), INT4 in blocks
of 32 with float16 scales becomes Q4_0 exactly. Anything else is dequantized and quantized by the
conversion policy.
"""

from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError, UnsupportedError
from ..formats.gguf import GGUFWriter, arch_key
from ..formats.quants import GGMLType, quantize
from ..formats.tflite import TFLiteModel, TFLiteTensor
from .architectures import mapping_for
from .policy import ConversionConfig
from .tokenizer import tokenizer_metadata

SUFFIXES = (".litertlm", ".task", ".tflite")
_INT_VALUES = {
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
}
_PASS_THROUGH = {"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "CAST"}
_ACTIVATIONS = {"LOGISTIC": "silu", "GELU": "gelu_tanh"}
_HF_CLASS = re.compile(r"transformers\.models\.(\w+)\.modeling_\w+")
_KNOWN_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_KNOWN_TYPES |= {"gemma3": "gemma3", "gemma3_text": "gemma3"}


def is_google_file(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


# -- the bundle: a TFLite LLM and what goes with it -----------------------------------------------


@dataclass
class Bundle:
    path: Path
    model: TFLiteModel
    tokenizer_json: dict | None = None
    sentencepiece: bytes | None = None
    start_token: str | int | None = None
    stop_tokens: list[str | int] = field(default_factory=list)
    chat_template: str | None = None
    max_tokens: int | None = None
    model_type: str | None = None  # LlmMetadata's llm_model_type (gemma3, qwen3, generic_model, ...)
    pad_token: str | None = None


def open_bundle(path: Path) -> Bundle:
    """The prefill/decode model, tokenizer and LLM metadata of a .litertlm, .task or .tflite file."""
    suffix = path.suffix.lower()
    if suffix == ".litertlm":
        from ..formats.litertlm import hf_tokenizer_json, open_litertlm

        f = open_litertlm(path)
        models = [s for s in f.sections if s.tflite is not None]
        main = [s for s in models if s.items.get("model_type") in (None, "tf_lite_prefill_decode")]
        others = sorted({str(s.items.get("model_type")) for s in models} - {"tf_lite_prefill_decode", "None"})
        if others and any(o in ("tf_lite_embedder", "tf_lite_per_layer_embedder") for o in others):
            raise UnsupportedError(
                f"{path}: the model is split into {', '.join(others)} sections (Gemma 3n and later); "
                "converting those files is not supported yet"
            )
        if not main:
            raise UnsupportedError(f"{path}: no tf_lite_prefill_decode section; nothing to convert")
        bundle = Bundle(path, main[0].tflite)
        for s in f.sections:
            if s.data_type == "HF_Tokenizer_Zlib":
                bundle.tokenizer_json = hf_tokenizer_json(s.data, path, f"section {s.index}")
            elif s.data_type == "SP_Tokenizer":
                bundle.sentencepiece = bytes(s.data)
            elif s.data_type == "LlmMetadataProto" and s.decoded:
                _llm_metadata(bundle, s.decoded)
        return bundle
    if suffix == ".task":
        from ..formats.task import open_task

        f = open_task(path)
        entries = {e.name: e for e in f.entries}
        if "TF_LITE_PREFILL_DECODE" not in entries:
            raise UnsupportedError(f"{path}: no TF_LITE_PREFILL_DECODE entry; nothing to convert")
        if "TF_LITE_EMBEDDER" in entries or "TF_LITE_PER_LAYER_EMBEDDER" in entries:
            raise UnsupportedError(
                f"{path}: the model is split into embedder and decoder entries (Gemma 3n); "
                "converting those files is not supported yet"
            )
        bundle = Bundle(path, entries["TF_LITE_PREFILL_DECODE"].tflite)
        if "TOKENIZER_MODEL" in entries:
            bundle.sentencepiece = bytes(entries["TOKENIZER_MODEL"].data)
        params = (entries.get("METADATA") and entries["METADATA"].decoded) or {}
        bundle.start_token = params.get("start_token") or params.get("start_token_id")
        bundle.stop_tokens = list(params.get("stop_tokens", []))
        bundle.chat_template = _template_from_parameters(params.get("prompt_template") or {})
        return bundle
    from ..formats.tflite import open_tflite

    return Bundle(path, open_tflite(path))


def _llm_metadata(bundle: Bundle, meta: dict) -> None:
    def token(t: dict) -> str | int | None:
        if "token_str" in t:
            return t["token_str"]
        ids = (t.get("token_ids") or {}).get("ids") or []
        return int(ids[0]) if len(ids) == 1 else None

    bundle.start_token = token(meta.get("start_token") or {})
    pad = token(meta.get("pad_token") or {})
    bundle.pad_token = pad if isinstance(pad, str) else None
    bundle.stop_tokens = [s for s in (token(t) for t in meta.get("stop_tokens", [])) if s is not None]
    bundle.chat_template = meta.get("jinja_prompt_template") or _template_from_parameters(
        ((meta.get("prompt_templates") or {}).get("user")) or {}, meta.get("prompt_templates") or {}
    )
    bundle.max_tokens = int(meta["max_num_tokens"]) if meta.get("max_num_tokens") else None
    kinds = list((meta.get("llm_model_type") or {}).keys())
    bundle.model_type = kinds[0] if kinds else None


def _template_from_parameters(user: dict, roles: dict | None = None) -> str | None:
    """A chat template (Jinja) from prefix / suffix prompt templates, for files without one."""
    prefix, suffix = (
        user.get("prefix", user.get("prompt_prefix")),
        user.get("suffix", user.get("prompt_suffix")),
    )
    if not prefix and not suffix:
        return None
    model = (roles or {}).get("model") or {}
    model_prefix, model_suffix = model.get("prefix", ""), model.get("suffix", "")
    esc = _jinja_string
    return (
        "{% for m in messages %}{% if m.role == 'assistant' %}"
        f"{{{{ {esc(model_prefix)} }}}}{{{{ m.content }}}}{{{{ {esc(model_suffix)} }}}}"
        f"{{% else %}}{{{{ {esc(prefix or '')} }}}}{{{{ m.content }}}}{{{{ {esc(suffix or '')} }}}}{{% endif %}}"
        "{% endfor %}{% if add_generation_prompt %}"
        f"{{{{ {esc(model_prefix)} }}}}{{% endif %}}"
    )


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# -- the decode graph ------------------------------------------------------------------------------


@dataclass
class Layer:
    weights: dict[str, TFLiteTensor] = field(default_factory=dict)  # role -> tensor ("attn_q", ...)
    scale: float | None = None  # what multiplies the query
    inv_freq: np.ndarray | None = None
    window: int | None = None  # sliding window, None: full attention
    activation: str | None = None


@dataclass
class Decoder:
    """What the decode graph computes, in GGUF terms."""

    embedding: TFLiteTensor
    embedding_scale: float | None
    layers: list[Layer]
    output_norm: TFLiteTensor
    output: TFLiteTensor | None  # None: tied to the embedding
    eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    cache_length: int
    hf_type: str | None  # the Hugging Face model_type the exporter recorded, if any


class _Graph:
    def __init__(self, model: TFLiteModel, index: int):
        self.model, self.sub = model, model.subgraphs[index]
        self.tensors, self.ops = self.sub.tensors, self.sub.ops
        self.producer: dict[int, int] = {}
        self.consumers: dict[int, list[int]] = defaultdict(list)
        for k, op in enumerate(self.ops):
            for t in op.outputs:
                self.producer[t] = k
            for t in op.inputs:
                if t >= 0:
                    self.consumers[t].append(k)

    def const(self, t: int) -> bool:
        return t >= 0 and self.tensors[t].nbytes > 0

    def value(self, t: int) -> np.ndarray:
        tensor = self.tensors[t]
        if tensor.type in _INT_VALUES and tensor.quantization.scheme == "none":
            return tensor.data.view(_INT_VALUES[tensor.type]).astype(np.float64)
        return self.model.dequantize(tensor).astype(np.float64)

    def is_fc(self, k: int) -> bool:
        op = self.ops[k]
        return op.op == "FULLY_CONNECTED" and len(op.inputs) > 1 and self.const(op.inputs[1])

    def is_norm(self, k: int) -> bool:
        op = self.ops[k]
        return op.op == "STABLEHLO_COMPOSITE" and "rms_norm" in (op.composite or "")

    def norm_weight(self, k: int) -> TFLiteTensor:
        consts = [t for t in self.ops[k].inputs[1:] if self.const(t)]
        if len(consts) != 1:
            raise self.fail(f"an RMSNorm with {len(consts)} constant inputs")
        return self.tensors[consts[0]]

    def made_by(self, t: int) -> int | None:
        """The op that computed `t`, looking through reshapes and casts."""
        seen = set()
        while t in self.producer and t not in seen:  # a crafted graph may loop
            seen.add(t)
            k = self.producer[t]
            if self.ops[k].op not in _PASS_THROUGH:
                return k
            t = self.ops[k].inputs[0]
        return None

    def upstream(self, t: int, stop: Callable[[int], bool]) -> tuple[list[int], list[int]]:
        """Walk back from tensor `t`: the ops where `stop` holds (not passed), and every op passed."""
        return self._walk(
            t,
            stop,
            lambda t: [self.producer[t]] if t in self.producer else [],
            lambda k: [i for i in self.ops[k].inputs if i >= 0 and not self.const(i)],
        )

    def downstream(self, t: int, stop: Callable[[int], bool]) -> tuple[list[int], list[int]]:
        """Walk forward from tensor `t`: the ops where `stop` holds (not passed), and every op passed."""
        return self._walk(t, stop, lambda t: self.consumers.get(t, []), lambda k: self.ops[k].outputs)

    def _walk(self, t: int, stop, ops_of, next_tensors) -> tuple[list[int], list[int]]:
        found, passed, seen, todo = [], [], set(), [t]
        while todo:
            for k in ops_of(todo.pop()):
                if k in seen:
                    continue
                seen.add(k)
                if stop(k):
                    found.append(k)
                    continue
                passed.append(k)
                todo.extend(next_tensors(k))
        return sorted(found), sorted(passed)

    def scalar_consts(self, ks: list[int], op_name: str) -> list[float]:
        out = []
        for k in ks:
            if self.ops[k].op == op_name:
                for t in self.ops[k].inputs:
                    if self.const(t) and math.prod(self.tensors[t].shape) == 1:
                        out.append(float(self.value(t).ravel()[0]))
        return out

    def fail(self, what: str) -> UnsupportedError:
        return UnsupportedError(
            f"{self.model.path}: the decode graph has {what}; this export's layout is not one pocketlm "
            "can convert (litert-torch exports of Llama, Qwen 2/3 and Gemma 3 decoders are)"
        )


def read_decoder(model: TFLiteModel) -> Decoder:
    sig = next((s for s in model.signatures if s.key == "decode"), None)
    if sig is None:
        raise UnsupportedError(f"{model.path}: no 'decode' signature; not an LLM export pocketlm can convert")
    g = _Graph(model, sig.subgraph)
    k_caches = {
        int(m.group(1)): t for n, t in sig.inputs.items() if (m := re.fullmatch(r"kv_cache_k_(\d+)", n))
    }
    v_caches = {
        int(m.group(1)): t for n, t in sig.inputs.items() if (m := re.fullmatch(r"kv_cache_v_(\d+)", n))
    }
    n_layers = len(k_caches)
    if not n_layers or sorted(k_caches) != list(range(n_layers)) or sorted(v_caches) != list(range(n_layers)):
        raise g.fail(f"key caches {sorted(k_caches)} and value caches {sorted(v_caches)}")
    k_shape = g.tensors[k_caches[0]].shape
    if len(k_shape) != 4 or k_shape[0] != 1:
        raise g.fail(f"a key cache of shape {list(k_shape)}")

    embedding, embedding_scale = _embedding(g)
    layers, eps_values = [], set()
    for i in range(n_layers):
        layer, eps = _layer(g, i, k_caches[i], v_caches[i])
        layers.append(layer)
        eps_values |= eps
    # the output: the last matmul with a [vocab, hidden] weight
    heads = [
        k for k in range(len(g.ops)) if g.is_fc(k) and g.tensors[g.ops[k].inputs[1]].shape == embedding.shape
    ]
    if not heads:
        raise g.fail("no output projection")
    head = heads[-1]
    norm = g.made_by(g.ops[head].inputs[0])
    if norm is None or not g.is_norm(norm):
        raise g.fail("no norm before the output projection")
    eps_values |= {_eps(g, norm)}
    after, _ = g.downstream(g.ops[head].outputs[0], lambda k: g.ops[k].op in ("TANH", "DIV"))
    if after:
        raise g.fail("logit soft-capping")
    if len(eps_values) != 1:
        raise g.fail(f"norms with different epsilons {sorted(eps_values)}")
    out_weight = g.tensors[g.ops[head].inputs[1]]
    # the cache's layout: [1, kv heads, positions, head dim] (litert-torch) or [1, positions, kv
    # heads, head dim] (ai-edge-torch); the one whose heads times head size the key projection makes
    head_dim, k_rows = k_shape[3], layers[0].weights["attn_k"].shape[0]
    layouts = {
        (a, b) for a, b in ((k_shape[1], k_shape[2]), (k_shape[2], k_shape[1])) if a * head_dim == k_rows
    }
    if len(layouts) != 1:
        raise g.fail(f"a key cache of shape {list(k_shape)} for a key projection of {k_rows} rows")
    n_kv_heads, cache_length = layouts.pop()
    q_rows = layers[0].weights["attn_q"].shape[0]
    for i, layer in enumerate(layers):
        w = layer.weights
        if (
            w["attn_k"].shape[0] != k_rows
            or w["attn_v"].shape[0] != k_rows
            or w["attn_q"].shape[0] != q_rows
            or q_rows % head_dim
            or (q_rows // head_dim) % n_kv_heads
        ):
            raise g.fail(
                f"layer {i}'s projections ({w['attn_q'].shape}, {w['attn_k'].shape}, {w['attn_v'].shape})"
            )
    names = " ".join(t.name for t in g.tensors[:200])
    hf = _HF_CLASS.search(names)
    return Decoder(
        embedding=embedding,
        embedding_scale=embedding_scale,
        layers=layers,
        output_norm=g.norm_weight(norm),
        output=None if out_weight.buffer == embedding.buffer else out_weight,
        eps=eps_values.pop(),
        n_heads=q_rows // head_dim,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        cache_length=cache_length,
        hf_type=hf.group(1) if hf else None,
    )


def _embedding(g: _Graph) -> tuple[TFLiteTensor, float | None]:
    lookups = [
        k
        for k, op in enumerate(g.ops)
        if op.op in ("EMBEDDING_LOOKUP", "GATHER")
        and any(g.const(t) and len(g.tensors[t].shape) == 2 for t in op.inputs)
    ]
    if len(lookups) != 1:
        raise g.fail(f"{len(lookups)} embedding lookups")
    op = g.ops[lookups[0]]
    table = next(g.tensors[t] for t in op.inputs if g.const(t) and len(g.tensors[t].shape) == 2)
    # a constant multiplying the looked-up rows before the first norm (Gemma: sqrt(hidden))
    _, passed = g.downstream(op.outputs[0], lambda k: g.is_norm(k) or g.is_fc(k) or g.ops[k].op == "ADD")
    scales = g.scalar_consts(passed, "MUL")
    if len(scales) > 1:
        raise g.fail(f"{len(scales)} constants multiplying the embedding")
    return table, (scales[0] if scales else None)


def _eps(g: _Graph, norm: int) -> float:
    if g.ops[norm].decomposition is None:
        raise g.fail("an RMSNorm without its decomposition")
    inner = _Graph(g.model, g.ops[norm].decomposition)
    values = inner.scalar_consts(list(range(len(inner.ops))), "ADD")
    if len(values) != 1 or not 0 < values[0] < 0.1:
        raise g.fail(f"an RMSNorm whose epsilon is unclear ({values})")
    return float(np.float32(values[0]))


def _is_table(g: _Graph, t: int) -> bool:
    """A float constant with more than one value (RoPE's inverse frequencies)."""
    return g.const(t) and g.tensors[t].type == "FLOAT32" and math.prod(g.tensors[t].shape) > 1


def _single(g: _Graph, ks: list[int], what: str) -> int:
    if len(ks) != 1:
        raise g.fail(f"{len(ks)} {what}")
    return ks[0]


def _layer(g: _Graph, i: int, k_cache: int, v_cache: int) -> tuple[Layer, set[float]]:
    layer, eps = Layer(), set()
    w = layer.weights

    def cache_write(cache: int) -> int:
        writes = [k for k in g.consumers.get(cache, []) if g.ops[k].op == "DYNAMIC_UPDATE_SLICE"]
        return _single(g, writes, f"writes to layer {i}'s cache")

    def norms_in(ks: list[int]) -> list[int]:
        return [k for k in ks if g.is_norm(k)]

    k_write, v_write = cache_write(k_cache), cache_write(v_cache)
    fcs = {}
    for role, write in (("attn_k", k_write), ("attn_v", v_write)):
        found, passed = g.upstream(g.ops[write].inputs[1], g.is_fc)
        fcs[role] = _single(g, found, f"projections feeding layer {i}'s {role[-1]} cache")
        norms = norms_in(passed)
        if role == "attn_k" and norms:
            fcs["attn_k_norm"] = _single(g, norms, f"norms on layer {i}'s key")
        elif norms:
            raise g.fail(f"a norm on layer {i}'s values")
    source = g.ops[fcs["attn_k"]].inputs[0]
    if g.ops[fcs["attn_v"]].inputs[0] != source:
        raise g.fail(f"layer {i}'s key and value projections reading different inputs")
    queries = [k for k in g.consumers[source] if g.is_fc(k) and k not in (fcs["attn_k"], fcs["attn_v"])]
    fcs["attn_q"] = _single(g, queries, f"query projections in layer {i}")
    attn_norm = g.made_by(source)
    if attn_norm is None or not g.is_norm(attn_norm):
        raise g.fail(f"no norm before layer {i}'s attention")
    w["attn_norm"] = g.norm_weight(attn_norm)
    eps.add(_eps(g, attn_norm))

    # the query's way to the scores: its norm, the scale, the RoPE frequencies
    k_out = g.ops[k_write].outputs[0]
    v_out = g.ops[v_write].outputs[0]
    found, passed = g.downstream(g.ops[fcs["attn_q"]].outputs[0], lambda k: g.ops[k].op == "BATCH_MATMUL")
    scores = [k for k in found if k_out in g.ops[k].inputs]
    scores_op = _single(g, scores, f"query-key products in layer {i}")
    norms = norms_in(passed)
    if norms:
        fcs["attn_q_norm"] = _single(g, norms, f"norms on layer {i}'s query")
    muls = g.scalar_consts(passed, "MUL")
    scales = [m for m in muls if m != -1.0]  # -1: rotate-half
    layer.scale = _single(g, scales, f"query scales in layer {i}")
    freqs = set()
    for k in passed:
        if g.ops[k].op != "MUL":
            continue
        for t in g.ops[k].inputs:
            made = g.made_by(t)
            if made is None or g.ops[made].op not in ("COS", "SIN"):
                continue
            _, chain = g.upstream(g.ops[made].inputs[0], lambda _k: False)
            freqs |= {u for c in chain for u in g.ops[c].inputs if _is_table(g, u)}
    freqs = sorted(freqs)
    layer.inv_freq = g.value(_single(g, freqs, f"RoPE frequency tables in layer {i}")).ravel()

    # the mask added to the scores: a sliding window is built from the position and a constant
    adds = [k for k in g.consumers[g.ops[scores_op].outputs[0]] if g.ops[k].op == "ADD"]
    add = _single(g, adds, f"masks added in layer {i}")
    mask = next(t for t in g.ops[add].inputs if t != g.ops[scores_op].outputs[0])
    _, chain = g.upstream(mask, lambda _k: False)
    if any(g.ops[k].op == "SELECT_V2" for k in chain):
        windows = g.scalar_consts(chain, "SUB") + g.scalar_consts(chain, "ADD")
        windows = sorted({int(v) for v in windows if v > 1})
        layer.window = _single(g, windows, f"sliding windows in layer {i}")

    # output projection: reads attention @ V
    found, _ = g.downstream(v_out, lambda k: g.ops[k].op == "BATCH_MATMUL")
    av = _single(g, found, f"attention-value products in layer {i}")
    found, _ = g.downstream(g.ops[av].outputs[0], g.is_fc)
    fcs["attn_output"] = _single(g, found, f"output projections in layer {i}")
    o_out = g.ops[fcs["attn_output"]].outputs[0]
    post = [k for k in g.consumers[o_out] if g.is_norm(k)]
    residual_from = o_out
    if post:
        fcs["post_attention_norm"] = _single(g, post, f"post-attention norms in layer {i}")
        residual_from = g.ops[post[0]].outputs[0]
    adds = [k for k in g.consumers[residual_from] if g.ops[k].op == "ADD"]
    residual = g.ops[_single(g, adds, f"residual additions after layer {i}'s attention")].outputs[0]

    # feed-forward: norm -> gate (activation) * up -> down
    ffn_norms = [k for k in g.consumers[residual] if g.is_norm(k)]
    ffn_norm = _single(g, ffn_norms, f"norms before layer {i}'s feed-forward")
    fcs["ffn_norm"] = ffn_norm
    pair = [k for k in g.consumers[g.ops[ffn_norm].outputs[0]] if g.is_fc(k)]
    if len(pair) != 2:
        raise g.fail(f"{len(pair)} projections after layer {i}'s feed-forward norm (a gated MLP has 2)")
    gates = []
    for k in pair:
        out = g.ops[k].outputs[0]
        acts = [c for c in g.consumers[out] if g.ops[c].op in _ACTIVATIONS]
        if acts and g.ops[acts[0]].op == "LOGISTIC":  # SiLU is x * sigmoid(x): the same x
            silu = [c for c in g.consumers[g.ops[acts[0]].outputs[0]] if g.ops[c].op == "MUL"]
            if len(silu) != 1 or out not in g.ops[silu[0]].inputs:
                raise g.fail(f"a sigmoid in layer {i}'s feed-forward that is not part of a SiLU")
        if acts:
            gates.append(k)
            layer.activation = _ACTIVATIONS[g.ops[acts[0]].op]
    fcs["ffn_gate"] = _single(g, gates, f"gate projections in layer {i}")
    fcs["ffn_up"] = next(k for k in pair if k != fcs["ffn_gate"])
    found, _ = g.downstream(g.ops[fcs["ffn_up"]].outputs[0], g.is_fc)
    fcs["ffn_down"] = _single(g, found, f"down projections in layer {i}")
    down_out = g.ops[fcs["ffn_down"]].outputs[0]
    post = [k for k in g.consumers[down_out] if g.is_norm(k)]
    if post:
        fcs["post_ffw_norm"] = _single(g, post, f"post-feed-forward norms in layer {i}")

    for role, k in fcs.items():
        if g.is_norm(k):
            w[role] = g.norm_weight(k)
            eps.add(_eps(g, k))
            continue
        op = g.ops[k]
        w[role] = g.tensors[op.inputs[1]]
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            if not g.const(op.inputs[2]):
                raise g.fail(f"a computed bias in layer {i}")
            w[f"{role}.bias"] = g.tensors[op.inputs[2]]
    return layer, eps


# -- architecture ----------------------------------------------------------------------------------


def _architecture(d: Decoder, bundle: Bundle) -> str:
    first = d.layers[0].weights
    gemma = "post_attention_norm" in first
    qk_norm = "attn_q_norm" in first
    biased = "attn_q.bias" in first
    if gemma:
        arch = "gemma3"
        if not qk_norm:
            raise UnsupportedError(
                f"{bundle.path}: a Gemma 2 style decoder (no q/k norms) is not supported yet"
            )
    elif qk_norm:
        arch = "qwen3"
    elif biased:
        arch = "qwen2"
    else:
        arch = "llama"
    hinted = _KNOWN_TYPES.get(d.hf_type or "") or _KNOWN_TYPES.get(bundle.model_type or "")
    if hinted and hinted != arch:
        raise UnsupportedError(
            f"{bundle.path}: the file says {d.hf_type or bundle.model_type} but its graph computes a {arch} decoder"
        )
    if d.hf_type and not hinted:
        raise UnsupportedError(
            f"{bundle.path}: a {d.hf_type} export is not supported (llama, qwen2, qwen3, gemma3)"
        )
    activation = {layer.activation for layer in d.layers}
    want = "gelu_tanh" if arch == "gemma3" else "silu"
    if activation != {want}:
        raise UnsupportedError(f"{bundle.path}: {arch} with the {sorted(map(str, activation))} activation")
    return arch


def _rope(inv_freq: np.ndarray, where: str) -> tuple[float, float, np.ndarray | None]:
    """(base, linear factor, per-frequency factors or None) from RoPE inverse frequencies."""
    n = len(inv_freq)
    if n < 2 or inv_freq[0] <= 0 or inv_freq[1] <= 0:
        raise UnsupportedError(f"{where}: RoPE frequencies {inv_freq[:4]} are not usable")
    ratio = inv_freq[1] / inv_freq[0]
    base = float(ratio ** (-n))  # inv[k] = base^(-k/n) / factor
    factor = float(1.0 / inv_freq[0])
    geometric = inv_freq[0] * ratio ** np.arange(n)
    if np.allclose(inv_freq, geometric, rtol=1e-4):
        return _round_base(base), (1.0 if abs(factor - 1) < 1e-6 else factor), None
    plain = base ** (-np.arange(n) / n)
    return _round_base(base), 1.0, (plain / inv_freq).astype(np.float32)


def _round_base(base: float) -> float:
    """float32 frequencies give the base to ~6 digits; a round number near it is the one meant."""
    rounded = float(f"{base:.4g}")
    return rounded if abs(rounded - base) < 1e-3 * base else base


def _config(d: Decoder, arch: str, bundle: Bundle) -> dict[str, Any]:
    """A Hugging Face style config of what the graph computes (its mapping writes the GGUF keys)."""
    where = str(bundle.path)
    hidden = d.embedding.shape[1]
    q = d.layers[0].weights
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": len(d.layers),
        "num_attention_heads": d.n_heads,
        "num_key_value_heads": d.n_kv_heads,
        "head_dim": d.head_dim,
        "intermediate_size": q["ffn_gate"].shape[0],
        "rms_norm_eps": d.eps,
        "vocab_size": d.embedding.shape[0],
        "max_position_embeddings": max(bundle.max_tokens or 0, d.cache_length),
        "tie_word_embeddings": d.output is None,
    }
    for layer in d.layers:
        rot = 2 * len(layer.inv_freq)
        if rot != d.head_dim:
            raise UnsupportedError(
                f"{where}: partial RoPE ({rot} of {d.head_dim} dimensions) in a {arch} model"
            )
    scales = {round(layer.scale, 7) for layer in d.layers}
    if len(scales) != 1:
        raise UnsupportedError(f"{where}: attention scales differ between layers {sorted(scales)}")
    scale = scales.pop()
    if arch == "gemma3":
        expected = float(np.sqrt(hidden))
        if d.embedding_scale is None or abs(d.embedding_scale - expected) > 1e-3 * expected:
            raise UnsupportedError(
                f"{where}: Gemma embeddings scaled by {d.embedding_scale}, not sqrt({hidden})"
            )
        sliding = [layer.window is not None for layer in d.layers]
        windows = {layer.window for layer in d.layers if layer.window}
        if len(windows) > 1:
            raise UnsupportedError(f"{where}: sliding windows of different sizes {sorted(windows)}")
        local = [_rope(layer.inv_freq, where) for layer, s in zip(d.layers, sliding) if s]
        full = [_rope(layer.inv_freq, where) for layer, s in zip(d.layers, sliding) if not s]
        if (
            any(r[2] is not None for r in local + full)
            or len({r[:2] for r in local}) > 1
            or len({r[:2] for r in full}) > 1
        ):
            raise UnsupportedError(f"{where}: RoPE frequencies this converter does not map")
        if any(r[1] != 1.0 for r in local):
            raise UnsupportedError(f"{where}: scaled RoPE in the sliding-window layers")
        base, factor, _ = full[0] if full else local[0]
        rope = {"full_attention": {"rope_theta": base, "rope_type": "default"}}
        if factor != 1.0:
            rope["full_attention"] = {"rope_theta": base, "rope_type": "linear", "factor": factor}
        rope["sliding_attention"] = {
            "rope_theta": (local[0] if local else full[0])[0],
            "rope_type": "default",
        }
        config["rope_parameters"] = rope
        config["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        config["sliding_window"] = windows.pop() if windows else None
        config["query_pre_attn_scalar"] = float(np.float32(scale) ** -2)
        return config
    if d.embedding_scale is not None and abs(d.embedding_scale - 1) > 1e-6:
        raise UnsupportedError(f"{where}: embeddings scaled by {d.embedding_scale} in a {arch} model")
    if abs(scale - d.head_dim**-0.5) > 1e-4 * d.head_dim**-0.5:
        raise UnsupportedError(f"{where}: attention scaled by {scale}, not 1/sqrt({d.head_dim})")
    if any(layer.window for layer in d.layers):
        raise UnsupportedError(f"{where}: sliding-window attention in a {arch} model")
    ropes = {(*_rope(layer.inv_freq, where)[:2], 2 * len(layer.inv_freq)) for layer in d.layers}
    if len(ropes) != 1:
        raise UnsupportedError(f"{where}: layers with different RoPE settings")
    base, factor, rot = ropes.pop()
    factors = _rope(d.layers[0].inv_freq, where)[2]
    if factor != 1.0 or (factors is not None and arch != "llama"):
        raise UnsupportedError(f"{where}: scaled RoPE in a {arch} model is not supported")
    config["rope_theta"] = base
    config["_rope_dims"] = rot
    config["_rope_freqs"] = factors
    return config


# -- writing ---------------------------------------------------------------------------------------


def _exact_blocks(
    model: TFLiteModel, t: TFLiteTensor, rows: np.ndarray | None
) -> tuple[GGMLType, np.ndarray] | None:
    """The tensor as Q8_0 / Q4_0 blocks holding exactly its values, or None where no GGUF type
    does. `rows` reorders the rows (output channels) first."""
    quant = t.quantization
    if len(t.shape) != 2 or t.shape[1] % 32:
        return None
    zero = quant.zero_points
    if zero is not None and len(zero) and np.any(zero):
        return None
    if t.type == "INT8" and quant.scheme == "per-channel" and quant.axis == 0:
        q = t.data.view(np.int8).reshape(t.shape)
        scales = quant.scales.astype(np.float32)
        d = scales.astype(np.float16)
        if not np.all(np.isfinite(d)) or np.any(
            np.abs(d.astype(np.float32) - scales) > 1e-3 * np.abs(scales)
        ):
            return None  # a scale float16 cannot hold
        if rows is not None:
            q, d = q[rows], d[rows]
        n_blocks = t.shape[1] // 32
        blocks = np.empty((t.shape[0], n_blocks, 34), np.uint8)
        blocks[:, :, :2] = d.view(np.uint8).reshape(-1, 1, 2)
        blocks[:, :, 2:] = q.view(np.uint8).reshape(t.shape[0], n_blocks, 32)
        return GGMLType.Q8_0, blocks.reshape(t.shape[0], -1)
    if t.type == "INT4" and quant.scheme == "per-channel" and quant.axis == 0:
        d = quant.scales.astype(np.float32).astype(np.float16)
        if not np.all(np.isfinite(d)) or np.any(
            np.abs(d.astype(np.float32) - quant.scales) > 1e-3 * np.abs(quant.scales)
        ):
            return None
        return GGMLType.Q4_0, _q4_0_blocks(
            _int4_offset(t), np.repeat(d[:, None], t.shape[1] // 32, axis=1), rows
        )
    if t.type == "INT4" and quant.scheme == "blockwise" and quant.block_size == 32:
        graph = model.subgraphs[t.subgraph].tensors
        if quant.scale_tensor is None or not 0 <= quant.scale_tensor < len(graph):
            return None
        scale_t = graph[quant.scale_tensor]
        if (
            scale_t.type != "FLOAT16"
            or scale_t.shape != (t.shape[0], t.shape[1] // 32)
            or scale_t.data is None
        ):
            return None
        d = scale_t.data.view(np.float16).reshape(scale_t.shape)
        return GGMLType.Q4_0, _q4_0_blocks(_int4_offset(t), d, rows)
    return None


def _int4_offset(t: TFLiteTensor) -> np.ndarray:
    """An INT4 tensor's values plus 8 (0..15, as Q4_0 stores them), [rows, cols] uint8."""
    packed = t.data
    q = np.empty(packed.size * 2, np.uint8)
    q[0::2], q[1::2] = packed & 0x0F, packed >> 4  # two's complement nibbles, the even element low
    return (q[: math.prod(t.shape)] ^ 8).reshape(t.shape)  # signed -8..7 -> 0..15


def _q4_0_blocks(q: np.ndarray, d: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """Q4_0 blocks of values q (0..15) [rows, cols] and float16 scales d [rows, cols / 32]: per
    block the scale, then 16 bytes holding elements 0..15 in the low nibbles, 16..31 in the high."""
    if rows is not None:
        q, d = q[rows], d[rows]
    n_rows = q.shape[0]
    blocks = np.empty((n_rows, q.shape[1] // 32, 18), np.uint8)
    blocks[:, :, :2] = np.ascontiguousarray(d, np.float16).view(np.uint8).reshape(n_rows, -1, 2)
    nib = q.reshape(n_rows, -1, 32)
    blocks[:, :, 2:] = nib[:, :, :16] | (nib[:, :, 16:] << 4)
    return blocks.reshape(n_rows, -1)


def _permutation(n_rows: int, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for Llama: per head, the two halves interleaved."""
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, 2, half).swapaxes(1, 2).reshape(-1)


def litert_writer(
    path: Path, config: ConversionConfig, keep_bits: bool = True, verbose: bool = True
) -> GGUFWriter:
    """A GGUF writer for the LLM in a Google file (see the module's docstring); `verbose` says
    what was found on stderr."""
    try:
        return _writer(path, config, keep_bits, verbose)
    except (
        IndexError,
        KeyError,
        ValueError,
        TypeError,
        AttributeError,
        StopIteration,
        ZeroDivisionError,
        OverflowError,
        RecursionError,
        MemoryError,
    ) as e:
        # the reader checked every offset; a graph that still makes no sense is a damaged file
        raise ModelFileError(
            f"{path}: its decode graph does not make sense ({type(e).__name__}: {str(e)[:200]!r})"
        ) from None


def _writer(path: Path, config: ConversionConfig, keep_bits: bool, verbose: bool) -> GGUFWriter:
    bundle = open_bundle(path)
    d = read_decoder(bundle.model)
    arch = _architecture(d, bundle)
    hf_config = _config(d, arch, bundle)
    mapping = mapping_for(hf_config)
    writer = GGUFWriter()
    writer.add("general.architecture", mapping.arch)
    writer.add("general.name", path.stem)
    writer.add("general.quantization_version", 2)
    writer.add("general.source.file", path.name)
    keys = mapping.metadata()
    if arch == "llama" and hf_config["_rope_dims"] != d.head_dim:
        keys["rope.dimension_count"] = hf_config["_rope_dims"]
    for key, value in keys.items():
        writer.add(arch_key(mapping.arch, key), value)

    model = bundle.model
    counts: dict[str, int] = defaultdict(int)

    def add(name: str, t: TFLiteTensor, rows: np.ndarray | None = None) -> None:
        shape = t.shape
        exact = _exact_blocks(model, t, rows) if keep_bits else None
        if exact is not None:
            tensor_type, blocks = exact
            counts[f"{t.type} kept as {tensor_type.name}"] += 1
            writer.add_tensor(name, tensor_type, shape, lambda b=blocks: b)
            return
        tensor_type = config.tensor_type(name, shape)
        counts[f"{t.type} -> {tensor_type.name}"] += 1

        def load(t=t, rows=rows, tensor_type=tensor_type):
            x = model.dequantize(t).astype(np.float32)
            if rows is not None:
                x = x[rows]
            return quantize(x, tensor_type)

        writer.add_tensor(name, tensor_type, shape, load)

    add("token_embd.weight", d.embedding)
    for i, layer in enumerate(d.layers):
        for role, t in layer.weights.items():
            name = f"blk.{i}.{role}" if role.endswith(".bias") else f"blk.{i}.{role}.weight"
            rows = None
            if arch == "llama" and role in ("attn_q", "attn_k", "attn_q.bias", "attn_k.bias"):
                rows = _permutation(t.shape[0], d.n_heads if role.startswith("attn_q") else d.n_kv_heads)
            add(name, t, rows)
    add("output_norm.weight", d.output_norm)
    if d.output is not None:
        add("output.weight", d.output)
    if hf_config.get("_rope_freqs") is not None:
        factors = hf_config["_rope_freqs"]
        writer.add_tensor("rope_freqs.weight", GGMLType.F32, factors.shape, lambda: factors)

    vocab = tokenizer_metadata(_tokenizer_source(bundle), d.embedding.shape[0])
    _check_vocabulary(vocab, d.embedding.shape[0], path)
    # LiteRT-LM puts the start token before every prompt
    vocab["tokenizer.ggml.add_bos_token"] = (bundle.start_token is not None, None, None)
    for key, (value, vtype, item_type) in vocab.items():
        writer.add(key, value, vtype, item_type)
    kept = {
        type_name: sum(n for what, n in counts.items() if what.endswith(f"kept as {type_name}"))
        for type_name in ("Q8_0", "Q4_0")
    }
    # llama.cpp's file type names the bits most matrices have (7: mostly Q8_0, 2: mostly Q4_0)
    file_type = config.file_type if not any(kept.values()) else (7 if kept["Q8_0"] >= kept["Q4_0"] else 2)
    writer.add("general.file_type", file_type)
    summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
    if verbose:
        print(
            f"pocketlm: {path.name}: a {arch} decoder, {len(d.layers)} layers; tensors: {summary}",
            file=sys.stderr,
        )
    return writer


def _check_vocabulary(vocab: dict, n_rows: int, path: Path) -> None:
    """What the file's tokenizer gave must be writable: strings of valid text, ids of tokens."""
    tokens = vocab["tokenizer.ggml.tokens"][0]
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            raise ModelFileError(f"{path}: token {i} of the tokenizer is not a string")
        token.encode("utf-8")  # a lone surrogate raises (UnicodeEncodeError: caught as damage)
    for key, (value, _, _) in vocab.items():
        if key.endswith("_token_id") and not (
            isinstance(value, int) and 0 <= value < min(len(tokens), n_rows)
        ):
            raise ModelFileError(f"{path}: {key} {value!r} is not one of the {len(tokens)} tokens")


@dataclass
class _TokenizerSource:
    """The attributes of a checkpoint folder that convert.tokenizer reads, from a Google file."""

    folder: Path
    tokenizer_json: dict | None
    sentencepiece_model: bytes | None
    tokenizer_config: dict
    config: dict
    chat_template: str | None


def _tokenizer_source(bundle: Bundle) -> _TokenizerSource:
    if bundle.tokenizer_json is None and bundle.sentencepiece is None:
        raise ModelFileError(
            f"{bundle.path}: no tokenizer inside (a bare .tflite); nothing to convert it with"
        )
    config: dict[str, Any] = {}
    tokenizer_config: dict[str, Any] = {"add_bos_token": bundle.start_token is not None}
    unk = ((bundle.tokenizer_json or {}).get("model") or {}).get("unk_token")
    if isinstance(unk, str):
        tokenizer_config["unk_token"] = unk
    if bundle.pad_token is not None:
        tokenizer_config["pad_token"] = bundle.pad_token
    for role, value in (("bos", bundle.start_token), ("eos", next(iter(_single_tokens(bundle)), None))):
        if isinstance(value, int):
            config[f"{role}_token_id"] = value
        elif isinstance(value, str):
            tokenizer_config[f"{role}_token"] = value
    return _TokenizerSource(
        bundle.path,
        bundle.tokenizer_json,
        bundle.sentencepiece,
        tokenizer_config,
        config,
        bundle.chat_template,
    )


def _single_tokens(bundle: Bundle) -> Iterator[str | int]:
    """Stop tokens that are one token (ids, or strings without text around a special token)."""
    for s in bundle.stop_tokens:
        if isinstance(s, int) or (isinstance(s, str) and s.startswith("<") and s.endswith(">")):
            yield s
