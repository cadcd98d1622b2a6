"""The tokenizer stored in a GGUF file, rebuilt as a `tokenizers.Tokenizer`, and chat templates.

Two vocabularies cover the models we run:
- "gpt2": byte-level BPE with merges; the pre-tokenizer regex depends on `tokenizer.ggml.pre`.
- "llama": SentencePiece. llama.cpp merges the adjacent pair whose result has the best score;
  a BPE whose merges are ranked by that score does the same, with byte fallback for the rest.
Control tokens (and user-defined ones, always) are matched whole before the model runs, as
llama.cpp does.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from . import chat_template
from .errors import ModelFileError, PocketLMError, UnsupportedError
from .formats.gguf import TokenType

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = (
    TokenType.NORMAL,
    TokenType.UNKNOWN,
    TokenType.CONTROL,
    TokenType.USER_DEFINED,
    TokenType.UNUSED,
)

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 bytes
    for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(0x100 + n): b for n, b in enumerate(others)})
    return table


def _split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies before byte-level BPE
_BPE_PRE_TOKENIZERS = {
    "default": lambda: [_split(_GPT2_SPLIT), _byte_level()],
    "gpt-2": lambda: [_split(_GPT2_SPLIT), _byte_level()],
    "smollm": lambda: [pre_tokenizers.Digits(individual_digits=True), _split(_GPT2_SPLIT), _byte_level()],
    "llama-bpe": lambda: [_split(_LLAMA3_SPLIT), _byte_level()],
    "llama3": lambda: [_split(_LLAMA3_SPLIT), _byte_level()],
    "qwen2": lambda: [_split(_QWEN2_SPLIT), _byte_level()],
}

# Used when a file carries no chat template (base models): the format the family was trained on.
_FALLBACK_TEMPLATES = {
    "gemma": (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


MERGES_CACHE_MIN_VOCAB = 32768  # smaller vocabularies build their merges in well under 0.1 s


def _sentencepiece_merges(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal token into two tokens, best-scored result first.

    Finding them takes about a second for Gemma's 262k-token vocabulary (515k pairs), so for
    large vocabularies the pairs' ids are kept in `<POCKETLM_HOME>/tokenizers/`, under a hash
    of the vocabulary, scores and types, and read from there the next time."""
    path = None
    if len(tokens) >= MERGES_CACHE_MIN_VOCAB:
        from .paths import home_dir

        digest = hashlib.sha256("\0".join(tokens).encode("utf-8", "surrogatepass"))
        digest.update(np.ascontiguousarray(scores, np.float32).tobytes())
        digest.update(np.ascontiguousarray(types, np.int32).tobytes())
        path = home_dir() / "tokenizers" / f"merges-{digest.hexdigest()[:32]}.npy"
    pairs = _read_cached(path, len(tokens)) if path else None
    if pairs is None:
        pairs = _merge_ids(tokens, scores, types)
        if path:
            _write_cached(path, pairs)
    names = np.array(
        tokens, dtype=object
    )  # indexing an object array: 0.1 s for Gemma's 515k pairs, 0.4 in a loop
    return list(zip(names[pairs[0]].tolist(), names[pairs[1]].tolist()))


def _merge_ids(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> np.ndarray:
    """The merges as ids [2, n] (left, right), in rank order; pairs are collected as ids and
    sorted with numpy."""
    kept = np.nonzero(np.isin(types, [int(NORMAL), int(USER_DEFINED), int(UNUSED)]))[0].tolist()
    vocab = {tokens[i]: i for i in kept}
    merged, left, right = array("i"), array("i"), array("i")
    get = vocab.get
    for token, i in vocab.items():
        for cut in range(1, len(token)):
            a = get(token[:cut])
            if a is not None:
                b = get(token[cut:])
                if b is not None:
                    merged.append(i), left.append(a), right.append(b)
    merged, left, right = (np.frombuffer(x, np.int32) for x in (merged, left, right))
    order = np.lexsort((right, left, -scores[merged]))  # best score first, then by left, right id
    return np.stack([left[order], right[order]])


def _read_cached(path: Path, n_tokens: int) -> np.ndarray | None:
    """The cached ids, or None when absent or not what we wrote (then they are rebuilt)."""
    try:
        pairs = np.load(path)
    except (OSError, ValueError):
        return None
    ok = (
        pairs.ndim == 2
        and len(pairs) == 2
        and pairs.dtype == np.int32
        and (pairs.size == 0 or (pairs.min() >= 0 and pairs.max() < n_tokens))
    )
    return pairs if ok else None


def _write_cached(path: Path, pairs: np.ndarray) -> None:
    """Written whole or not at all; a cache we cannot write is no error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            np.save(f, pairs)
    except OSError:
        return
    try:
        os.replace(f.name, path)
    except OSError:
        Path(f.name).unlink(missing_ok=True)


def _build_sentencepiece(tokens, scores, types, add_space_prefix: bool) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _sentencepiece_merges(tokens, scores, types)
    unk = next((tokens[i] for i in np.nonzero(types == UNKNOWN)[0]), None)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def _build_bpe(tokens, merges: Iterable[str], pre: str) -> Tokenizer:
    if pre not in _BPE_PRE_TOKENIZERS:
        known = ", ".join(sorted(_BPE_PRE_TOKENIZERS))
        raise UnsupportedError(f"pre-tokenizer {pre!r} is not supported (supported: {known})")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(_BPE_PRE_TOKENIZERS[pre]())
    tok.decoder = decoders.ByteLevel()
    return tok


class GGUFTokenizer:
    """Text <-> token ids for one model file, plus its special ids and chat template."""

    def __init__(self, metadata: dict[str, Any], source: str = "model file"):
        try:
            self._build(metadata, source)
        except PocketLMError:
            raise
        except Exception as e:  # tokenizers' own errors, ids out of range, metadata of the wrong type
            detail = " ".join(str(e).split())[:300]  # the library's messages run over several lines
            raise ModelFileError(
                f"{source}: the tokenizer in its metadata is corrupt ({type(e).__name__}: {detail})"
            ) from None

    def _build(self, metadata: dict[str, Any], source: str) -> None:
        def need(key):
            if key not in metadata:
                raise ModelFileError(f"{source}: tokenizer metadata {key!r} is missing")
            return metadata[key]

        model = need("tokenizer.ggml.model")
        tokens = list(need("tokenizer.ggml.tokens"))
        types = np.asarray(metadata.get("tokenizer.ggml.token_type", np.full(len(tokens), NORMAL)))
        if model == "gpt2":
            self._tok = _build_bpe(
                tokens, need("tokenizer.ggml.merges"), metadata.get("tokenizer.ggml.pre", "default")
            )
        elif model == "llama":
            scores = np.asarray(
                metadata.get("tokenizer.ggml.scores", -np.arange(len(tokens), dtype=np.float32))
            )
            self._tok = _build_sentencepiece(
                tokens, scores, types, bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            )
        else:
            raise UnsupportedError(f"{source}: tokenizer model {model!r} is not supported (gpt2, llama)")
        self._tok.add_tokens(
            [
                AddedToken(tokens[i], special=False, normalized=False)
                for i in np.nonzero(types == USER_DEFINED)[0]
            ]
        )
        self._tok.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in np.nonzero(types == CONTROL)[0]]
        )
        # Token strings are not kept on the Python side (Gemma's 262k take 23 MB): `token(i)`.
        self.vocab_size = len(tokens)
        self.model = model  # "gpt2" (byte-level BPE) or "llama" (SentencePiece): tokenizer.ggml.model
        self._types = types.astype(np.int8)  # for token_bytes(); 1 byte a token
        self.control_ids = frozenset(int(i) for i in np.nonzero(types == CONTROL)[0])
        self.bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        self.eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        self.bos_token = tokens[self.bos_id] if self.bos_id is not None else None
        self.eos_token = tokens[self.eos_id] if self.eos_id is not None else None
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama"))
        self.chat_template = metadata.get("tokenizer.chat_template")
        if not isinstance(self.chat_template, (str, type(None))):
            raise ModelFileError(
                f"{source}: tokenizer.chat_template must be a string, not {type(self.chat_template).__name__}"
            )
        self.stop_ids = self._stop_ids(metadata, tokens)

    def to_json(self) -> str:
        """The rebuilt tokenizer as a `tokenizer.json` (what tokenizers.js reads in the browser)."""
        return self._tok.to_str()

    def token(self, i: int) -> str:
        """The vocabulary's string for id `i`."""
        return self._tok.id_to_token(int(i))

    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for, as a grammar engine needs them: byte-level BPE
        symbols mapped back to bytes, SentencePiece's `▁` as a space and `<0xAB>` as that byte.
        Control tokens are `b"\\xff" + name` (never text: a grammar reaches them only by name)."""
        out = []
        byte_level = self.model == "gpt2"
        table = _byte_decoder() if byte_level else None
        for i in range(self.vocab_size):
            name = self._tok.id_to_token(i) or ""
            token_type = int(self._types[i])
            if token_type == CONTROL:
                out.append(b"\xff" + name.encode("utf-8", "replace"))
            elif token_type == TokenType.BYTE and len(name) == 6 and name.startswith("<0x"):
                out.append(bytes([int(name[3:5], 16)]))
            elif token_type == USER_DEFINED and byte_level:
                out.append(name.encode("utf-8", "replace"))  # llama.cpp stores them as text, not byte symbols
            elif token_type in (UNKNOWN, UNUSED):
                out.append(b"")  # never produced as text
            elif byte_level:
                out.append(bytes(table.get(c, 0x3F) for c in name))
            else:
                out.append(name.replace("\u2581", " ").encode("utf-8", "replace"))
        return out

    def _stop_ids(self, metadata, tokens: list[str]) -> frozenset[int]:
        """EOS, end-of-turn and the other tokens that end a reply."""
        ids = {
            metadata.get(k)
            for k in (
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id",
            )
        }
        ends = {"<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<|end|>"}
        ids |= {i for i in self.control_ids if tokens[i] in ends}
        return frozenset(int(i) for i in ids if i is not None)

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; control tokens written in it are matched only if `parse_special`."""
        self._tok.encode_special_tokens = not parse_special
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        architecture: str = "",
        **variables,
    ) -> str:
        """Render `messages` with the file's template in jinja2's sandbox (templates are untrusted);
        `variables` are passed to it too (e.g. `tools`)."""
        template = self.chat_template
        if not template:
            template = _FALLBACK_TEMPLATES["gemma" if architecture.startswith("gemma") else "chatml"]
        special = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        return chat_template.render(
            template, messages=messages, add_generation_prompt=add_generation_prompt, **special, **variables
        )

    def encode_chat(
        self, messages, add_generation_prompt: bool = True, architecture: str = "", **variables
    ) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt, architecture, **variables)
        bos = self.bos_token
        return self.encode(text, add_bos=False if bos and text.startswith(bos) else None)
