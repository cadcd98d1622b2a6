"""A checkpoint's tokenizer files -> GGUF `tokenizer.*` metadata, as llama.cpp writes them.

tokenizer.model (SentencePiece) becomes a "llama" vocabulary with scores and token types;
tokenizer.json with a byte-level BPE becomes a "gpt2" vocabulary with merges; tokenizer.json
holding a SentencePiece BPE (Gemma's: "▁" for spaces, byte fallback, no tokenizer.model beside it)
becomes a "llama" vocabulary whose scores rank the pieces as its merges do.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..errors import ModelFileError, UnsupportedError
from ..formats.gguf import TokenType, ValueType
from ..formats.hf import HFCheckpoint

NORMAL, CONTROL, USER_DEFINED, UNUSED = (
    TokenType.NORMAL,
    TokenType.CONTROL,
    TokenType.USER_DEFINED,
    TokenType.UNUSED,
)

Typed = tuple[Any, ValueType | None, ValueType | None]  # value, type, array item type


def tokenizer_metadata(ckpt: HFCheckpoint, vocab_size: int) -> dict[str, Typed]:
    if ckpt.sentencepiece_model is not None:
        keys = _sentencepiece(ckpt)
    elif ckpt.tokenizer_json is not None and _is_sentencepiece_bpe(ckpt.tokenizer_json):
        keys = _sentencepiece_bpe(ckpt.tokenizer_json)
    elif ckpt.tokenizer_json is not None:
        keys = _byte_level_bpe(ckpt.tokenizer_json)
    else:
        raise ModelFileError(f"{ckpt.folder}: no tokenizer.model or tokenizer.json")
    tokens, scores, types = keys.pop("_tokens"), keys.pop("_scores"), keys.pop("_types")
    if len(tokens) > vocab_size:
        raise ModelFileError(
            f"{ckpt.folder}: tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings"
        )
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer: unused pads
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    out: dict[str, Typed] = {k: (v, None, None) for k, v in keys.items()}
    out["tokenizer.ggml.tokens"] = (tokens, ValueType.ARRAY, ValueType.STRING)
    if keys["tokenizer.ggml.model"] == "llama":
        out["tokenizer.ggml.scores"] = (np.asarray(scores, np.float32), None, None)
    out["tokenizer.ggml.token_type"] = (np.asarray(types, np.int32), None, None)
    out.update(_special_ids(ckpt, tokens))
    if ckpt.chat_template:
        out["tokenizer.chat_template"] = (ckpt.chat_template, None, None)
    return out


def _sentencepiece(ckpt: HFCheckpoint) -> dict[str, Any]:
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    except ImportError:
        raise UnsupportedError(
            "reading tokenizer.model needs sentencepiece and protobuf: pip install 'pocketlm[sentencepiece]'"
        ) from None
    from google.protobuf.message import DecodeError

    proto = spm_pb2.ModelProto()
    model = ckpt.sentencepiece_model  # a tokenizer.model path, or its bytes (from a Google file)
    try:
        proto.ParseFromString(model if isinstance(model, bytes) else model.read_bytes())
    except DecodeError as e:
        raise ModelFileError(f"{ckpt.folder}: the SentencePiece model does not parse ({e})") from None
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's type numbers equal llama.cpp's
    for token, info in _added_tokens(ckpt).items():  # tokens added on top of the model, by id
        while len(tokens) <= info[0]:
            tokens.append(f"[PAD{len(tokens)}]"), scores.append(-1000.0), types.append(UNUSED)
        tokens[info[0]], scores[info[0]], types[info[0]] = (
            token,
            -1000.0,
            CONTROL if info[1] else USER_DEFINED,
        )
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
        "tokenizer.ggml.add_bos_token": bool(ckpt.tokenizer_config.get("add_bos_token", True)),
        "tokenizer.ggml.add_eos_token": bool(ckpt.tokenizer_config.get("add_eos_token", False)),
        "_tokens": tokens,
        "_scores": scores,
        "_types": types,
    }


def _added_tokens(ckpt: HFCheckpoint) -> dict[str, tuple[int, bool]]:
    """Added tokens from tokenizer_config.json: content -> (id, special)."""
    decoder = ckpt.tokenizer_config.get("added_tokens_decoder") or {}
    return {t["content"]: (int(i), bool(t.get("special"))) for i, t in decoder.items()}


def _pre_tokenizer_name(pre: dict | None) -> str:
    """Which llama.cpp pre-tokenizer a tokenizer.json pre_tokenizer corresponds to."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if "Digits" in kinds and any(s.get("individual_digits") for s in steps):
        return "smollm"
    patterns = [str(s.get("pattern", {}).get("Regex", "")) for s in steps if s.get("type") == "Split"]
    if any(r"\p{N}{1,3}" in p for p in patterns):
        return "llama-bpe"
    if any(r"\p{N}|" in p for p in patterns):
        return "qwen2"
    if kinds == ["ByteLevel"]:
        return "gpt-2"  # llama.cpp's name
    raise UnsupportedError(f"tokenizer.json pre-tokenizer {kinds} is not supported")


def _byte_level_bpe(tj: dict) -> dict[str, Any]:
    model = tj.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in str(tj.get("decoder")):
        raise UnsupportedError(
            "tokenizer.json: only byte-level BPE is supported (SentencePiece models need tokenizer.model)"
        )
    vocab = dict(model["vocab"])
    for added in tj.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    types = [NORMAL] * len(tokens)
    for added in tj.get("added_tokens", []):
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(tj.get("pre_tokenizer")),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": False,
        "_tokens": tokens,
        "_scores": [0.0] * len(tokens),
        "_types": types,
    }


def _is_sentencepiece_bpe(tj: dict) -> bool:
    model = tj.get("model") if isinstance(tj.get("model"), dict) else {}
    return (
        model.get("type") == "BPE"
        and bool(model.get("byte_fallback"))
        and "ByteLevel" not in str(tj.get("decoder"))
    )


def _sentencepiece_bpe(tj: dict) -> dict[str, Any]:
    """A SentencePiece BPE written as tokenizer.json. llama.cpp's "llama" tokenizer merges the
    adjacent pair whose result scores best, so a piece's score is minus the rank of the first
    merge that makes it; pieces no merge makes score below all of them."""
    model = tj["model"]
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    if not vocab or not all(isinstance(i, int) and 0 <= i < 1 << 22 for i in vocab.values()):
        raise ModelFileError("tokenizer.json: token ids must be integers from 0 (at most 4 M tokens)")
    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    scores = np.full(len(tokens), -1e9, np.float32)
    for rank, m in enumerate(model.get("merges", [])):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(left + right)
        if i is not None and scores[i] == -1e9:
            scores[i] = -rank
    types = [NORMAL] * len(tokens)
    for i, token in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[i] = TokenType.BYTE
        elif token == "":  # an id the vocabulary skips
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    if model.get("unk_token") in vocab:
        types[vocab[model["unk_token"]]] = TokenType.UNKNOWN
    for a in added.values():
        if types[a["id"]] == NORMAL:
            types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    normalizers = str(tj.get("normalizer"))
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.add_space_prefix": "Prepend" in normalizers
        or "Metaspace" in str(tj.get("pre_tokenizer")),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "_tokens": tokens,
        "_scores": [float(x) for x in scores],
        "_types": types,
    }


def _special_ids(ckpt: HFCheckpoint, tokens: list[str]) -> dict[str, Typed]:
    """bos / eos / unk / pad ids: from tokenizer_config's token strings, else config.json ids."""
    index = {t: i for i, t in enumerate(tokens)}
    out = {}
    for role in ("bos", "eos", "unk", "pad"):
        value = ckpt.tokenizer_config.get(f"{role}_token")
        if isinstance(value, dict):
            value = value.get("content")
        token_id = index.get(value) if isinstance(value, str) else None
        if token_id is None:
            token_id = ckpt.config.get(
                f"{role}_token_id", (ckpt.config.get("text_config") or {}).get(f"{role}_token_id")
            )
            if isinstance(token_id, list):
                token_id = token_id[0] if token_id else None
        if token_id is not None:
            key = "padding" if role == "pad" else ("unknown" if role == "unk" else role)
            out[f"tokenizer.ggml.{key}_token_id"] = (int(token_id), ValueType.UINT32, None)
    return out
