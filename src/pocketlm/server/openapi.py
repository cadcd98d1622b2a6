"""The server's OpenAPI 3.1 description, served at /openapi.json.

It states what the handlers in app.py accept and answer (the OpenAI subset we serve, with this
server's model id and context size), so that clients can generate code from it and the tests can
check the server against it (schemathesis: no 5xx, every answer as documented).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

_REF = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": _REF + name}


def _error_responses(*codes: int) -> dict:
    why = {
        400: "the request is malformed, or asks for something this server cannot do",
        401: "invalid or missing API key",
        404: "another model than the one served",
        413: "the body is larger than 1 MB",
        500: "a bug of pocketlm's (the traceback is in the server's log)",
    }
    return {
        str(c): {"description": why[c], "content": {"application/json": {"schema": _ref("Error")}}}
        for c in codes
    }


def _sampling(context_size: int) -> dict:
    return {
        "model": {"type": ["string", "null"], "description": "the served model's id (optional)"},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": context_size},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "minimum": 1e-9, "maximum": 1},
        "top_k": {
            "type": ["integer", "null"],
            "minimum": 0,
            "maximum": 1 << 20,
            "description": "0: all tokens",
        },
        "seed": {"type": ["integer", "null"], "minimum": -(1 << 63), "maximum": (1 << 63) - 1},
        "n": {"type": "integer", "enum": [1]},
        "stop": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                {"type": "null"},
            ]
        },
        "stream": {"type": "boolean"},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
        "response_format": {
            "description": "constrained output: JSON (any object, or one following a JSON schema), a regex, "
            "or a grammar in Lark (llguidance's dialect) or GBNF",
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"enum": ["text", "json_object"]}},
                },
                {
                    "type": "object",
                    "required": ["type", "json_schema"],
                    "properties": {
                        "type": {"const": "json_schema"},
                        "json_schema": {
                            "type": "object",
                            "required": ["schema"],
                            "properties": {
                                "name": {"type": "string"},
                                "schema": {"type": "object"},
                                "strict": {"type": ["boolean", "null"]},
                            },
                        },
                    },
                },
                {
                    "type": "object",
                    "required": ["type", "regex"],
                    "properties": {"type": {"const": "regex"}, "regex": {"type": "string", "minLength": 1}},
                },
                {
                    "type": "object",
                    "required": ["type", "grammar"],
                    "properties": {
                        "type": {"const": "grammar"},
                        "grammar": {"type": "string", "minLength": 1},
                        "syntax": {"enum": ["lark", "gbnf"]},
                    },
                },
            ],
        },
    }


def _schemas() -> dict:
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }
    content = {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}]}
    tool_call = {
        "type": "object",
        "required": ["function"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name", "arguments"],
                "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
            },
        },
    }
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }
    finish = {"enum": ["stop", "length", "tool_calls"]}
    common = {
        "id": {"type": "string"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "usage": _ref("Usage"),
    }

    def completion(object_type: str, field: str, schema: dict) -> dict:
        """A chat or text completion: its one choice carries `field` (message or text)."""
        choice = {
            "type": "object",
            "required": ["index", field, "finish_reason"],
            "properties": {"index": {"type": "integer"}, field: schema, "finish_reason": finish},
        }
        return {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                **common,
                "object": {"const": object_type},
                "choices": {"type": "array", "items": choice},
            },
        }

    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        },
        "Message": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {"role": {"enum": ["system", "developer", "user"]}, "content": content},
                },
                {
                    "type": "object",
                    "required": ["role"],
                    "properties": {
                        "role": {"const": "assistant"},
                        "content": {"oneOf": [content, {"type": "null"}]},
                        "tool_calls": {"type": "array", "items": tool_call},
                    },
                },
                {
                    "type": "object",
                    "required": ["role", "content", "tool_call_id"],
                    "properties": {
                        "role": {"const": "tool"},
                        "content": content,
                        "tool_call_id": {"type": "string"},
                        "name": {"type": "string"},
                    },
                },
            ]
        },
        "Tool": {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "parameters": {"type": "object"},
                    },
                },
            },
        },
        "Usage": usage,
        "ChatCompletion": completion(
            "chat.completion",
            "message",
            {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"const": "assistant"},
                    "content": {"type": ["string", "null"]},
                    "tool_calls": {"type": "array", "items": tool_call},
                },
            },
        ),
        "Completion": completion("text_completion", "text", {"type": "string"}),
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "object", "created", "owned_by"],
                        "properties": {
                            "id": {"type": "string"},
                            "object": {"const": "model"},
                            "created": {"type": "integer"},
                            "owned_by": {"type": "string"},
                        },
                    },
                },
            },
        },
    }


def openapi(model_id: str, context_size: int, api_key: bool) -> dict:
    """The description of a server serving `model_id` with a context of `context_size` tokens."""
    try:
        release = version("pocketlm")
    except PackageNotFoundError:
        release = "0"
    sampling = _sampling(context_size)
    event = {
        "type": "object",
        "description": "one server-sent event: a chunk as JSON in `data`, an error object, or [DONE] last",
        "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    }
    stream = {"text/event-stream": {"schema": event}}
    chat_request = {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {"type": "array", "items": _ref("Message"), "minItems": 1},
            "tools": {"type": ["array", "null"], "items": _ref("Tool")},
            "tool_choice": {
                "oneOf": [{"enum": ["auto", "none", "required"]}, {"type": "object"}],
            },
            "parallel_tool_calls": {"type": "boolean"},
            **sampling,
        },
    }
    completion_request = {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "prompt": {
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "minItems": 1,
                        "maxItems": 1,
                    },
                ]
            },
            **sampling,
        },
    }
    auth = (401,) if api_key else ()

    def generation(summary: str, request: dict, answer: str) -> dict:
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
                "responses": {
                    "200": {
                        "description": f"the {answer}, or its chunks as server-sent events with stream: true",
                        "content": {"application/json": {"schema": _ref(answer)}, **stream},
                    },
                    **_error_responses(400, *auth, 404, 413, 500),
                },
            }
        }

    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "pocketlm",
            "version": release,
            "description": f"OpenAI-compatible API serving {model_id} with a context of {context_size} tokens.",
        },
        "paths": {
            "/v1/chat/completions": generation("a chat reply", chat_request, "ChatCompletion"),
            "/v1/completions": generation("a continuation of a prompt", completion_request, "Completion"),
            "/v1/models": {
                "get": {
                    "summary": "the served model",
                    "responses": {
                        "200": {
                            "description": "one model",
                            "content": {"application/json": {"schema": _ref("ModelList")}},
                        },
                        **_error_responses(*auth),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "liveness and queue length",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "serving",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["status", "model", "queued"],
                                        "properties": {
                                            "status": {"const": "ok"},
                                            "model": {"type": "string"},
                                            "queued": {"type": "integer"},
                                        },
                                    }
                                }
                            },
                        }
                    },
                }
            },
        },
        "components": {"schemas": _schemas()},
    }
    if api_key:
        document["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"apiKey": []}]
    return document
