"""Constrained decoding: output that follows a JSON schema, a regex or a grammar.

The grammar engine is llguidance (chosen over xgrammar by measurement; benchmarks/RESULTS.md): at
each step it computes which tokens may come next, and the logits of the others are set to -inf
before any sampling mode sees them. A generation ends when the grammar is complete.

    grammar = compile_format({"type": "json_schema", "json_schema": {"schema": {...}}})
    constraint = Constraint(Vocabulary(tokenizer, n_vocab), grammar)
    logits = constraint.mask(logits); token = sampler(logits); constraint.accept(token)

Formats (OpenAI's `response_format` shapes, plus regex and grammar):
`{"type": "text"}`, `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"schema": S}}`,
`{"type": "regex", "regex": R}`, `{"type": "grammar", "grammar": G, "syntax": "lark" | "gbnf"}`;
a pydantic model class or a plain JSON-schema dict are taken as a json_schema.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .errors import InvalidOptionError, PocketLMError, UnsupportedError

# Compact JSON with one space after ',' and ':'. Free whitespace would let a small model spend its
# whole budget on newlines inside an object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SPEC_CHARS = 1 << 20
MAX_DIGITS = 16
# The last tokens of a reply's budget steer it to a close (see Constraint): at least CLOSING_TOKENS,
# plus CLOSING_PER_LEVEL for each open object or array, at most three quarters of the budget.
CLOSING_TOKENS = 16
CLOSING_PER_LEVEL = 4
FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")
SCHEMA_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
SCHEMA_KEYS = {
    "properties",
    "$schema",
    "$defs",
    "$ref",
    "anyOf",
    "oneOf",
    "allOf",
    "enum",
    "const",
    "items",
}  # a schema or grammar larger than this is refused before it is compiled


def _engine():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise UnsupportedError(
            "structured output needs the llguidance package: pip install llguidance"
        ) from None
    return llguidance


class Grammar:
    """A compiled constraint: llguidance's grammar text and what it was made from."""

    def __init__(self, text: str, response_type: str, schema: dict | None = None, json_output: bool = False):
        self.text, self.response_type, self.schema = text, response_type, schema
        self.json_output = json_output  # the whole output is JSON (numbers get a digit cap)

    def __repr__(self) -> str:
        return f"Grammar({self.response_type})"


def _schema_of(value: Any) -> dict:
    """A JSON schema from a dict, a JSON string, or a pydantic model class."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return value.model_json_schema()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidOptionError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(value, (dict, bool)):
        raise InvalidOptionError(f"a JSON schema must be an object, got {type(value).__name__}")
    return value


def compile_format(response_format: Any) -> Grammar | None:
    """The grammar for a `response_format` (None for free text); a one-line error for anything
    malformed. The grammar's validity against a vocabulary is checked by `Constraint`."""
    if response_format is None:
        return None
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        response_format = {"type": "json_schema", "json_schema": {"schema": response_format}}
    if not isinstance(response_format, dict):
        raise InvalidOptionError(
            f"response_format must be a dict such as {{'type': 'json_object'}}, "
            f"got {type(response_format).__name__}"
        )
    response_type = response_format.get("type")
    if response_type not in FORMAT_TYPES and (
        isinstance(response_type, list) or response_type in SCHEMA_TYPES or SCHEMA_KEYS & set(response_format)
    ):
        response_type = "json_schema"
        response_format = {"json_schema": {"schema": response_format}}  # a bare schema
    llg = _engine()
    if response_type == "text":
        return None
    if response_type == "json_object":
        schema = {"type": "object"}
    elif response_type == "json_schema":
        spec = response_format.get("json_schema", response_format.get("schema"))
        if isinstance(spec, dict) and ("schema" in spec or set(spec) <= {"name", "strict", "description"}):
            spec = spec.get("schema")  # OpenAI's wrapper: {"name", "schema", "strict"}
        if spec is None:
            raise InvalidOptionError(
                "response_format json_schema needs a schema: {'type': 'json_schema', "
                "'json_schema': {'name': ..., 'schema': {...}}}"
            )
        schema = _schema_of(spec)
    elif response_type == "regex":
        regex = response_format.get("regex")
        if not isinstance(regex, str) or not regex:
            raise InvalidOptionError("response_format regex needs a non-empty string 'regex'")
        _check_size(regex, "regex")
        return Grammar(llg.LLMatcher.grammar_from_regex(regex), "regex")
    elif response_type == "grammar":
        text, syntax = response_format.get("grammar"), response_format.get("syntax", "lark")
        if not isinstance(text, str) or not text.strip():
            raise InvalidOptionError("response_format grammar needs a non-empty string 'grammar'")
        _check_size(text, "grammar")
        if syntax == "gbnf":
            try:
                from llguidance.gbnf_to_lark import gbnf_to_lark

                text = gbnf_to_lark(text)
            except Exception as e:  # the converter's own parse errors
                raise InvalidOptionError(f"the GBNF grammar does not parse: {_one_line(e)}") from None
        elif syntax != "lark":
            raise InvalidOptionError(f"grammar syntax must be 'lark' or 'gbnf', got {syntax!r}")
        return Grammar(llg.LLMatcher.grammar_from_lark(text), "grammar")
    else:
        raise InvalidOptionError(
            f"response_format type must be one of {', '.join(FORMAT_TYPES)} "
            f"(or the dict be a JSON schema); got {response_type!r}"
        )
    return json_grammar(schema, "json_object" if response_type == "json_object" else "json_schema")


def json_grammar(schema: dict, response_type: str = "json_schema") -> Grammar:
    llg = _engine()
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise InvalidOptionError(f"the JSON schema cannot be written as JSON: {e}") from None
    except RecursionError:
        raise InvalidOptionError("the JSON schema is nested too deeply") from None
    _check_size(text, "JSON schema")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise InvalidOptionError(f"the JSON schema is not valid: {_one_line(e)}") from None
    return Grammar(grammar, response_type, schema if isinstance(schema, dict) else None, json_output=True)


def _check_size(text: str, what: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidOptionError(
            f"the {what} is {len(text)} characters; at most {MAX_SPEC_CHARS} are accepted"
        )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400]


class Vocabulary:
    """A model's vocabulary as the grammar engine sees it (built in 0.4 s for 49k tokens, 2 s and
    about 130 MB for Gemma's 262k; `LoadedModel.grammar_vocabulary` keeps one, made on first use)."""

    def __init__(self, tokenizer, n_vocab: int):
        llg = _engine()
        tokens = tokenizer.token_bytes()
        tokens += [b""] * (n_vocab - len(tokens))  # embedding rows beyond the vocabulary: never text
        self.size = n_vocab
        self.token_bytes = tokens
        first = np.array([t[0] if t else -1 for t in tokens], np.int16)  # each token's first byte
        self.starts_with_digit = (first >= ord("0")) & (first <= ord("9"))
        self.starts_with_quote = first == ord('"')
        self.closes_container = (first == ord("}")) | (first == ord("]"))
        self.opens_container = (first == ord("{")) | (first == ord("["))

        class Wrapped:  # what llguidance.TokenizerWrapper reads
            eos_token_id = min(tokenizer.stop_ids) if tokenizer.stop_ids else None
            bos_token_id = tokenizer.bos_id
            special_token_ids = sorted(tokenizer.control_ids)

            def __init__(self):
                self.tokens = tokens

            def __call__(self, text: bytes) -> list[int]:
                return tokenizer.encode(text.decode("utf-8", "replace"), add_bos=False, parse_special=False)

        self.engine = llg.LLTokenizer(
            llg.TokenizerWrapper(Wrapped()), n_vocab=n_vocab, eos_token=sorted(tokenizer.stop_ids) or None
        )


def check(grammar: Grammar, vocabulary: Vocabulary) -> None:
    """A one-line error if the grammar cannot run (a construct llguidance does not support, a
    grammar that does not parse, a limit exceeded)."""
    error = _engine().LLMatcher.validate_grammar(grammar.text, vocabulary.engine)
    if error:
        raise InvalidOptionError(
            f"the {grammar.response_type.replace('_', ' ')} cannot be used: {_one_line(error)}"
        )


class Constraint:
    """One generation's matcher: masks logits, advances on each sampled token.

    JSON numbers get at most MAX_DIGITS digits before and after the point (as llama.cpp's JSON
    grammars do; a double holds about 16): a JSON grammar alone allows `1.000...` without end, and
    small models, greedy, write it until the token budget is gone, leaving no JSON at all. The cap
    yields whenever a digit is the only thing the grammar allows.

    A reply must also close within its token budget: a sampled reply (or a small model's greedy one)
    can write a string until the budget is gone, leaving JSON that does not parse. When `mask` is
    told that few tokens `remain` (the closing reserve: CLOSING_TOKENS plus CLOSING_PER_LEVEL per
    open object or array, at most three quarters of the budget), it keeps, among the tokens the
    grammar allows, those that move towards the end of a JSON text: a token that ends the open
    string, else one that closes an object or array, else one that opens none. Where none of these
    is allowed (a required key, a string's minimum length) the grammar's choice stands. Regexes and
    grammars are left alone: where their output may end, it is valid when the budget runs out."""

    def __init__(self, vocabulary: Vocabulary, grammar: Grammar):
        llg = _engine()
        self.vocabulary = vocabulary
        self.n_vocab = vocabulary.size
        check(grammar, vocabulary)
        self._matcher = llg.LLMatcher(vocabulary.engine, grammar.text, log_level=0)
        self._raise_if_error()
        self._bits = np.zeros((self.n_vocab + 31) // 32, np.int32)
        self._json = grammar.json_output
        self._in_string = self._escaped = False
        self._digits = 0  # digits at the end of the output, outside strings
        self._depth = 0  # objects and arrays open, outside strings
        self._budget: int | None = None  # `remain` at the first masked step

    def _raise_if_error(self) -> None:
        if self._matcher.is_error():
            raise PocketLMError(f"constrained decoding failed: {_one_line(self._matcher.get_error())}")

    @property
    def done(self) -> bool:
        """True when the grammar admits no further token (the output is complete)."""
        return self._matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """A bool per token id: may it come next?"""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._raise_if_error()
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=self.n_vocab).view(bool)

    def mask(self, logits: np.ndarray, remain: int | None = None) -> np.ndarray:
        """`logits` with every token the grammar forbids at -inf (a new array). `remain`: how many
        tokens the reply may still have, this one included (None: no limit)."""
        allowed = self.allowed()
        if len(logits) != self.n_vocab:
            raise InvalidOptionError(
                f"logits have {len(logits)} entries; the grammar's vocabulary {self.n_vocab}"
            )
        if not allowed.any():
            raise PocketLMError("constrained decoding failed: the grammar allows no token here")
        if self._digits >= MAX_DIGITS:
            capped = allowed & ~self.vocabulary.starts_with_digit
            if capped.any():
                allowed = capped
        if remain is not None:
            if self._budget is None:
                self._budget = remain
            reserve = min(CLOSING_TOKENS + CLOSING_PER_LEVEL * self._depth, self._budget * 3 // 4)
            if remain <= reserve:
                allowed = self._closing(allowed)
        return np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)

    def _closing(self, allowed: np.ndarray) -> np.ndarray:
        """Of the `allowed` tokens, those that bring the output nearest to its end."""
        v = self.vocabulary
        if not self._json:
            preferences = []
        elif self._in_string:
            preferences = [] if self._escaped else [v.starts_with_quote]
        else:
            preferences = [v.closes_container, ~v.opens_container]
        for preferred in preferences:
            kept = allowed & preferred
            if kept.any():
                return kept
        return allowed

    def accept(self, token: int) -> None:
        self._matcher.consume_token(int(token))
        self._raise_if_error()
        if self._json:
            self._track(self.vocabulary.token_bytes[int(token)])

    def _track(self, text: bytes) -> None:
        """Follow strings and digit runs through the JSON written so far."""
        for byte in text:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:  # backslash
                    self._escaped = True
                elif byte == 0x22:  # quote
                    self._in_string = False
            elif byte == 0x22:
                self._in_string, self._digits = True, 0
            elif 0x30 <= byte <= 0x39:
                self._digits += 1
            else:
                self._digits = 0
                if byte in b"{[":
                    self._depth += 1
                elif byte in b"}]":
                    self._depth = max(self._depth - 1, 0)
