"""Tool calling: OpenAI tool definitions (or Python functions) in, parsed tool calls out.

The model is shown the tools and answers in one of two shapes, each enforced by a grammar:
- *Hermes* (templates that render `tools` and write `<tool_call>`, e.g. Qwen 2.5/3): the template
  itself presents the tools; a call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.
- *generic* (every other template, e.g. SmolLM2's and Gemma's, which know nothing of tools): a
  system message lists the tools, and the reply is JSON: `{"tool_calls": [{"name": ..., "arguments":
  {...}}]}` or, when the model may choose (`tool_choice="auto"`), `{"response": "text"}`.
`tool_choice`: "auto" (call or answer), "none" (answer; tools not shown), "required" (call),
or `{"type": "function", "function": {"name": N}}` (call N).
"""

from __future__ import annotations

import inspect
import json
import re
import secrets
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidOptionError
from .structured import Grammar, _engine, json_grammar

_PY_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def openai(self) -> dict:
        """The call as OpenAI's `tool_calls` entry (arguments as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass
class Reply:
    """An assistant turn: text, or tool calls (then `content` is None)."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    def message(self) -> dict:
        """The turn as a chat message, ready to append to the conversation."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.openai() for c in self.tool_calls]
        return out


def function_schema(fn: Callable) -> dict:
    """An OpenAI tool definition from a Python function: its name, the docstring's first paragraph,
    and a parameter schema from the annotations (parameters without a default are required)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to no types
        hints = {}
    properties, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        properties[name] = _type_schema(hints.get(name, str))
        if p.default is p.empty:
            required.append(name)
    doc = inspect.getdoc(fn) or ""
    return {
        "type": "function",
        "function": {
            "name": fn.__name__,
            "description": doc.split("\n\n")[0].strip(),
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


def _type_schema(hint) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _PY_TYPES:
        return {"type": _PY_TYPES[hint]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set) and args:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin in (list, dict, tuple, set):
        return {"type": _PY_TYPES.get(origin, "array")}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return {"anyOf": [{"type": "null"} if a is type(None) else _type_schema(a) for a in args]}
    if hasattr(hint, "model_json_schema"):  # a pydantic model
        return hint.model_json_schema()
    return {}


def normalize_tools(tools: list) -> list[dict]:
    """OpenAI tool definitions from definitions, bare function specs or Python callables."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise InvalidOptionError("tools must be a non-empty list of tool definitions or functions")
    out, names = [], set()
    for i, tool in enumerate(tools):
        if callable(tool) and not isinstance(tool, dict):
            tool = function_schema(tool)
        if isinstance(tool, dict) and "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (
            isinstance(tool, dict) and tool.get("type", "function") == "function" and isinstance(fn, dict)
        ):
            raise InvalidOptionError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                f"'parameters': {{...}}}}}} or a Python function"
            )
        name = fn.get("name")
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name)):
            raise InvalidOptionError(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}"
            )
        if name in names:
            raise InvalidOptionError(f"tools[{i}]: two tools are named {name!r}")
        names.add(name)
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise InvalidOptionError(f"tools[{i}].function.parameters must be a JSON schema object")
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise InvalidOptionError(f"tools[{i}].function.description must be a string")
        out.append(
            {
                "type": "function",
                "function": {"name": name, "description": description, "parameters": parameters},
            }
        )
    return out


def _chosen(tools: list[dict], tool_choice: Any) -> tuple[str, list[dict]]:
    """("auto" | "none" | "required", the tools the model may call)."""
    if tool_choice in (None, "auto", "none", "required"):
        return tool_choice or "auto", tools
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        named = [t for t in tools if t["function"]["name"] == name]
        if not named:
            raise InvalidOptionError(f"tool_choice names {name!r}, which is not among the tools")
        return "required", named
    raise InvalidOptionError(
        "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def _call_schema(tools: list[dict]) -> dict:
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"]["parameters"],
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _system_text(tools: list[dict], mode: str) -> str:
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    how = 'To call a tool, reply {"tool_calls": [{"name": <tool name>, "arguments": {<arguments>}}]}.'
    if mode == "auto":
        how += ' To answer without a tool, reply {"response": <your answer>}.'
    return (
        f"You can call these tools (JSON descriptions, one per line):\n{listing}\n{how} Reply with JSON only."
    )


class ToolPlan:
    """How one request with tools is prompted, constrained and read back."""

    def __init__(
        self,
        tools: list,
        tool_choice: Any = "auto",
        chat_template: str | None = None,
        parallel_tool_calls: bool = False,
    ):
        self.tools = normalize_tools(tools)
        self.mode, self.callable = _chosen(self.tools, tool_choice)
        self.max_calls = 4 if parallel_tool_calls else 1
        template = chat_template or ""
        self.hermes = "tools" in template and "<tool_call>" in template
        self.grammar = self._grammar()

    def _grammar(self) -> Grammar | None:
        if self.mode == "none":
            return None
        call = _call_schema(self.callable)
        if self.hermes:
            calls = " | ".join(' "\\n" '.join(["call"] * n) for n in range(1, self.max_calls + 1))
            start = "calls" if self.mode == "required" else "calls | TEXT"
            lark = (
                f"start: {start}\ncalls: {calls}\n"
                f'call: "<tool_call>\\n" %json {json.dumps(call)} "\\n</tool_call>"\n'
                "TEXT: /[^<](.|\\n)*/\n"
            )
            return Grammar(_engine().LLMatcher.grammar_from_lark(lark), "tool_grammar", json_output=True)
        calls = {
            "type": "object",
            "properties": {
                "tool_calls": {"type": "array", "items": call, "minItems": 1, "maxItems": self.max_calls}
            },
            "required": ["tool_calls"],
            "additionalProperties": False,
        }
        if self.mode == "auto":
            answer = {
                "type": "object",
                "properties": {"response": {"type": "string"}},
                "required": ["response"],
                "additionalProperties": False,
            }
            return json_grammar({"anyOf": [calls, answer]}, "tool_schema")
        return json_grammar(calls, "tool_schema")

    def messages(self, messages: list[dict]) -> list[dict]:
        """The conversation as the template takes it: tool turns and calls kept for a Hermes template,
        written as plain user/assistant text for the others (whose templates know only those roles)."""
        if self.hermes:
            return messages
        return plain_messages(messages, _system_text(self.tools, self.mode) if self.mode != "none" else None)

    def template_options(self) -> dict:
        return {"tools": self.tools} if self.hermes and self.mode != "none" else {}

    def parse(self, text: str) -> Reply:
        """The model's constrained output as text or tool calls."""
        if self.mode == "none":
            return Reply(text)
        if self.hermes:
            found = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.S)
            calls = [json.loads(c) for c in found]
            return Reply(None, [ToolCall(c["name"], c["arguments"]) for c in calls]) if calls else Reply(text)
        try:
            value = json.loads(text)
        except ValueError:  # cut short by max_tokens: an answer's text so far, else the text as it is
            return Reply(_partial_answer(text))
        if "tool_calls" in value:
            return Reply(None, [ToolCall(c["name"], c["arguments"]) for c in value["tool_calls"]])
        return Reply(value.get("response", text))


def _partial_answer(text: str) -> str:
    prefix = '{"response": "'
    if not text.startswith(prefix):
        return text
    body = text[len(prefix) :]
    for end in range(len(body), max(len(body) - 12, -1), -1):  # drop a cut escape sequence
        try:
            return json.loads('"' + body[:end] + '"')
        except ValueError:
            continue
    return body


def plain_messages(messages: list[dict], system: str | None = None) -> list[dict]:
    """Tool calls and results written as ordinary turns; consecutive turns of one role merged
    (templates such as Gemma's require user and assistant to alternate)."""
    out: list[dict] = [{"role": "system", "content": system}] if system else []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                for c in m["tool_calls"]
            ]
            content = json.dumps({"tool_calls": calls}, ensure_ascii=False)
        elif role == "tool":
            role, content = (
                "user",
                f"Tool result ({m.get('name') or m.get('tool_call_id') or 'tool'}): {content}",
            )
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": role, "content": content})
    return out


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
