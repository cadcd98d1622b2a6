"""The LLM Inference API, shaped after MediaPipe's with Python names.

    llm = LlmInference("smollm2-135m", max_tokens=512, temperature=0.0)
    llm.generate_response("Write a haiku about the sea.")
    for piece in llm.generate_response_stream("Tell me a story."): print(piece, end="")
    session = llm.create_session(); session.chat("Hi!"); session.chat("And then?")

`max_tokens` is the whole context (prompt and reply), as in MediaPipe: the KV cache is allocated
once for it. A session keeps its cache between turns, so a follow-up only prefills new tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .backends.cpu import DEFAULT_PREFILL
from .engine import GenerationStats, LoadedModel, generate_tokens, stream_text
from .errors import InvalidOptionError
from .kvcache import DEFAULT_KV_CACHE, KVCache
from .registry import runnable_model
from .sampling import make_sampler, validate
from .structured import Constraint, Grammar, compile_format
from .tools import Reply, ToolPlan

Listener = Callable[[str, bool], None]  # (text piece, done)
ResponseFormat = dict | type | Grammar | None  # see Session.generate_response_stream


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int = 512
    top_k: int = 40
    top_p: float = 1.0
    temperature: float = 0.8
    random_seed: int = 0

    def validated(self) -> GenerationOptions:
        validate(self.temperature, self.top_k, self.top_p)
        if not (isinstance(self.max_tokens, int) and self.max_tokens > 0):
            raise InvalidOptionError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        return self


def load(
    model: str | os.PathLike | None = None,
    backend: str = "cpu",
    ple_in_ram: bool = False,
    kv_cache: str = DEFAULT_KV_CACHE,
    prefill: str = DEFAULT_PREFILL,
) -> LoadedModel:
    """Open a model file (path or short name; None for the default) for low-level use:
    `load(path).logits(token_ids)` returns logits [n_tokens, vocab] from one prefill.
    `ple_in_ram` loads Gemma 3n's per-layer embeddings into memory instead of reading them per token;
    `kv_cache` ("f16" or "f32") is what the cpu backend's KV cache holds; `prefill` ("int8" or
    "f32") how it multiplies a prompt by quantized weights (`backends.cpu.CpuBackend`)."""
    return LoadedModel(
        runnable_model(model), backend=backend, ple_in_ram=ple_in_ram, kv_cache=kv_cache, prefill=prefill
    )


class LlmInference:
    """A model opened for text generation, with default sampling options for its sessions.

    `use_chat_template`: None formats prompts as a user turn when the model file carries a chat
    template (instruct models) and passes them raw otherwise (base models).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        max_tokens: int = GenerationOptions.max_tokens,
        top_k: int = GenerationOptions.top_k,
        top_p: float = GenerationOptions.top_p,
        temperature: float = GenerationOptions.temperature,
        random_seed: int = GenerationOptions.random_seed,
        use_chat_template: bool | None = None,
        backend: str = "cpu",
        kv_cache: str = DEFAULT_KV_CACHE,
        prefill: str = DEFAULT_PREFILL,
    ):
        self.options = GenerationOptions(max_tokens, top_k, top_p, temperature, random_seed).validated()
        self.model = load(model, backend, kv_cache=kv_cache, prefill=prefill)
        self.tokenizer = self.model.tokenizer
        if use_chat_template is None:
            use_chat_template = bool(self.tokenizer.chat_template)
        self.use_chat_template = use_chat_template
        self.last_stats: GenerationStats | None = None

    def create_session(self, **options) -> Session:
        """A new conversation; keyword options override this object's sampling defaults."""
        return Session(self, replace(self.options, **options).validated())

    def size_in_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def _prompt_session(self, prompt: str) -> Session:
        session = self.create_session()
        if self.use_chat_template:
            session.add_messages([{"role": "user", "content": prompt}])
        else:
            session.add_query_chunk(prompt)
        return session

    def generate_response(
        self,
        prompt: str,
        listener: Listener | None = None,
        max_new_tokens: int | None = None,
        response_format: ResponseFormat = None,
    ) -> str:
        """The reply to `prompt`; `listener(piece, done)` is called as pieces arrive, if given.
        `response_format` constrains it (see `Session.generate_response_stream`)."""
        return self._prompt_session(prompt).generate_response(listener, max_new_tokens, response_format)

    def generate_response_stream(
        self, prompt: str, max_new_tokens: int | None = None, response_format: ResponseFormat = None
    ) -> Iterator[str]:
        return self._prompt_session(prompt).generate_response_stream(max_new_tokens, response_format)

    def chat(
        self,
        messages: list[dict],
        listener: Listener | None = None,
        max_new_tokens: int | None = None,
        response_format: ResponseFormat = None,
        tools: list | None = None,
        tool_choice: Any = "auto",
        parallel_tool_calls: bool = False,
    ) -> str | Reply:
        """The assistant's reply to a conversation [{"role": ..., "content": ...}, ...].

        With `tools` (OpenAI tool definitions or plain Python functions) the reply is a `Reply`:
        its `tool_calls` (name and parsed arguments) or its `content`; `reply.message()` joins the
        conversation, followed by {"role": "tool", "tool_call_id": ..., "content": result} turns.
        `tool_choice`: "auto", "none", "required" or {"type": "function", "function": {"name": ...}}."""
        session = self.create_session()
        if tools is None:
            session.add_messages(messages)
            return session.generate_response(listener, max_new_tokens, response_format)
        if response_format is not None:
            raise InvalidOptionError(
                "response_format and tools cannot be combined: tool calls have their own format"
            )
        plan = ToolPlan(tools, tool_choice, self.tokenizer.chat_template, parallel_tool_calls)
        session.add_messages(plan.messages(messages), **plan.template_options())
        return plan.parse(session.generate_response(listener, max_new_tokens, plan.grammar))


class Session:
    """One conversation over one KV cache, allocated once for `max_tokens`."""

    def __init__(self, llm: LlmInference, options: GenerationOptions, cache: KVCache | None = None):
        self._llm, self.options = llm, options
        self._lm = llm.model
        self._cache = cache if cache is not None else self._lm.make_cache(options.max_tokens)
        self._sampler = make_sampler(options.temperature, options.top_k, options.top_p, options.random_seed)
        self._cached_ids: list[int] = []  # tokens whose keys and values are in the cache
        self._pending_ids: list[int] = []  # tokens to run before the next reply
        self._messages: list[dict[str, str]] = []
        self._template_variables: dict = {}
        self.last_stats: GenerationStats | None = None

    @property
    def tokens(self) -> list[int]:
        """Every token of the conversation so far."""
        return self._cached_ids + self._pending_ids

    def add_query_chunk(self, text: str) -> None:
        """Append raw text (no chat formatting) to what the next reply answers."""
        first = not self.tokens
        self._pending_ids += self._lm.tokenizer.encode(text, add_bos=None if first else False)

    def add_token_ids(self, ids: list[int]) -> None:
        """Append tokens that are already tokenized (e.g. by a server that counted them)."""
        ids = [int(i) for i in ids]
        self._lm.check_ids(np.asarray(ids, np.int64))
        self._pending_ids += ids

    def add_messages(self, messages: list[dict], **template_variables) -> None:
        """Append chat messages; the conversation is rendered with the model's template (given
        `template_variables` too, such as `tools`) and only the tokens beyond those already in the
        cache will be prefilled."""
        self._messages += messages
        self._template_variables = template_variables or self._template_variables
        ids = self._lm.tokenizer.encode_chat(
            self._messages, architecture=self._lm.architecture, **self._template_variables
        )
        if ids[: len(self.tokens)] == self.tokens:
            self._pending_ids += ids[len(self.tokens) :]
        else:  # the template re-tokenised earlier turns differently: start the cache over
            self._cache = self._lm.make_cache(self.options.max_tokens)
            self._cached_ids, self._pending_ids = [], ids

    def chat(self, message: str, listener: Listener | None = None, max_new_tokens: int | None = None) -> str:
        """Add a user message and return the reply, which joins the conversation. A reply that
        fails before the model saw the message (a full context, a bad option) leaves the session
        as it was, so the next message still gets an answer."""
        before = (
            list(self._messages),
            list(self._pending_ids),
            list(self._cached_ids),
            self._cache,
            self._cache.offset,
        )
        self.add_messages([{"role": "user", "content": message}])
        try:
            reply = self.generate_response(listener, max_new_tokens)
        except BaseException:
            messages, pending, cached, cache, offset = before
            if cache.offset == offset:  # nothing of this turn reached the cache the session had
                self._messages, self._pending_ids, self._cached_ids, self._cache = (
                    messages,
                    pending,
                    cached,
                    cache,
                )
            raise
        self._messages.append({"role": "assistant", "content": reply})
        return reply

    def generate_response_stream(
        self, max_new_tokens: int | None = None, response_format: ResponseFormat = None
    ) -> Iterator[str]:
        """Text pieces of the reply to everything added so far (at most `max_new_tokens`, if
        given; the reply also ends at a stop token or when the context is full).

        `response_format` constrains this reply only: `{"type": "json_object"}`,
        `{"type": "json_schema", "json_schema": {"schema": {...}}}` (or a pydantic model class),
        `{"type": "regex", "regex": "..."}`, `{"type": "grammar", "grammar": "...", "syntax":
        "lark" | "gbnf"}`; the reply ends when the output is complete. A compiled `Grammar` from
        `pocketlm.structured.compile_format` is taken too (compile once, use many times)."""
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
        ):
            raise InvalidOptionError(
                f"max_new_tokens must be an integer >= 1 (or None: up to the context), got {max_new_tokens!r}"
            )
        if not self._pending_ids:
            raise InvalidOptionError("nothing to answer: add a query chunk or a message first")
        grammar = response_format if isinstance(response_format, Grammar) else compile_format(response_format)
        constraint = Constraint(self._lm.grammar_vocabulary, grammar) if grammar else None
        prompt, self._pending_ids = self._pending_ids, []
        stats = self.last_stats = self._llm.last_stats = GenerationStats()
        try:
            yield from stream_text(
                self._lm.tokenizer,
                generate_tokens(
                    self._lm, self._cache, prompt, self._sampler, stats, max_new_tokens, constraint
                ),
            )
        finally:
            # The cache offset says how much of prompt + sampled tokens went through the model;
            # the rest (normally the last sampled token) is fed at the start of the next turn.
            turn = prompt + stats.token_ids
            fed = self._cache.offset - len(self._cached_ids)
            self._cached_ids, self._pending_ids = self._cached_ids + turn[:fed], turn[fed:]

    def generate_response(
        self,
        listener: Listener | None = None,
        max_new_tokens: int | None = None,
        response_format: ResponseFormat = None,
    ) -> str:
        pieces = []
        for piece in self.generate_response_stream(max_new_tokens, response_format):
            pieces.append(piece)
            if listener:
                listener(piece, False)
        if listener:
            listener("", True)
        return "".join(pieces)

    def clone(self) -> Session:
        """An independent copy: same conversation and cache, diverging from here."""
        twin = Session(self._llm, self.options, cache=self._cache.copy())  # its sampler starts from the seed
        twin._cached_ids, twin._pending_ids = list(self._cached_ids), list(self._pending_ids)
        twin._messages, twin._template_variables = list(self._messages), dict(self._template_variables)
        twin.last_stats = self.last_stats
        return twin
