"""An OpenAI-compatible HTTP API over one model, plus the chat page at `/`.

POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not),
GET /v1/models, GET /health, GET /openapi.json (the description of all of them, openapi.py).
Bad requests get OpenAI-style error bodies, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..api import LlmInference
from ..errors import PocketLMError
from ..structured import Grammar, check, compile_format
from ..tools import Reply, ToolPlan, plain_messages
from .openapi import openapi
from .worker import GenerationWorker, Job

log = logging.getLogger("pocketlm.server")

MAX_BODY_BYTES = 1 << 20
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # the endpoint answers 405 itself


class RequestError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type = error_type  # the OpenAI error's "type"

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status)


@dataclass
class Params:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, low, high, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON's 31.0 is the integer 31 (as JSON Schema counts it)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        expected = "an integer" if integer else "a number"
        raise RequestError(400, f"'{name}' must be {expected} in [{low}, {high}], got {value!r}", param=name)
    return value


def parse_params(body: dict, context_size: int) -> Params:
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported", param="n")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise RequestError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
    for s in stop:
        _check_text(s, "'stop'", "stop")
    options = body.get("stream_options") or {}
    return Params(
        max_new_tokens=_number(
            body, "max_tokens", context_size, 1, context_size, integer=True
        ),  # default: what fits
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 1e-9, 1)),
        top_k=_number(body, "top_k", 0, 0, 1 << 20, integer=True),
        seed=_number(body, "seed", 0, -(1 << 63), (1 << 63) - 1, integer=True) % (1 << 32),
        stop=stop,
        stream=bool(body.get("stream", False)),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )


def _check_text(text: str, where: str, param: str) -> None:
    """JSON can carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"{where} is not valid Unicode (a lone surrogate)", param=param) from None


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "user",
            "assistant",
            "developer",
            "tool",
        ):
            raise RequestError(
                400, f"messages[{i}] needs a role of system, user, assistant or tool", param="messages"
            )
        content = m.get("content")
        extra = {}
        if m["role"] == "assistant":  # its content may be null or left out (a turn of tool calls, say)
            if m.get("tool_calls") is not None:
                extra["tool_calls"] = _tool_calls(m["tool_calls"], i)
            content = "" if content is None else content
        if m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise RequestError(
                    400, f"messages[{i}] (a tool result) needs a string 'tool_call_id'", param="messages"
                )
            extra["tool_call_id"] = call_id
            if isinstance(m.get("name"), str):
                extra["name"] = m["name"]
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if not all(isinstance(t, str) for t in texts):
                raise RequestError(
                    400, f"messages[{i}].content: a text part's 'text' must be a string", param="messages"
                )
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string", param="messages")
        _check_text(content, f"messages[{i}].content", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content, **extra})
    return out


def _tool_calls(calls: Any, i: int) -> list[dict]:
    """An assistant turn's earlier tool calls, as OpenAI sends them back."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise RequestError(400, f"{where} must be a list", param="messages")
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(fn, dict)
            and isinstance(fn.get("name"), str)
            and isinstance(fn.get("arguments", ""), str)
        ):
            raise RequestError(
                400,
                f"{where}: each call needs function.name and function.arguments (a JSON string)",
                param="messages",
            )
        _check_text(fn["name"] + fn.get("arguments", ""), where, "messages")
    return calls


def _structured(body: dict, chat_template: str | None, vocabulary) -> tuple[ToolPlan | None, Grammar | None]:
    """The request's tool plan and output grammar (a 400 for anything that will not run)."""
    tools, response_format = body.get("tools"), body.get("response_format")
    try:
        if tools:
            if response_format not in (None, {"type": "text"}):
                raise RequestError(
                    400, "response_format cannot be combined with tools", param="response_format"
                )
            plan = ToolPlan(
                tools,
                body.get("tool_choice", "auto"),
                chat_template,
                bool(body.get("parallel_tool_calls", False)),
            )
            grammar = plan.grammar
        else:
            plan, grammar = None, compile_format(response_format)
        if grammar is not None:
            check(grammar, vocabulary())
    except PocketLMError as e:
        raise RequestError(400, str(e), param="tools" if tools else "response_format") from None
    return plan, grammar


class OpenAIServer:
    def __init__(
        self, llm: LlmInference, model_id: str, context_size: int = 2048, api_key: str | None = None
    ):
        self.llm, self.model_id, self.api_key = llm, model_id, api_key
        self.context_size = min(context_size, llm.model.context_length)
        self.worker = GenerationWorker(llm, self.context_size)
        self.created = int(time.time())

    # -- plumbing ---------------------------------------------------------------------------------

    async def _body(self, request: Request) -> dict:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise RequestError(
                401,
                "invalid or missing API key (Authorization: Bearer ...)",
                error_type="authentication_error",
                code="invalid_api_key",
            )
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "request body is not valid JSON") from None
        except RecursionError:
            raise RequestError(400, "request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        model = body.get("model")
        if model not in (None, self.model_id):
            raise RequestError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )
        return body

    def _job(self, prompt_ids: list[int], params: Params) -> Job:
        if len(prompt_ids) + 1 > self.context_size:
            raise RequestError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; this server's context is "
                f"{self.context_size} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        room = self.context_size - len(prompt_ids)
        return Job(
            prompt_ids,
            min(params.max_new_tokens, room),
            params.temperature,
            params.top_k,
            params.top_p,
            params.seed,
            params.stop,
            asyncio.get_running_loop(),
        )

    async def _events(self, job: Job, request: Request) -> AsyncIterator[tuple[str, Any]]:
        """Events of a job until it is done; cancels it when the client goes away."""
        self.worker.submit(job)
        try:
            while True:
                try:
                    event, value = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if event == "error":
                    raise RequestError(400 if isinstance(value, PocketLMError) else 500, str(value))
                yield event, value
                if event == "done":
                    return
        finally:
            job.cancelled.set()

    # -- endpoints --------------------------------------------------------------------------------

    def _vocabulary(self):
        return self.llm.model.grammar_vocabulary

    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request)
        messages, params = _messages(body), parse_params(body, self.context_size)
        tokenizer = self.llm.tokenizer
        plan, grammar = await asyncio.to_thread(_structured, body, tokenizer.chat_template, self._vocabulary)
        variables = {}
        if plan is not None:
            messages, variables = plan.messages(messages), plan.template_options()
        elif any(m["role"] == "tool" or "tool_calls" in m for m in messages):
            messages = plain_messages(messages)  # a tool round trip continued without tools: plain turns
        try:
            ids = tokenizer.encode_chat(messages, architecture=self.llm.model.architecture, **variables)
        except Exception as e:
            raise RequestError(400, f"cannot apply the chat template: {e}", param="messages") from None
        job = self._job(ids, params)
        job.grammar = grammar
        return await self._complete(request, job, params, chat=True, plan=plan)

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string", param="prompt")
        _check_text(prompt, "'prompt'", "prompt")
        params = parse_params(body, self.context_size)
        if body.get("tools"):
            raise RequestError(400, "tools need /v1/chat/completions", param="tools")
        _, grammar = await asyncio.to_thread(_structured, body, None, self._vocabulary)
        job = self._job(self.llm.tokenizer.encode(prompt), params)
        job.grammar = grammar
        return await self._complete(request, job, params, chat=False)

    async def _complete(
        self, request: Request, job: Job, params: Params, chat: bool, plan: ToolPlan | None = None
    ) -> Response:
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        object_type = "chat.completion" if chat else "text_completion"
        if params.stream:
            return StreamingResponse(
                self._stream(request, job, params, ident, chat, plan),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text, info = [], {}
        async for event, value in self._events(job, request):
            if event == "text":
                text.append(value)
            else:
                info = value
        if not info:  # the client went away
            return Response(status_code=499)
        finish = info["finish_reason"]
        if plan is not None:
            reply = plan.parse("".join(text))
            message = reply.message()
            finish = "tool_calls" if reply.tool_calls else finish
            choice = {"index": 0, "message": message}
        elif chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}}
        else:
            choice = {"index": 0, "text": "".join(text), "logprobs": None}
        choice["finish_reason"] = finish
        return JSONResponse(
            {
                "id": ident,
                "object": object_type,
                "created": int(time.time()),
                "model": self.model_id,
                "choices": [choice],
                "usage": _usage(info),
            }
        )

    async def _stream(self, request, job, params, ident, chat, plan=None) -> AsyncIterator[str]:
        object_type = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list, **extra) -> str:
            data = {
                "id": ident,
                "object": object_type,
                "created": int(time.time()),
                "model": self.model_id,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(data)}\n\n"

        def choice(text: str | None, finish: str | None = None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        if chat:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        held = []  # with tools, the reply is read whole before it is sent: text or tool calls
        try:
            async for event_name, value in self._events(job, request):
                if event_name == "text" and plan is not None:
                    held.append(value)
                elif event_name == "text":
                    yield event([choice(value)])
                else:
                    finish = value["finish_reason"]
                    if plan is not None:
                        reply = plan.parse("".join(held))
                        for delta in _reply_deltas(reply):
                            yield event([{"index": 0, "delta": delta, "finish_reason": None}])
                        finish = "tool_calls" if reply.tool_calls else finish
                    yield event([choice(None, finish)])
                    if params.include_usage:
                        yield event([], usage=_usage(value))
        except RequestError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.error_type}})}\n\n"
        yield "data: [DONE]\n\n"

    async def models(self, request: Request) -> Response:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return RequestError(
                401, "invalid or missing API key", error_type="authentication_error"
            ).response()
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "pocketlm"}
                ],
            }
        )

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, "queued": self.worker.jobs.qsize()})


def _reply_deltas(reply: Reply) -> list[dict]:
    """A finished reply as OpenAI's streamed deltas: its text, or per call its id and name, then
    its arguments."""
    if not reply.tool_calls:
        return [{"content": reply.content}] if reply.content else []
    deltas = []
    for index, call in enumerate(reply.tool_calls):
        entry = call.openai()
        deltas.append(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": entry["id"],
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
        )
        deltas.append(
            {"tool_calls": [{"index": index, "function": {"arguments": entry["function"]["arguments"]}}]}
        )
    return deltas


def _usage(info: dict) -> dict:
    return {
        "prompt_tokens": info["prompt_tokens"],
        "completion_tokens": info["completion_tokens"],
        "total_tokens": info["prompt_tokens"] + info["completion_tokens"],
    }


def create_app(
    llm: LlmInference, model_id: str, context_size: int = 2048, api_key: str | None = None
) -> Starlette:
    server = OpenAIServer(llm, model_id, context_size, api_key)

    def guarded(handler, method: str):
        """`handler` for `method` (and HEAD with GET); any other method gets a 405 naming the allowed ones."""
        allowed = [method, "HEAD"] if method == "GET" else [method]

        async def endpoint(request: Request) -> Response:
            if request.method not in allowed:
                error = RequestError(405, f"{request.method} is not allowed here; use {method}")
                response = error.response()
                response.headers["Allow"] = ", ".join(allowed)
                return response
            try:
                return await handler(request)
            except RequestError as e:
                return e.response()
            except Exception as e:  # a bug of ours: a well-formed 500, the traceback in the server's log only
                log.exception("%s %s failed", request.method, request.url.path)
                return RequestError(
                    500, f"internal error ({type(e).__name__})", error_type="server_error"
                ).response()

        return endpoint

    description = openapi(model_id, server.context_size, api_key=bool(api_key))

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(description)

    static = files("pocketlm.server").joinpath("static")
    routes = [
        Route("/v1/chat/completions", guarded(server.chat_completions, "POST"), methods=ANY_METHOD),
        Route("/v1/completions", guarded(server.completions, "POST"), methods=ANY_METHOD),
        Route("/v1/models", guarded(server.models, "GET"), methods=ANY_METHOD),
        Route("/health", guarded(server.health, "GET"), methods=ANY_METHOD),
        Route("/openapi.json", guarded(openapi_json, "GET"), methods=ANY_METHOD),
        Mount("/", StaticFiles(directory=str(static), html=True)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        yield
        server.worker.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app
